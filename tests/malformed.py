"""Builders of broken and hostile inputs for the robustness and fuzz tests.

`RawGGUF` writes GGUF bytes field by field and remembers where each field sits, so a test can make any one of them
lie (a count of 2**60, a string length past the end, an unknown type id) and nothing else. `small_gguf` and
`small_safetensors` are small valid files for mutation; `CHECKPOINT_CASES` and `GGUF_CASES` are the corpus of
broken inputs the CLI must reject with one line."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT, GGUFValueType as VT

_SCALAR_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
               VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}


def _string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


@dataclass
class RawGGUF:
    """A GGUF file assembled by hand. `build()` returns (bytes, offsets of every field by name)."""
    version: int = 3
    alignment: int = 32
    kv: list = field(default_factory=list)  # (key, type, value, element type)
    tensors: list = field(default_factory=list)  # (name, ggml type, ggml shape, data bytes)

    def add(self, key: str, vtype: VT, value, etype: VT | None = None) -> "RawGGUF":
        self.kv.append((key, vtype, value, etype))
        return self

    def add_tensor(self, name: str, qtype: QT, shape: tuple[int, ...], data: bytes | None = None) -> "RawGGUF":
        block, size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(shape))
        if data is None:  # real encodings of random values, so the file is clean for `verify`
            from llmq.quants import quantize

            values = np.random.default_rng(len(self.tensors)).normal(0, 1, (n // shape[0], shape[0]))
            data = quantize(values.astype(np.float32), qtype).tobytes()
        self.tensors.append((name, qtype, tuple(shape), data))
        return self

    def _value(self, vtype: VT, value, etype: VT | None) -> bytes:
        if vtype == VT.STRING:
            return _string(value)
        if vtype == VT.ARRAY:
            head = struct.pack("<IQ", etype, len(value))
            return head + b"".join(self._value(etype, v, None) for v in value)
        return struct.pack(_SCALAR_FMT[vtype], value)

    def build(self) -> tuple[bytes, dict[str, int]]:
        out = bytearray()
        off: dict[str, int] = {}

        def put(name: str, b: bytes):
            off[name] = len(out)
            out.extend(b)

        put("magic", b"GGUF")
        put("version", struct.pack("<I", self.version))
        put("n_tensors", struct.pack("<Q", len(self.tensors)))
        put("n_kv", struct.pack("<Q", len(self.kv)))
        for key, vtype, value, etype in self.kv:
            put(f"kv.{key}.keylen", _string(key))
            put(f"kv.{key}.type", struct.pack("<I", vtype))
            put(f"kv.{key}.value", self._value(vtype, value, etype))
        data_offsets, pos = [], 0
        for _, _, _, data in self.tensors:
            data_offsets.append(pos)
            pos += len(data) + (-len(data) % self.alignment)
        for (name, qtype, shape, _), doff in zip(self.tensors, data_offsets):
            put(f"t.{name}.namelen", _string(name))
            put(f"t.{name}.n_dims", struct.pack("<I", len(shape)))
            put(f"t.{name}.dims", struct.pack(f"<{len(shape)}Q", *shape))
            put(f"t.{name}.type", struct.pack("<I", qtype))
            put(f"t.{name}.offset", struct.pack("<Q", doff))
        out.extend(b"\0" * (-len(out) % self.alignment))
        off["data"] = len(out)
        for (name, _, _, data), doff in zip(self.tensors, data_offsets):
            off[f"data.{name}"] = len(out)
            out.extend(data)
            out.extend(b"\0" * (-len(out) % self.alignment))
        return bytes(out), off


def small_gguf(alignment: int | None = None) -> RawGGUF:
    """A tiny but complete llama GGUF (1 block, 2 heads, 8 tokens) with F32, F16, Q8_0 and Q4_K tensors."""
    g = RawGGUF(alignment=alignment or 32)
    tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa", "c"]
    g.add("general.architecture", VT.STRING, "llama")
    if alignment is not None:
        g.add("general.alignment", VT.UINT32, alignment)
    for k, v in (("block_count", 1), ("context_length", 64), ("embedding_length", 256), ("feed_forward_length", 256),
                 ("attention.head_count", 2), ("attention.head_count_kv", 1)):
        g.add(f"llama.{k}", VT.UINT32, v)
    g.add("llama.attention.layer_norm_rms_epsilon", VT.FLOAT32, 1e-5)
    g.add("tokenizer.ggml.model", VT.STRING, "gpt2")
    g.add("tokenizer.ggml.tokens", VT.ARRAY, tokens, VT.STRING)
    g.add("tokenizer.ggml.token_type", VT.ARRAY, [3, 3, 1, 1, 1, 1, 1, 1], VT.INT32)
    g.add("tokenizer.ggml.merges", VT.ARRAY, ["a b", "Ġ a"], VT.STRING)
    g.add("tokenizer.ggml.bos_token_id", VT.UINT32, 0)
    g.add("tokenizer.ggml.eos_token_id", VT.UINT32, 1)
    g.add("general.scores", VT.ARRAY, [0.5, -1.0], VT.FLOAT64)
    n_embd, n_ff, hd = 256, 256, 128
    g.add_tensor("token_embd.weight", QT.Q8_0, (n_embd, len(tokens)))
    g.add_tensor("output_norm.weight", QT.F32, (n_embd,))
    g.add_tensor("blk.0.attn_norm.weight", QT.F32, (n_embd,))
    g.add_tensor("blk.0.ffn_norm.weight", QT.F16, (n_embd,))
    g.add_tensor("blk.0.attn_q.weight", QT.Q4_K, (n_embd, 2 * hd))
    g.add_tensor("blk.0.attn_k.weight", QT.Q8_0, (n_embd, hd))
    g.add_tensor("blk.0.attn_v.weight", QT.Q8_0, (n_embd, hd))
    g.add_tensor("blk.0.attn_output.weight", QT.Q4_K, (2 * hd, n_embd))
    g.add_tensor("blk.0.ffn_gate.weight", QT.Q4_K, (n_embd, n_ff))
    g.add_tensor("blk.0.ffn_up.weight", QT.Q4_K, (n_embd, n_ff))
    g.add_tensor("blk.0.ffn_down.weight", QT.Q4_K, (n_ff, n_embd))
    return g


def fuzz_gguf() -> RawGGUF:
    """Smaller than small_gguf (about 1 KiB) so mutations hit the header often: every value type, 3 tensors."""
    g = RawGGUF()
    g.add("general.architecture", VT.STRING, "llama")
    for i, vt in enumerate(_SCALAR_FMT):
        g.add(f"k{i}", vt, True if vt == VT.BOOL else (1.5 if vt in (VT.FLOAT32, VT.FLOAT64) else 7))
    g.add("tokenizer.ggml.tokens", VT.ARRAY, ["a", "bc", "Ġd", ""], VT.STRING)
    g.add("ints", VT.ARRAY, [1, 2, 3], VT.INT32)
    g.add_tensor("a", QT.F32, (4, 2))
    g.add_tensor("b", QT.Q8_0, (32, 2))
    g.add_tensor("c", QT.Q4_K, (256,))
    return g


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# ---- safetensors -----------------------------------------------------------------------------------------------

def safetensors_bytes(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def small_safetensors() -> bytes:
    rng = np.random.default_rng(0)
    parts = {"w": ("F32", (4, 8), rng.normal(size=(4, 8)).astype(np.float32).tobytes()),
             "h": ("F16", (16,), rng.normal(size=16).astype(np.float16).tobytes()),
             "b": ("BF16", (2, 4), rng.integers(0, 2**16, 8, dtype=np.uint16).tobytes()),
             "i": ("I32", (3,), np.arange(3, dtype=np.int32).tobytes())}
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape, raw) in parts.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return safetensors_bytes(header, data)


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def rewrite_st(path: Path, edit: Callable[[dict], None]) -> None:
    header, data = read_st(path)
    edit(header)
    path.write_bytes(safetensors_bytes(header, data))


def _weights(d: Path) -> Path:
    return d / "model.safetensors"


def _first_matrix(header: dict) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)


def _edit_config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate(path_of: Callable[[Path], Path], keep: Callable[[int], int]):
    def edit(d: Path):
        p = path_of(d)
        data = p.read_bytes()
        p.write_bytes(data[:keep(len(data))])
    return edit


def _st_header_len(value: int):
    def edit(d: Path):
        p = _weights(d)
        p.write_bytes(patch(p.read_bytes(), 0, "<Q", value))
    return edit


def _st_edit(fn: Callable[[dict], None]):
    return lambda d: rewrite_st(_weights(d), fn)


def _shape_lie(h):
    h[_first_matrix(h)]["shape"][0] += 1


def _offsets_out(h):
    name = _first_matrix(h)
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [b + 10**9, e + 10**9]


def _overlap(h):
    names = [k for k in h if k != "__metadata__"]
    a, b = sorted(names, key=lambda n: h[n]["data_offsets"][0])[:2]
    size_b = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size_b]


def _dtype(value):
    def edit(h):
        h[_first_matrix(h)]["dtype"] = value
    return edit


def _nan_weights(d: Path):
    p = _weights(d)
    header, data = read_st(p)
    name = _first_matrix(header)
    assert header[name]["dtype"] == "F32"
    begin = header[name]["data_offsets"][0]
    b = bytearray(data)
    struct.pack_into("<f", b, begin + 4, float("nan"))
    p.write_bytes(safetensors_bytes(header, bytes(b)))


def _write(rel: str, content: bytes | str):
    def edit(d: Path):
        p = d / rel
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return edit


def _remove(rel: str):
    return lambda d: (d / rel).unlink()


def _json_edit(rel: str, fn):
    def edit(d: Path):
        obj = json.loads((d / rel).read_text())
        (d / rel).write_text(json.dumps(fn(obj)))
    return edit


def _index(weight_map):
    return _write("model.safetensors.index.json", json.dumps({"weight_map": weight_map}))


def _two_shards(d: Path):
    shutil.copy(_weights(d), d / "model-2.safetensors")


def _only_pickle(d: Path):
    _weights(d).rename(d / "pytorch_model.bin")


def _huge_int_dims(h):
    h[_first_matrix(h)]["shape"] = [2**32, 2**32]
    h[_first_matrix(h)]["data_offsets"] = [0, 0]


def _dtype_list(h):
    h[_first_matrix(h)]["dtype"] = ["F32"]


# (id, edit of a copy of the tiny checkpoint, extra CLI args, regex the one stderr line must match)
CHECKPOINT_CASES: list[tuple[str, Callable[[Path], None], list[str], str]] = [
    ("st-shorter-than-8-bytes", _truncate(_weights, lambda n: 5), [], r"not a safetensors file"),
    ("st-truncated-in-header", _truncate(_weights, lambda n: 100), [], r"header length"),
    ("st-truncated-in-data", _truncate(_weights, lambda n: n - 1000), [], r"outside the file|truncated"),
    ("st-header-length-2^63", _st_header_len(2**63), [], r"header length"),
    ("st-header-length-past-end", _st_header_len(10**7), [], r"header length"),
    ("st-header-not-json", lambda d: _weights(d).write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64),
     [], r"not valid JSON"),
    ("st-header-not-utf8", lambda d: _weights(d).write_bytes(struct.pack("<Q", 8) + b'{"\xff\xfe":1}' + b"\0" * 8),
     [], r"not valid JSON"),
    ("st-header-is-array", lambda d: _weights(d).write_bytes(safetensors_bytes([], b"")), [], r"not a JSON object"),
    ("st-shape-times-dtype-lies", _st_edit(_shape_lie), [], r"bytes but shape"),
    ("st-offsets-out-of-range", _st_edit(_offsets_out), [], r"outside the file"),
    ("st-overlapping-tensors", _st_edit(_overlap), [], r"overlap"),
    ("st-unknown-dtype", _st_edit(_dtype("F8_E4M3")), [], r"unsupported dtype"),
    ("st-negative-dim", _st_edit(lambda h: h[_first_matrix(h)].__setitem__("shape", [-1, 4])), [], r"invalid shape"),
    ("st-dims-product-overflows-int64", _st_edit(_huge_int_dims), [], r"bytes but shape|invalid shape|overflow"),
    ("st-dtype-not-a-string", _st_edit(_dtype_list), [], r"dtype"),
    ("st-deeply-nested-header", lambda d: _weights(d).write_bytes(
        struct.pack("<Q", 400_000) + b"[" * 200_000 + b"]" * 200_000), [], r"JSON"),
    ("config-missing", _remove("config.json"), [], r"no config.json"),
    ("config-bad-json", _write("config.json", "{\"model_type\": \"llama\","), [], r"invalid JSON"),
    ("config-not-utf8", _write("config.json", b"{\"model_type\": \"ll\xffama\"}"), [], r"invalid JSON|UTF-8|utf-8"),
    ("config-int-with-5000-digits", _write("config.json", "{\"hidden_size\": " + "1" * 5000 + "}"), [],
     r"config\.json"),
    ("config-is-a-list", _write("config.json", "[1, 2]"), [], r"JSON object"),
    ("config-unsupported-arch", _edit_config(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]), [],
     r"unsupported architecture"),
    ("config-negative-hidden-size", _edit_config(hidden_size=-64), [], r"hidden_size"),
    ("config-hidden-size-string", _edit_config(hidden_size="64"), [], r"hidden_size"),
    ("config-more-layers-than-weights", _edit_config(num_hidden_layers=3), [], r"lacks|blk\.2"),
    ("config-shape-disagrees", _edit_config(intermediate_size=96), [], r"shape"),
    ("config-heads-not-divisible", _edit_config(num_key_value_heads=3), [], r"multiple"),
    ("index-bad-json", _write("model.safetensors.index.json", "{\"weight_map\": "), [], r"index"),
    ("index-not-utf8", _write("model.safetensors.index.json", b"{\"weight_map\": {\"a\": \"\xff\"}}"), [],
     r"index|UTF-8|utf-8"),
    ("index-missing-shard", _index({"model.embed_tokens.weight": "model-00009.safetensors"}), [], r"missing"),
    ("index-weight-map-list", _index(["model.safetensors"]), [], r"index"),
    ("duplicate-tensor-in-two-shards", _two_shards, [], r"two shards"),
    ("only-pytorch-pickle", _only_pickle, [], r"pickle"),
    ("tokenizer-json-missing", _remove("tokenizer.json"), [], r"tokenizer"),
    ("tokenizer-json-bad-json", _write("tokenizer.json", "{\"model\": {"), [], r"tokenizer\.json"),
    ("tokenizer-json-not-utf8", _write("tokenizer.json", b"{\"model\": \"\xff\"}"), [], r"tokenizer\.json"),
    ("tokenizer-json-is-a-list", _write("tokenizer.json", "[]"), [], r"tokenizer"),
    ("tokenizer-config-bad-json", _write("tokenizer_config.json", "{\"bos_token\": "), [], r"tokenizer_config"),
    ("tokenizer-config-is-a-string", _write("tokenizer_config.json", "\"hello\""), [], r"tokenizer_config"),
    ("nan-weights", _nan_weights, [], r"NaN"),
    ("bad-file-type", lambda d: None, ["--type", "Q9_9"], r"Q9_9|file type"),
    ("bad-tensor-type-regex", lambda d: None, ["--tensor-type", "([=Q8_0"], r"regex"),
    ("bad-tensor-type-name", lambda d: None, ["--tensor-type", "ffn=Q9_9"], r"unknown ggml type"),
]


# ---- GGUF cases ------------------------------------------------------------------------------------------------

def _g(fn: Callable[[RawGGUF], None] | None = None, alignment: int | None = None):
    g = small_gguf(alignment)
    if fn:
        fn(g)
    return g.build()


def _gpatch(field_name: str, fmt: str, value, skip: int = 0, alignment: int | None = None) -> bytes:
    data, off = _g(alignment=alignment)
    return patch(data, off[field_name] + skip, fmt, value)


def _cut(n: int | Callable[[dict], int]) -> bytes:
    data, off = _g()
    return data[:n(off) if callable(n) else n]


_TOKENS = "tokenizer.ggml.tokens"
# (id, file bytes (a thunk), regex the one stderr line must match)
GGUF_CASES: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty-file", lambda: b"", r"not a GGUF file"),
    ("only-magic", lambda: b"GGUF", r"not a GGUF file"),
    ("bad-magic", lambda: b"GGML" + _g()[0][4:], r"magic"),
    ("version-1", lambda: _gpatch("version", "<I", 1), r"version 1"),
    ("version-4", lambda: _gpatch("version", "<I", 4), r"version 4"),
    ("big-endian", lambda: _gpatch("version", ">I", 3), r"big-endian"),
    ("n-tensors-2^60", lambda: _gpatch("n_tensors", "<Q", 2**60), r"tensors"),
    ("n-kv-2^60", lambda: _gpatch("n_kv", "<Q", 2**60), r"metadata entries"),
    ("n-kv-one-too-many", lambda: _gpatch("n_kv", "<Q", len(small_gguf().kv) + 1), r"."),
    ("key-length-2^62", lambda: _gpatch("kv.general.architecture.keylen", "<Q", 2**62), r"string length"),
    ("value-string-length-2^62", lambda: _gpatch("kv.general.architecture.value", "<Q", 2**62), r"string length"),
    ("token-string-length-huge", lambda: _gpatch(f"kv.{_TOKENS}.value", "<Q", 2**40, skip=12), r"string length"),
    ("array-count-2^60", lambda: _gpatch(f"kv.{_TOKENS}.value", "<Q", 2**60, skip=4), r"claims"),
    ("numeric-array-count-huge", lambda: _gpatch("kv.tokenizer.ggml.token_type.value", "<Q", 2**61, skip=4),
     r"claims"),
    ("unknown-value-type", lambda: _gpatch("kv.llama.block_count.type", "<I", 13), r"unknown value type 13"),
    ("unknown-array-element-type", lambda: _gpatch(f"kv.{_TOKENS}.value", "<I", 99), r"unknown value type 99"),
    ("nested-array", lambda: _gpatch(f"kv.{_TOKENS}.value", "<I", 9), r"holds arrays"),
    ("empty-key", lambda: _g(lambda g: g.add("", VT.UINT8, 1))[0], r"empty key"),
    ("duplicate-key", lambda: _g(lambda g: g.add("llama.block_count", VT.UINT32, 2))[0], r"duplicate metadata key"),
    ("key-not-utf8", lambda: _g(lambda g: g.add(b"bad\xffkey", VT.UINT8, 1))[0], r"UTF-8"),
    ("value-not-utf8", lambda: _g(lambda g: g.add("general.name", VT.STRING, b"x\xc3"))[0], r"UTF-8"),
    ("alignment-zero", lambda: _gpatch("kv.general.alignment.value", "<I", 0, alignment=32), r"power of two"),
    ("alignment-not-power-of-2", lambda: _gpatch("kv.general.alignment.value", "<I", 48, alignment=32),
     r"power of two"),
    ("alignment-wrong-type", lambda: _g(lambda g: g.add("general.alignment", VT.UINT64, 32))[0], r"UINT32"),
    ("unknown-ggml-type", lambda: _gpatch("t.blk.0.attn_q.weight.type", "<I", 4), r"unknown ggml type id 4"),
    ("ggml-type-id-huge", lambda: _gpatch("t.blk.0.attn_q.weight.type", "<I", 2**31), r"unknown ggml type"),
    ("n-dims-0", lambda: _gpatch("t.output_norm.weight.n_dims", "<I", 0), r"dimensions"),
    ("n-dims-5", lambda: _gpatch("t.output_norm.weight.n_dims", "<I", 5), r"dimensions"),
    ("dim-zero", lambda: _gpatch("t.blk.0.attn_k.weight.dims", "<Q", 0, skip=8), r"invalid shape"),
    ("dim-2^63", lambda: _gpatch("t.blk.0.attn_k.weight.dims", "<Q", 2**63, skip=8), r"invalid shape"),
    ("element-count-overflows", lambda: _gpatch("t.blk.0.attn_k.weight.dims", "<Q", 2**62, skip=8),
     r"elements|beyond"),
    ("row-not-whole-blocks", lambda: _gpatch("t.blk.0.attn_k.weight.dims", "<Q", 48), r"block size"),
    ("misaligned-tensor-offset", lambda: _gpatch("t.blk.0.attn_k.weight.offset", "<Q", 8, skip=0), r"alignment"),
    ("tensor-offset-past-end", lambda: _gpatch("t.blk.0.ffn_down.weight.offset", "<Q", 2**40), r"beyond the end"),
    ("overlapping-tensors", lambda: _gpatch("t.blk.0.attn_v.weight.offset", "<Q", 0), r"overlap"),
    ("duplicate-tensor-name", lambda: _g(lambda g: g.add_tensor("output_norm.weight", QT.F32, (256,)))[0],
     r"duplicate tensor name"),
    ("tensor-name-too-long", lambda: _g(lambda g: g.add_tensor("x" * 80, QT.F32, (32,)))[0], r"at most 63"),
    ("truncated-after-header", lambda: _cut(24), r"truncated"),
    ("truncated-in-key", lambda: _cut(lambda o: o["kv.general.architecture.keylen"] + 12), r"truncated|string length"),
    ("truncated-in-vocab", lambda: _cut(lambda o: o[f"kv.{_TOKENS}.value"] + 40), r"truncated|claims"),
    ("truncated-in-tensor-table", lambda: _cut(lambda o: o["t.blk.0.attn_q.weight.dims"] + 4), r"truncated"),
    ("truncated-in-data", lambda: _cut(lambda o: o["data.blk.0.ffn_up.weight"] + 10), r"beyond the end"),
]


# ---- a checkpoint big enough that converting it takes a while (for the signal tests) ---------------------------

def make_medium_checkpoint(tiny_dir: Path, out_dir: Path, *, hidden: int = 256, ff: int = 768,
                           layers: int = 4) -> Path:
    """The tiny checkpoint's tokenizer with bigger random llama weights (about 14 MB of float32)."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, head_dim=hidden // 4, tie_word_embeddings=False)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in tiny_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("generation_config.json", "chat_template.jinja"):
            shutil.copy(f, out_dir / f.name)
    rng = np.random.default_rng(0)
    v, hd = cfg["vocab_size"], hidden // 4
    shapes = {"model.embed_tokens.weight": (v, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (v, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (4 * hd, hidden), p + "self_attn.k_proj.weight": (2 * hd, hidden),
                       p + "self_attn.v_proj.weight": (2 * hd, hidden), p + "self_attn.o_proj.weight": (hidden, 4 * hd),
                       p + "mlp.gate_proj.weight": (ff, hidden), p + "mlp.up_proj.weight": (ff, hidden),
                       p + "mlp.down_proj.weight": (hidden, ff)})
    tensors = {n: (1.0 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s))
               .astype(np.float32) for n, s in shapes.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
