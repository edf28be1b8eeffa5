"""HF checkpoint -> GGUF, tensor by tensor.

    plan:   map every checkpoint tensor to its GGUF name, numpy shape and ggml type (per `mixes`), check the
            checkpoint is complete and consistent with config.json, and size the output;
    write:  header, metadata (hyper-parameters, tokenizer, chat template), tensor table, then each tensor read,
            transformed (Q/K permutation), checked for NaN/Inf, quantised and written before the next is read.

Peak memory is one float32 tensor plus its encoding, not the model.
"""

from __future__ import annotations

import logging
import sys
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from . import __version__, arch as archs, fp4, memory, mixes
from .atomic import atomic_output, check_interrupted
from .checkpoint import Checkpoint, resolve_source
from .errors import LlmqError

log = logging.getLogger("llmq.convert")


@dataclass
class TensorPlan:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order: (rows, cols)
    qtype: QT
    read: Callable[[], np.ndarray]  # float32 data in GGUF layout (after permutation)
    scale_of: str | None = None  # for an FP4 tensor scale `<w>.scale`: the weight w it belongs to

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * (self.shape[-1] // block) * size


def _read_transformed(ckpt: Checkpoint, hf_name: str, transform) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        w = ckpt.read(hf_name)
        return transform(w) if transform else w
    return read


def plan_tensors(ckpt: Checkpoint, spec: archs.ArchSpec, hp: archs.HParams, ftype: str,
                 overrides: Sequence[tuple[re.Pattern, QT]] = (), has_imatrix: bool = False) -> list[TensorPlan]:
    tmap = gguf.get_tensor_name_map(spec.gguf_arch, hp.n_layer)
    expected = archs.expected_shapes(spec, hp)
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for hf_name in ckpt.names():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope parameters
        if hp.tied_embeddings and hf_name == "lm_head.weight":
            continue  # a copy of the embeddings some exporters still write
        name = archs.hf_to_gguf_name(tmap, hf_name)
        if name is None or name not in expected:
            raise LlmqError(f"checkpoint tensor {hf_name!r} has no place in a {spec.model_type} model "
                            "(unexpected for this architecture)")
        shape = ckpt.shape(hf_name)
        if shape != expected[name]:
            raise LlmqError(f"tensor {hf_name!r} has shape {list(shape)} but config.json implies "
                            f"{list(expected[name])}")
        found[name] = (hf_name, shape)
    missing = [n for n in expected if n not in found]
    if missing:
        raise LlmqError(f"checkpoint lacks {len(missing)} tensor(s) config.json requires, e.g. {missing[0]!r}")
    shape_info = mixes.ModelShape(hp.n_layer, hp.n_head, hp.n_head_kv, hp.tied_embeddings)
    plans = []
    for name in expected:  # token_embd, output_norm, [output], then layer by layer
        hf_name, shape = found[name]
        qtype = mixes.tensor_type(ftype, name, shape, shape_info, has_imatrix=has_imatrix, overrides=overrides)
        plans.append(TensorPlan(name, shape, qtype,
                                _read_transformed(ckpt, hf_name, archs.tensor_transform(spec, hp, name))))
        if fp4.applies_tensor_scale(spec.arch_name, name, qtype):
            # right after its weight: the value is known once the weight is encoded (see convert's writer loop)
            plans.append(TensorPlan(fp4.scale_tensor_name(name), (1,), QT.F32,
                                    lambda: np.ones(1, np.float32), scale_of=name))
    factors = archs.llama3_rope_factors(hp)
    if factors is not None:
        plans.append(TensorPlan("rope_freqs.weight", factors.shape, QT.F32, lambda f=factors: f))
    return plans


def encode_tensor(w: np.ndarray, qtype: QT, name: str, allow_nonfinite: bool = False,
                  tensor_scales: dict[str, float | None] | None = None) -> np.ndarray:
    """Encode to the bytes ggml stores, as a uint8 array of shape (rows..., row_bytes).

    tensor_scales: names of the planned FP4 tensor scales; an FP4 weight whose `<name>.scale` is among them is
    encoded with a searched tensor scale, which is recorded there."""
    from .quants import quantize

    bad = w.size - int(np.count_nonzero(np.isfinite(w)))
    if bad:
        if not allow_nonfinite:
            raise LlmqError(f"tensor {name} has {bad} NaN/Inf value(s); fix the checkpoint or pass --allow-nonfinite")
        w = np.nan_to_num(w, nan=0.0, posinf=np.finfo(np.float32).max, neginf=-np.finfo(np.float32).max)
    w2 = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, w.shape[-1])
    scale_name = fp4.scale_tensor_name(name) if name.endswith(".weight") else None
    if tensor_scales is not None and qtype in fp4.FP4_TYPES and scale_name in tensor_scales:
        encoded = fp4.quantize(w2, qtype)
        tensor_scales[scale_name] = encoded.tensor_scale
        data = encoded.data
    else:
        data = np.ascontiguousarray(quantize(w2, qtype))
    data = data.view(np.uint8).reshape(*w.shape[:-1], -1)
    return data


def general_metadata(w: gguf.GGUFWriter, config: dict, model_dir: Path, ftype: str) -> None:
    name = str(config.get("_name_or_path") or model_dir.name).rstrip("/").split("/")[-1] or "model"
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(mixes.file_type_id(ftype))
    w.add_string("llmq.version", __version__)
    w.add_string("llmq.file_type", ftype)


@dataclass
class ConvertResult:
    path: Path
    n_tensors: int
    nbytes: int
    types: dict[str, int]  # ggml type name -> tensor count


def convert(src: str | Path, out: str | Path, ftype: str = "F16", *, force: bool = False,
            allow_nonfinite: bool = False, tensor_types: Sequence[str] = (), progress: bool = False,
            method: str = "rtn", calib: str | Path | None = None, calib_samples: int | None = None,
            calib_len: int | None = None, smooth: float | None = None, imatrix_rtn: bool = True,
            act_order: bool = False, max_memory: int | str | None = None,
            auto_fallback: float | None = None, awq_clip: bool = False) -> ConvertResult:
    """Convert the HF checkpoint `src` (directory or hub id) to a GGUF file `out` of file type `ftype`.

    method: 'rtn' (round to nearest with an error-minimising scale search), or a calibrated method 'awq', 'gptq',
    'awq+gptq' (see llmq.calibrate), which need `calib`, a text file. With method 'rtn' and `calib`, the scale
    search is weighted by the collected input importance (llama.cpp's imatrix) unless imatrix_rtn=False.
    smooth: SmoothQuant migration strength folded in before the method (calibrated runs only).
    max_memory: the memory the conversion may use (bytes or '4G'); default: what the machine has available.
    auto_fallback: a bits-per-weight budget spent on upgrading the tensors most sensitive on the calibration text
    (llmq.fallback; needs `calib`)."""
    from . import calibrate
    from .vocab import write_tokenizer

    ftype = mixes.parse_file_type(ftype)
    out = Path(out)
    overrides = parse_tensor_types(tensor_types)
    if method not in calibrate.METHODS:
        raise LlmqError(f"unknown --method {method!r}; choose one of {', '.join(calibrate.METHODS)}")
    if method != "rtn" and calib is None:
        raise LlmqError(f"--method {method} needs calibration text: pass --calib FILE")
    if auto_fallback is not None and calib is None:
        raise LlmqError("--auto-fallback needs calibration text: pass --calib FILE")
    if smooth is not None and calib is None:
        raise LlmqError("--smooth needs calibration text: pass --calib FILE")
    if smooth is not None and not 0.0 <= smooth <= 1.0:
        raise LlmqError(f"--smooth {smooth}: the migration strength must be in [0, 1]")
    calibrated = calib is not None and (method != "rtn" or imatrix_rtn or smooth is not None)
    settings = None
    if calibrated:
        settings = calibrate.CalibSettings(method, Path(calib), calib_samples or calibrate.DEFAULT_SAMPLES,
                                           calib_len or calibrate.DEFAULT_LEN, smooth=smooth, act_order=act_order,
                                           clip=awq_clip)
    model_dir = resolve_source(str(src))
    with Checkpoint(model_dir) as ckpt:
        spec = archs.get_arch(ckpt.config)
        hp = archs.read_hparams(ckpt.config)
        plans = plan_tensors(ckpt, spec, hp, ftype, overrides, has_imatrix=calibrated)
        allocation = None
        if auto_fallback is not None:
            from . import fallback

            tokens = calibrate.calibration_tokens(model_dir, Path(calib), calib_samples or calibrate.DEFAULT_SAMPLES,
                                                  calib_len or calibrate.DEFAULT_LEN)
            allocation = fallback.auto_fallback([p for p in plans if not p.scale_of], spec, hp,
                                                tokens[:fallback.SAMPLES], auto_fallback, progress)
        total = sum(p.nbytes for p in plans)
        need = memory.estimate_convert_peak(ckpt.entries, plans)
        if calibrated:  # hidden states (+ two working copies) and the encoded tensors held until written
            need += 3 * 4 * settings.samples * settings.length * hp.n_embd + total
        memory.check_memory(need, f"converting {model_dir.name} to {ftype}", max_memory)
        if progress:
            print(f"expected peak memory ~{need / memory.MiB:,.0f} MiB", flush=True)

        encoded: dict[str, np.ndarray] = {}
        tensor_scales: dict[str, float | None] = {p.name: None for p in plans if p.scale_of}
        if calibrated:
            tokens = calibrate.calibration_tokens(model_dir, settings.text, settings.samples, settings.length,
                                                  settings.seed)
            encoded = calibrate.quantize_calibrated(
                [p for p in plans if not p.scale_of], spec, hp, tokens, settings, progress=progress,
                encode=lambda w, t, n: encode_tensor(w, t, n, allow_nonfinite, tensor_scales))

        writer = gguf.GGUFWriter(path=None, arch=spec.arch_name)
        general_metadata(writer, ckpt.config, model_dir, ftype)
        writer.add_string("llmq.method", method)
        if settings is not None:
            for key, value in settings.metadata().items():
                if key == "llmq.method":
                    continue
                if isinstance(value, bool):
                    writer.add_bool(key, value)
                elif isinstance(value, int):
                    writer.add_uint32(key, value)
                elif isinstance(value, float):
                    writer.add_float32(key, value)
                else:
                    writer.add_string(key, value)
        if allocation is not None:
            for key, value in allocation.metadata().items():
                (writer.add_float32 if isinstance(value, float) else writer.add_string)(key, value)
        archs.write_hparams(writer, spec, hp)
        write_tokenizer(writer, model_dir, ckpt.config, hp.n_vocab)
        for p in plans:
            writer.add_tensor_info(p.name, (*p.shape[:-1], p.nbytes // max(1, int(np.prod(p.shape[:-1], dtype=np.int64)))),
                                   np.dtype(np.uint8), p.nbytes, raw_dtype=p.qtype)

        with atomic_output(out, force=force, expected_bytes=total + (64 << 20)) as tmp:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            it = plans
            if progress:
                from tqdm import tqdm
                it = tqdm(plans, desc=f"convert {ftype}", unit="tensor", leave=False, disable=not sys.stderr.isatty())
            for p in it:
                check_interrupted()
                data = encoded.pop(p.name, None)
                if data is None and p.scale_of:
                    if tensor_scales[p.name] is None:
                        raise AssertionError(f"{p.name}: no tensor scale recorded for {p.scale_of}")
                    data = np.array([tensor_scales[p.name]], np.float32).view(np.uint8)
                elif data is None:
                    data = encode_tensor(p.read(), p.qtype, p.name, allow_nonfinite, tensor_scales)
                if data.nbytes != p.nbytes:
                    raise AssertionError(f"{p.name}: encoded {data.nbytes} bytes, planned {p.nbytes}")
                writer.write_tensor_data(data)
            writer.close()
    types: dict[str, int] = {}
    for p in plans:
        types[p.qtype.name] = types.get(p.qtype.name, 0) + 1
    return ConvertResult(out, len(plans), out.stat().st_size, types)


def parse_tensor_types(specs: Sequence[str]) -> list[tuple[re.Pattern, QT]]:
    """`--tensor-type REGEX=TYPE` overrides, checked in order (first match wins)."""
    out = []
    for s in specs:
        pattern, sep, tname = s.rpartition("=")
        if not sep or not pattern:
            raise LlmqError(f"--tensor-type {s!r}: expected REGEX=TYPE, e.g. 'ffn_down=Q6_K'")
        try:
            qtype = QT[tname.upper()]
        except KeyError:
            raise LlmqError(f"--tensor-type {s!r}: unknown ggml type {tname!r}") from None
        try:
            out.append((re.compile(pattern), qtype))
        except re.error as e:
            raise LlmqError(f"--tensor-type {s!r}: bad regex ({e})") from None
    return out
