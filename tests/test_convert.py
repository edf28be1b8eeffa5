"""Converter foundation: tiny random checkpoints of every supported architecture, converted to GGUF, must give
llama.cpp the same logits and tokens as transformers, and `unpack` must invert `convert`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_models import make_tiny_checkpoint
from tiny_tokenizers import STRESS_TEXT

llama_cpp = pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmq.checkpoint import Checkpoint  # noqa: E402
from llmq.convert import convert  # noqa: E402
from llmq.unpack import unpack  # noqa: E402

PROMPT_IDS_TEXT = "The year's budget: 12345 items, 日本語 and 🙂 emoji.\n  Indented  text."

VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_embeddings=True),
    "llama-bf16-t5layout": dict(arch="llama", dtype="bfloat16", chat_template_file=True),
    "llama3-rope": dict(arch="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "qwen3-tied-f16": dict(arch="qwen3", tie_embeddings=True, dtype="float16"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(variant: str) -> Path:
        if variant not in made:
            kw = dict(VARIANTS[variant])
            made[variant] = make_tiny_checkpoint(kw.pop("arch"), tmp_path_factory.mktemp(variant), **kw)
        return made[variant]
    return get


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    # F32 KV cache: the default F16 cache alone costs ~1e-3 relative logit error
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=256, n_batch=256, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def hf_ids(model_dir: Path, text: str) -> list[int]:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_logits_match_transformers(variant, checkpoints, tmp_path):
    src = checkpoints(variant)
    out = convert(src, tmp_path / "m.gguf", "F32").path
    ids = hf_ids(src, PROMPT_IDS_TEXT)[:48]
    assert len(ids) >= 20
    ref, got = hf_logits(src, ids), llama_cpp_logits(out, ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel <= 1e-3, f"{variant}: relative max logit diff {rel:.2e}"


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral"])
def test_llama_cpp_tokenizes_like_hf(variant, checkpoints, tmp_path):
    src = checkpoints(variant)
    out = convert(src, tmp_path / "m.gguf", "F16").path
    llm = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    got = llm.tokenize(STRESS_TEXT.encode(), add_bos=False, special=False)
    assert got == hf_ids(src, STRESS_TEXT)


@pytest.mark.parametrize("variant", ["llama", "llama-tied", "qwen2", "qwen3"])
def test_unpack_inverts_convert(variant, checkpoints, tmp_path):
    src = checkpoints(variant)
    gguf_path = convert(src, tmp_path / "m.gguf", "F32").path
    back = unpack(gguf_path, tmp_path / "back", dtype="f32")
    with Checkpoint(src) as a, Checkpoint(back) as b:
        names = set(a.names()) - ({"lm_head.weight"} if VARIANTS[variant].get("tie_embeddings") else set())
        assert set(b.names()) == names
        for n in names:
            np.testing.assert_array_equal(a.read(n), b.read(n), err_msg=n)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == VARIANTS[variant]["arch"]
    # the unpacked directory is a working HF checkpoint: same logits, same tokens, chat template kept
    ids = hf_ids(src, PROMPT_IDS_TEXT)[:32]
    assert hf_ids(back, STRESS_TEXT) == hf_ids(src, STRESS_TEXT)
    np.testing.assert_allclose(hf_logits(back, ids), hf_logits(src, ids), rtol=0, atol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(back)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_quantized_files_run_in_llama_cpp(ftype, checkpoints, tmp_path, monkeypatch):
    """Quantised files load in llama.cpp, and their logits are at least as close to the float model's as those of
    the same file encoded with gguf-py's reference quantizer."""
    import gguf.quants
    import llmq.quants

    src = checkpoints("llama")
    ids = hf_ids(src, PROMPT_IDS_TEXT)[:40]
    ref = llama_cpp_logits(convert(src, tmp_path / "f32.gguf", "F32").path, ids)
    ours = llama_cpp_logits(convert(src, tmp_path / "ours.gguf", ftype).path, ids)
    monkeypatch.setattr(llmq.quants, "quantize", lambda w, qtype, importance=None: gguf.quants.quantize(w, qtype))
    baseline = llama_cpp_logits(convert(src, tmp_path / "gguf-py.gguf", ftype).path, ids)
    err_ours, err_base = np.mean((ours - ref) ** 2), np.mean((baseline - ref) ** 2)
    assert err_ours <= 1.1 * err_base, f"{ftype}: logit MSE {err_ours:.3g} vs gguf-py's encoding {err_base:.3g}"
    assert np.mean(np.argmax(ours, -1) == np.argmax(ref, -1)) >= (0.9 if ftype in ("Q8_0", "F16", "BF16") else 0.5)


def test_sharded_checkpoint(tmp_path):
    src = make_tiny_checkpoint("qwen2", tmp_path / "src")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / f).write_bytes((src / f).read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = convert(src, tmp_path / "a.gguf", "F32").path
    b = convert(tmp_path / "sharded", tmp_path / "b.gguf", "F32").path
    ids = hf_ids(src, PROMPT_IDS_TEXT)[:16]
    np.testing.assert_array_equal(llama_cpp_logits(a, ids), llama_cpp_logits(b, ids))


# ---- bad input: one line on stderr, exit code 2, no file at the output path -------------------------------

def run_cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "llmq.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_clean_failure(proc, out: Path, needle: str):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.name}*")], "temporary file left behind"


@pytest.fixture
def tiny_copy(checkpoints, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(checkpoints("llama"), dst)
    return dst


def test_missing_config(tiny_copy, tmp_path):
    (tiny_copy / "config.json").unlink()
    assert_clean_failure(run_cli("convert", tiny_copy, "-o", tmp_path / "o.gguf"), tmp_path / "o.gguf", "config.json")


def test_truncated_safetensors(tiny_copy, tmp_path):
    f = tiny_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_clean_failure(run_cli("convert", tiny_copy, "-o", tmp_path / "o.gguf"), tmp_path / "o.gguf", "truncated")


def test_unsupported_architecture(tiny_copy, tmp_path):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_neox", ["GPTNeoXForCausalLM"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    proc = run_cli("convert", tiny_copy, "-o", tmp_path / "o.gguf")
    assert_clean_failure(proc, tmp_path / "o.gguf", "unsupported architecture")
    assert "llama, mistral, qwen2, qwen3" in proc.stderr


def test_output_not_writable(tiny_copy, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            ro.chmod(0o700)
            out = tmp_path / "not_a_dir" / "o.gguf"
            (tmp_path / "not_a_dir").write_text("x")
        else:
            out = ro / "o.gguf"
        proc = run_cli("convert", tiny_copy, "-o", out)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "cannot write" in proc.stderr
        assert not out.exists()
    finally:
        ro.chmod(0o700)


def test_nan_weights_named(tiny_copy, tmp_path):
    from safetensors.numpy import load_file, save_file

    f = tiny_copy / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.1.mlp.up_proj.weight"][3, :5] = np.nan
    save_file(tensors, f, metadata={"format": "pt"})
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", tiny_copy, "-o", out), out, "blk.1.ffn_up.weight has 5 NaN")
    ok = run_cli("convert", tiny_copy, "-o", out, "--allow-nonfinite", "-q")
    assert ok.returncode == 0, ok.stderr
    assert out.is_file()


def test_existing_output_needs_force(checkpoints, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_text("keep me")
    proc = run_cli("convert", checkpoints("llama"), "-o", out)
    assert proc.returncode == 2 and "--force" in proc.stderr
    assert out.read_text() == "keep me"
    assert run_cli("convert", checkpoints("llama"), "-o", out, "--force", "-q").returncode == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_hub_unreachable_is_one_line(tmp_path):
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", out), out, "hub")


def test_inspect_lists_tensors(checkpoints, tmp_path):
    out = convert(checkpoints("llama"), tmp_path / "m.gguf", "Q4_0").path
    proc = run_cli("inspect", out)
    assert proc.returncode == 0, proc.stderr
    assert "blk.0.attn_q.weight" in proc.stdout and "Q4_0" in proc.stdout and "bits/weight" in proc.stdout
    assert "tokenizer.ggml.pre" in proc.stdout


def test_conversion_states_and_checks_its_memory(checkpoints, tmp_path):
    out = tmp_path / "o.gguf"
    assert_clean_failure(run_cli("convert", checkpoints("llama"), "-o", out, "--max-memory", "10K"), out,
                         "--max-memory allows")
    ok = run_cli("convert", checkpoints("llama"), "-o", out)
    assert ok.returncode == 0 and "expected peak memory" in ok.stdout, ok.stderr
