"""Text generation over an engine: the native model (`NativeEngine`) or llama.cpp (`llamacpp_engine.LlamaCppEngine`).

An engine holds one sequence in its KV cache and offers:
    tokenizer                      encode / decode(ids, skip_special) / eog_ids / chat_template ... (runtime.tokenizer)
    tokens                         the token ids in the cache, in order
    n_ctx                          capacity of the cache
    eval(ids) -> logits            append ids, return logits (len(ids), vocab)
    truncate(n)                    keep the first n tokens
and, built on those, `prompt(ids)` which reuses the longest cached prefix (chat re-sends the whole conversation
every turn; only the new part is computed)."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from llmq.errors import LlmqError

from .sampling import Sampler


class ContextFull(LlmqError):
    """The sequence does not fit in n_ctx."""


class Engine:
    """Shared logic of both engines; subclasses implement `_eval(ids)`, `_truncate(n)` and set tokenizer/n_ctx."""

    name = "?"
    tokenizer = None
    n_ctx = 0

    def __init__(self):
        self.tokens: list[int] = []

    def eval(self, ids: Sequence[int]) -> np.ndarray:
        ids = [int(t) for t in ids]
        if len(self.tokens) + len(ids) > self.n_ctx:
            raise ContextFull(f"context is full ({len(self.tokens)} + {len(ids)} tokens > n_ctx {self.n_ctx})")
        logits = self._eval(ids)
        self.tokens.extend(ids)
        return logits

    def truncate(self, n: int) -> None:
        n = max(0, min(n, len(self.tokens)))
        self._truncate(n)
        del self.tokens[n:]

    def reset(self) -> None:
        self.truncate(0)

    def prompt(self, ids: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `ids`, computing only what differs from what it holds; the logits that
        predict the token after `ids` (vocab,)."""
        ids = [int(t) for t in ids]
        if not ids:
            raise LlmqError("empty prompt")
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        self.truncate(min(common, len(ids) - 1))  # the last prompt token is always evaluated for its logits
        return self.eval(ids[len(self.tokens):])[-1]

    def _eval(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def _truncate(self, n: int) -> None:
        raise NotImplementedError


class NativeEngine(Engine):
    """The native model and its KV cache. eval() returns logits for the last token only (1, vocab) unless
    `all_logits` is set: the output matrix is the largest product of a decode step."""

    name = "native"

    def __init__(self, model, *, n_ctx: int | None = None, cache_type_k: str | None = None,
                 cache_type_v: str | None = None, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.cache = model.new_cache(n_ctx, cache_type_k, cache_type_v)
        self.n_ctx = self.cache.n_ctx
        self.tokenizer = model.tokenizer
        self.all_logits = all_logits

    @classmethod
    def from_gguf(cls, path, *, n_ctx: int | None = None, threads: int | None = None, cache_type_k: str = "f16",
                  cache_type_v: str = "f16", all_logits: bool = False) -> "NativeEngine":
        from . import load_gguf

        model = load_gguf(path, n_ctx=n_ctx, threads=threads, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
        return cls(model, all_logits=all_logits)

    def eval(self, ids: Sequence[int], *, all_logits: bool | None = None) -> np.ndarray:
        self._all = self.all_logits if all_logits is None else all_logits
        return super().eval(ids)

    def _eval(self, ids: list[int]) -> np.ndarray:
        return self.model.forward(np.asarray(ids), self.cache, all_logits=self._all)

    def _truncate(self, n: int) -> None:
        self.cache.truncate(n)


class StreamDecoder:
    """Token ids in, text out, never splitting a multi-byte UTF-8 character: a piece is released only once its
    decoded text no longer ends in U+FFFD. Decoding a small window (the ids since the last release plus the ones
    before them) keeps detokenizers that look at neighbours right, e.g. SentencePiece drops the leading space of
    the first token decoded: `context` (the last prompt tokens) makes the first generated token not the first.
    Control tokens are not shown, as in llama.cpp's CLI."""

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(t) for t in context]
        self.prefix_offset = 0              # decoding starts here
        self.read_offset = len(self.ids)    # text of ids before this has been released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        released = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(released) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(released) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        released = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(released) :]


class TextStream:
    """Iterate to get text pieces as they are generated; afterwards `finish_reason` is "stop" (an
    end-of-generation token), "length" (max_tokens) or "context" (n_ctx reached), and `tokens` the generated ids."""

    def __init__(self, engine: Engine, prompt_ids: Sequence[int], sampler: Sampler, max_tokens: int):
        self.engine, self.prompt_ids, self.sampler, self.max_tokens = engine, list(prompt_ids), sampler, max_tokens
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.n_prompt = len(self.prompt_ids)

    def __iter__(self) -> Iterator[str]:
        engine, tok = self.engine, self.engine.tokenizer
        eog = set(tok.eog_ids) | ({tok.eos_id} if tok.eos_id is not None and tok.eos_id >= 0 else set())
        decoder = StreamDecoder(tok, context=self.prompt_ids[-4:])
        if len(self.prompt_ids) >= engine.n_ctx:
            raise ContextFull(f"the prompt has {len(self.prompt_ids)} tokens; the context holds {engine.n_ctx}")
        logits = engine.prompt(self.prompt_ids)
        while True:
            if len(self.tokens) >= self.max_tokens >= 0:
                self.finish_reason = "length"
                break
            token = self.sampler(logits, engine.tokens)
            if token in eog:
                self.finish_reason = "stop"
                break
            self.tokens.append(token)
            piece = decoder.push(token)
            if piece:
                yield piece
            if len(engine.tokens) >= engine.n_ctx:
                self.finish_reason = "context"
                break
            logits = engine.eval([token])[-1]
        rest = decoder.flush()
        if rest:
            yield rest


def generate(engine: Engine, prompt: str | Sequence[int], sampler: Sampler | None = None, *,
             max_tokens: int = 256, add_special: bool = True, parse_special: bool = True) -> TextStream:
    """Stream of text pieces continuing `prompt` (text, or token ids used as they are). max_tokens < 0: no limit
    but the context."""
    if isinstance(prompt, str):
        prompt = engine.tokenizer.encode(prompt, add_special=add_special, parse_special=parse_special)
    return TextStream(engine, prompt, sampler or Sampler(), max_tokens)
