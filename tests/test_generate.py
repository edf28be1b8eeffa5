"""Sampling semantics, streaming detokenisation, the generation loop, and native vs llama.cpp greedy generation."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.generate import ContextFull, Engine, NativeEngine, StreamDecoder, generate
from runtime.sampling import Sampler, SamplerParams, apply_repeat_penalty, min_p_cut, top_k_candidates, top_p_cut


class ByteTokenizer:
    """Token i is byte i: every multi-byte character spans several tokens."""

    bos_id, eos_id, eog_ids, add_bos, add_eos, chat_template = 256, 257, {257, 258}, False, False, None

    def encode(self, text, add_special=True, parse_special=False):
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special=False):
        return b"".join(self.token_to_piece(i) for i in ids if not (skip_special and i >= 256)).decode(
            "utf-8", "replace")

    def token_to_piece(self, i):
        return bytes([i]) if i < 256 else ["<s>", "</s>", "<eot>"][i - 256].encode()


class ScriptedEngine(Engine):
    """Logits that make the next token of a script the clear favourite; counts the tokens it evaluates."""

    name = "scripted"

    def __init__(self, script, n_ctx=64, vocab=259):
        super().__init__()
        self.tokenizer, self.n_ctx, self.script, self.vocab, self.n_evaluated = ByteTokenizer(), n_ctx, script, vocab, 0

    def _eval(self, ids):
        self.n_evaluated += len(ids)
        rows = np.zeros((len(ids), self.vocab), np.float32)
        for i in range(len(ids)):
            step = len(self.tokens) + i + 1 - self.prompt_len
            rows[i, self.script[min(max(step, 0), len(self.script) - 1)]] = 20.0
        return rows

    def _truncate(self, n):
        pass


# ------------------------------------------------------------------------------------------------------ sampling

def test_defaults_are_llama_cpp_defaults():
    p = SamplerParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n) == (0.8, 40, 0.95, 0.05,
                                                                                               1.0, 64)


def test_greedy_and_repeat_penalty():
    logits = np.array([1.0, 3.0, 2.9, -1.0], np.float32)
    greedy = Sampler(temperature=0.0)
    assert greedy(logits) == 1
    penalised = apply_repeat_penalty(logits, [1, 3, 3], 1.5)
    np.testing.assert_allclose(penalised, [1.0, 2.0, 2.9, -1.5])  # positive divided, negative multiplied, once
    assert Sampler(temperature=0.0, repeat_penalty=1.5)(logits, history=[1]) == 2
    # only the last repeat_last_n tokens count
    assert Sampler(temperature=0.0, repeat_penalty=1.5, repeat_last_n=2)(logits, history=[1, 0, 0]) == 1
    assert Sampler(temperature=0.0, repeat_penalty=1.5, repeat_last_n=-1)(logits, history=[1, 0, 0]) == 2


def test_filters():
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(probs).astype(np.float32)
    np.testing.assert_array_equal(top_k_candidates(logits, 2), [1, 3])
    np.testing.assert_array_equal(top_k_candidates(logits, 0), [1, 3, 2, 0])
    sorted_logits = logits[top_k_candidates(logits, 0)]
    assert [top_p_cut(sorted_logits, p) for p in (0.4, 0.75, 0.85, 0.99, 1.0)] == [1, 2, 3, 4, 4]
    assert [min_p_cut(sorted_logits, m) for m in (0.0, 0.09, 0.2, 0.7, 0.99)] == [4, 4, 3, 1, 1]

    ids, p = Sampler(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0).candidates(logits)
    np.testing.assert_array_equal(ids, [1, 3, 2])
    np.testing.assert_allclose(p, probs[[1, 3, 2]] / 0.95, rtol=1e-5)
    ids, p = Sampler(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0).candidates(logits)
    np.testing.assert_allclose(p, probs[ids] ** 2 / (probs**2).sum(), rtol=1e-5)  # temperature 0.5 squares


def test_seeded_sampling_is_deterministic_and_follows_the_distribution():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4])).astype(np.float32)
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    s1, s2, s3 = Sampler(seed=7, **params), Sampler(seed=7, **params), Sampler(seed=8, **params)
    draws1 = [s1(logits) for _ in range(4000)]
    assert draws1 == [s2(logits) for _ in range(4000)]
    assert draws1 != [s3(logits) for _ in range(4000)]
    freq = np.bincount(draws1, minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)


# -------------------------------------------------------------------------------------------- streaming and loop

def test_stream_decoder_never_splits_characters():
    tok = ByteTokenizer()
    text = "héllo 🙂 日本語 👨‍👩‍👧 end"
    dec = StreamDecoder(tok)
    pieces = [dec.push(b) for b in text.encode("utf-8")]
    assert "".join(pieces) + dec.flush() == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[:2] == ["h", ""] and pieces[2] == "é"  # é is two bytes: released with its second byte
    dec = StreamDecoder(tok)
    assert dec.push(0xE6) == "" and dec.flush() == "\ufffd"  # a dangling lead byte comes out at the end


def _scripted(script, n_ctx=64):
    engine = ScriptedEngine(script, n_ctx)
    engine.prompt_len = 3
    return engine


def test_generation_stops_on_every_eog_token():
    for eog in (257, 258):
        engine = _scripted(list(b"hi!") + [eog, 65])
        stream = generate(engine, [1, 2, 3], Sampler(temperature=0), max_tokens=50)
        assert "".join(stream) == "hi!"
        assert stream.finish_reason == "stop" and stream.tokens == list(b"hi!")
        assert engine.tokens == [1, 2, 3] + list(b"hi!")  # the end token itself never enters the cache


def test_generation_length_and_context_limits():
    stream = generate(_scripted(list(b"abcdefgh")), [1, 2, 3], Sampler(temperature=0), max_tokens=4)
    assert "".join(stream) == "abcd" and stream.finish_reason == "length"
    engine = _scripted(list(b"abcdefghijklmnop"), n_ctx=8)
    stream = generate(engine, [1, 2, 3], Sampler(temperature=0), max_tokens=-1)
    assert "".join(stream) == "abcdef" and stream.finish_reason == "context"
    assert len(engine.tokens) == 8
    with pytest.raises(ContextFull):
        list(generate(_scripted([65], n_ctx=4), [1, 2, 3, 4], Sampler(temperature=0)))


def test_prompt_reuses_the_cached_prefix():
    engine = _scripted([65])
    engine.prompt([1, 2, 3, 4, 5])
    assert engine.n_evaluated == 5
    engine.prompt([1, 2, 3, 4, 5, 6, 7])
    assert engine.n_evaluated == 7  # only 6 and 7
    engine.prompt([1, 2, 9])
    assert engine.n_evaluated == 8 and engine.tokens == [1, 2, 9]
    engine.prompt([1, 2, 9])
    assert engine.n_evaluated == 9  # the last token is re-evaluated for its logits


def test_stream_decoder_hides_control_tokens():
    dec = StreamDecoder(ByteTokenizer(), context=[104])
    assert [dec.push(t) for t in (105, 256, 33)] == ["i", "", "!"]


# ------------------------------------------------------------------------------------- real engines, tiny models

@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_native_greedy_generation_equals_llamacpp(tiny_gguf, arch):
    from runtime.llamacpp_engine import LlamaCppEngine

    path, _ = tiny_gguf(arch)
    native = NativeEngine.from_gguf(path, n_ctx=128)
    reference = LlamaCppEngine(path, n_ctx=128, threads=1, logits_all=False)
    prompt = "The state of the union is"
    assert native.tokenizer.encode(prompt) == reference.tokenizer.encode(prompt)
    streams = [generate(e, prompt, Sampler(temperature=0), max_tokens=40) for e in (native, reference)]
    texts = ["".join(s) for s in streams]
    assert streams[0].tokens == streams[1].tokens and len(streams[0].tokens) > 5
    assert texts[0] == texts[1]


def test_cli_generate(tiny_gguf, capsys):
    from runtime.cli import main

    path, _ = tiny_gguf("qwen2")
    args = ["generate", str(path), "-p", "Hello", "-n", "12", "--temp", "0", "--ctx", "64"]
    assert main(args) == 0
    native = capsys.readouterr()
    assert main(args + ["--engine", "llama.cpp"]) == 0
    reference = capsys.readouterr()
    assert native.out == reference.out and len(native.out.strip()) > 0
    assert "[native] prompt" in native.err and "[llama.cpp] prompt" in reference.err
    # sampling with a seed is reproducible
    seeded = ["generate", str(path), "-p", "Hello", "-n", "12", "--seed", "3", "--temp", "1.5"]
    assert main(seeded) == 0
    first = capsys.readouterr().out
    assert main(seeded) == 0
    assert capsys.readouterr().out == first
