"""Incremental detokenization: a request's text grown one token at a time, as vLLM's output
processor does, instead of decoding the whole output again every step.

A token's text can depend on its neighbours (byte-level BPE splits a multi-byte character over
tokens; sentencepiece drops a word's leading space at the start of a decode). So each new token is
decoded together with a few tokens before it (from ``prefix_offset``), the text those tokens gave
on their own (up to ``read_offset``) is cut off the front, and what remains is the new text. While
it ends in U+FFFD, an unfinished character, nothing is emitted: the next token completes it.

The detokenizer also finds stop strings in the text as it grows (only where a match could end in
the new text), and says how much of the text is safe to stream: the last ``len(longest stop) - 1``
characters are held back until the request ends, since they may be the start of a stop string
that the final text leaves out.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = []
        self.text = ""
        self.prefix_offset = 0  # decoding starts here: a few tokens of context before the new ones
        self.read_offset = 0  # the tokens before this one are already in ``text``
        self.stop_search_from = 0  # a stop string must end after this (the text of the first min_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it adds (empty while a character is unfinished)."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix):]
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return new

    def flush(self) -> str:
        """The request has ended: add the text of tokens still held back (an unfinished character
        decodes to U+FFFD), so that ``text`` is the whole output decoded at once; return it."""
        if self.read_offset == len(self.token_ids):
            return ""
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new = self._decode(self.token_ids[self.prefix_offset:])[len(prefix):]
        self.text += new
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return new

    def find_stop(self, new_text_len: int) -> str | None:
        """The stop string that first ends in the last ``new_text_len`` characters (and after
        ``stop_search_from``); if one does, the text is cut there (after it with
        ``include_stop_str_in_output``) and it is returned."""
        region = max(len(self.text) - new_text_len, self.stop_search_from)
        found = [(i, s) for s in self.stop if (i := self.text.find(s, max(0, region - len(s) + 1))) >= 0]
        if not found:
            return None
        index, stop = min(found)
        self.text = self.text[:index + len(stop) if self.include_stop_str_in_output else index]
        return stop

    def streamable_text_len(self, finished: bool) -> int:
        """How much of ``text`` may be sent now: all of it once the request has ended, else all but
        what could still turn out to be the start of a stop string."""
        if finished or not self.stop:
            return len(self.text)
        return max(0, len(self.text) - (max(map(len, self.stop)) - 1))

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
