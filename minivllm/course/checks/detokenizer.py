"""Exercise 11's check: the learner's incremental detokenizer (``add``), first on token sequences
whose characters span several tokens, then inside the real server: a streamed completion,
constrained to texts full of multi-byte characters, must arrive exactly as written.

The reference is the tokenizer decoding the whole sequence at once: after every token whose text is
complete, the detokenizer's text must equal it, and the pieces ``add`` returned must add up to it.
"""
from __future__ import annotations

import json

from minivllm.course.checks.base import CheckFailed, CheckResult, check_model_folder, quiet_engine_logs, run_stages

TEXTS = ["naïve café, déjà vu", "π ≈ 3.14159 ✓", "日本語のテキスト", "emoji: 🚀🎉 done", "mixed: a→b ⇒ c ∎",
         "Ünïcödé\twith\ttabs\nand lines"]
SERVED_TEXTS = ["café 🚀 naïve", "日本 → ✓ done", "Grüße, π ≈ 3.14"]


def check_detokenizer(detokenizer_class: type, verbose: bool = True) -> CheckResult:
    """Run the learner's `IncrementalDetokenizer` subclass on hard token sequences, then as the
    server's detokenizer (``detokenizer_class=``) on streamed multi-byte completions."""
    from transformers import AutoTokenizer

    from minivllm.engine.detokenizer import IncrementalDetokenizer

    with check_model_folder() as folder:
        tokenizer = AutoTokenizer.from_pretrained(folder)

        def plugs_in() -> str:
            if not (isinstance(detokenizer_class, type) and issubclass(detokenizer_class, IncrementalDetokenizer)):
                raise CheckFailed(f"{detokenizer_class!r} is not a subclass of IncrementalDetokenizer")
            return "it is an IncrementalDetokenizer"

        def token_by_token() -> str:
            for text in TEXTS:
                _check_sequence(detokenizer_class, tokenizer, text)
            return f"{len(TEXTS)} texts grown token by token equal decoding the whole sequence"

        def in_the_server() -> str:
            with quiet_engine_logs():
                got = _stream_through_server(folder, detokenizer_class)
            for want, (text, chunks) in zip(SERVED_TEXTS, got):
                if "\ufffd" in "".join(chunks):
                    raise CheckFailed(f"the server streamed {chunks!r}: a chunk holds U+FFFD, half a character")
                if text != want:
                    raise CheckFailed(f"the server streamed {text!r} for {want!r}")
            return f"{len(SERVED_TEXTS)} streamed completions arrive exactly as written, chunk by chunk"

        return run_stages("the incremental detokenizer", [plugs_in, token_by_token, in_the_server], verbose)


def _check_sequence(detokenizer_class: type, tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    detok = detokenizer_class(tokenizer)
    pieces = []
    for i, token in enumerate(ids):
        try:
            piece = detok.add(token)
        except Exception as e:  # the skeleton's NotImplementedError lands here too
            raise CheckFailed(f"add({token}) raised {e!r} on token {i} of {text!r}") from None
        if not isinstance(piece, str):
            raise CheckFailed(f"add({token}) returned {piece!r}: it must return the text the token adds (a str)")
        pieces.append(piece)
        whole = tokenizer.decode(ids[:i + 1])
        if "\ufffd" in piece:
            raise CheckFailed(f"after token {i} of {text!r}, add returned {piece!r}: U+FFFD is half a character; "
                              "wait for the token that completes it")
        if not whole.endswith("\ufffd") and detok.text != whole:
            raise CheckFailed(f"after token {i} of {text!r} the text is {detok.text!r}, but decoding the first "
                              f"{i + 1} tokens at once gives {whole!r}")
        if "".join(pieces) != detok.text:
            raise CheckFailed(f"after token {i} of {text!r}, the pieces add returned make {''.join(pieces)!r}, "
                              f"but self.text is {detok.text!r}")
    if detok.text != text:
        raise CheckFailed(f"all tokens of {text!r} in, the text is {detok.text!r}")


def _stream_through_server(folder: str, detokenizer_class: type) -> list[tuple[str, list[str]]]:
    """Each served text's streamed completion and its chunks, from a real server run with the
    learner's detokenizer (structured output makes the model write exactly that text)."""
    import httpx2 as httpx

    from minivllm.entrypoints.openai.local import InProcessServer

    try:
        server = InProcessServer.launch(folder, "course", max_model_len=256, num_kv_blocks=64,
                                        detokenizer_class=detokenizer_class)
    except RuntimeError as e:
        raise CheckFailed(str(e)) from None
    with server:
        results = []
        for want in SERVED_TEXTS:
            body = {"model": "course", "prompt": "text = ", "max_tokens": 64, "temperature": 0, "stream": True,
                    "structured_outputs": {"choice": [want]}}
            chunks = []
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                if r.status_code != 200:
                    raise CheckFailed(f"the server answered {r.status_code}: {r.read().decode()[:300]}")
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append(json.loads(line[6:])["choices"][0]["text"])
            if not server.llm.is_running:
                raise CheckFailed(f"the engine stopped while serving {want!r}: {server.llm.dead_because!r}")
            results.append(("".join(chunks), chunks))
        return results
