"""The n-gram proposer (prompt lookup decoding): if the last few tokens appeared earlier in the
request, guess that what followed them then follows them now. Free to run, and strong on text that
repeats itself: code, quotations, edits of the prompt."""
from __future__ import annotations

from dataclasses import dataclass

from minivllm.config.speculative import check_ngram_sizes


@dataclass(frozen=True)
class NgramProposer:
    """Names follow vLLM: match the longest suffix of ``prompt_lookup_max`` down to
    ``prompt_lookup_min`` tokens, and propose up to ``num_speculative_tokens`` tokens."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self) -> None:
        check_ngram_sizes(self.num_speculative_tokens, self.prompt_lookup_max, self.prompt_lookup_min)

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Tokens that followed the most recent earlier occurrence of the longest matching suffix of
        ``token_ids`` (at most ``max_tokens``, default ``num_speculative_tokens``); [] if none."""
        k = self.num_speculative_tokens if max_tokens is None else min(max_tokens, self.num_speculative_tokens)
        if k < 1:
            return []
        for n in range(min(self.prompt_lookup_max, len(token_ids) - 1), self.prompt_lookup_min - 1, -1):
            suffix = token_ids[-n:]
            # scan right to left: the most recent occurrence predicts best; the suffix itself is excluded
            for start in range(len(token_ids) - n - 1, -1, -1):
                if token_ids[start:start + n] == suffix:
                    return token_ids[start + n:start + n + k]
        return []
