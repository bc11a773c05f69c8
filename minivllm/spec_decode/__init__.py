"""Speculative decoding: cheap proposers guess the next tokens, the target model checks them all in
one forward pass, and the rejection sampler keeps exactly the target's output distribution."""
