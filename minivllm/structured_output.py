"""Structured output: keep a request's tokens inside a language (a JSON schema, a regex, a list of
choices, an EBNF grammar), as vLLM does, with xgrammar.

xgrammar compiles the constraint against the tokenizer's vocabulary into a pushdown automaton and,
for the automaton's current state, fills a *bitmask* of the tokens that may come next (one bit per
token, int32 words). Every step the engine asks for each constrained request's mask row, the sampler
sets the masked tokens' logits to -inf (`minivllm.worker.logits_processors`), and the sampled token
advances the automaton. When the language is complete the mask allows only EOS, and the request ends.

With speculative decoding a request samples at several positions at once: its mask rows are filled
by advancing through its draft tokens one by one and rolling back after. A draft that leaves the
language gets probability 0 under the target's masked distribution, so the rejection sampler
rejects it.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from minivllm.core.scheduler import SchedulerOutput
from minivllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar


class StructuredOutputManager:
    """The grammars of one engine: compiled once per distinct constraint, a matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr  # 1.3 s to import: only engines that meet a constrained request pay it

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        self.compiler = xgr.GrammarCompiler(info)
        self.compiled: dict[tuple[str, str, bool], xgrammar.CompiledGrammar] = {}
        self.matchers: dict[str, xgrammar.GrammarMatcher] = {}

    def compile(self, constraint: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        """The compiled grammar of ``constraint`` (cached); ValueError naming the field if xgrammar
        cannot compile it."""
        kind = constraint.kind
        value = getattr(constraint, kind)
        # keys in the schema's order: xgrammar emits an object's properties in that order
        key = (kind, json.dumps(value) if not isinstance(value, str) else value, constraint.disable_any_whitespace)
        if key not in self.compiled:
            try:
                if kind == "json":
                    grammar = self.compiler.compile_json_schema(
                        key[1], any_whitespace=not constraint.disable_any_whitespace)
                elif kind == "regex":
                    grammar = self.compiler.compile_regex(value)
                elif kind == "choice":  # GBNF string literals escape like JSON strings, but non-ASCII
                    # must stay as is: GBNF reads the \u escape of an emoji as two surrogate code points
                    grammar = self.compiler.compile_grammar(
                        "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
                else:
                    grammar = self.compiler.compile_grammar(value)
            except Exception as e:  # xgrammar raises RuntimeError (and others) for what it cannot parse
                raise ValueError(f"StructuredOutputsParams.{kind}={value!r} cannot be compiled: {e}") from None
            self.compiled[key] = grammar
        return self.compiled[key]

    # ---- per request -------------------------------------------------------------------------
    def add(self, request_id: str, constraint: StructuredOutputsParams) -> None:
        self.matchers[request_id] = self._xgr.GrammarMatcher(self.compile(constraint))  # rolls back any number

    def release(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def accept(self, request_id: str, token: int) -> bool:
        """Advance the request's matcher past its new ``token``; True once the language is complete
        and its end (EOS) taken. A token outside the language here is an engine bug."""
        matcher = self.matchers[request_id]
        if not matcher.accept_token(token):
            raise RuntimeError(f"request {request_id!r} sampled token {token}, which its grammar forbids: "
                               "the mask was not applied")
        return matcher.is_terminated()

    # ---- every step --------------------------------------------------------------------------
    def attach_masks(self, out: SchedulerOutput) -> None:
        """Put each constrained sampling chunk's mask rows in ``out.token_masks``: one for its next
        token, and one after each of its draft tokens (speculative decoding)."""
        xgr = self._xgr
        for chunk in out.chunks:
            matcher = self.matchers.get(chunk.seq.request_id)
            if matcher is None or not chunk.samples:
                continue
            drafts = chunk.draft_token_ids
            masks = xgr.allocate_token_bitmask(1 + len(drafts), self.vocab_size)  # every bit set
            matcher.fill_next_token_bitmask(masks, 0)
            advanced = 0
            for token in drafts:  # a draft outside the language is masked at its own row: rejected there
                if not matcher.accept_token(token):
                    break
                advanced += 1
                if matcher.is_terminated():  # the drafts after an accepted EOS are never emitted
                    break
                matcher.fill_next_token_bitmask(masks, advanced)
            if advanced:
                matcher.rollback(advanced)
            out.token_masks[chunk.seq.request_id] = masks
