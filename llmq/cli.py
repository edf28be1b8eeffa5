"""`llmq` command line: thin wrappers over the library functions.

Every user-facing failure is an `LlmqError`: printed as one line on stderr, exit code 2. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import LlmqError


def _cmd_convert(args) -> int:
    from .convert import convert

    res = convert(args.src, args.output, args.type, force=args.force, allow_nonfinite=args.allow_nonfinite,
                  tensor_types=args.tensor_type, progress=not args.quiet, method=args.method, calib=args.calib,
                  calib_samples=args.calib_samples, calib_len=args.calib_len, smooth=args.smooth,
                  act_order=args.act_order, max_memory=args.max_memory, auto_fallback=args.auto_fallback,
                  awq_clip=args.awq_clip)
    types = ", ".join(f"{n} {t}" for t, n in sorted(res.types.items(), key=lambda kv: -kv[1]))
    print(f"wrote {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.n_tensors} tensors: {types})")
    return 0


def _cmd_inspect(args) -> int:
    from .inspect_gguf import inspect_gguf

    print(inspect_gguf(args.file, show_metadata=not args.tensors_only, max_array=args.max_array))
    return 0


def _cmd_unpack(args) -> int:
    from .unpack import unpack

    out = unpack(args.file, args.outdir, dtype=args.dtype, force=args.force)
    print(f"wrote HF checkpoint {out}")
    return 0


def _cmd_ppl(args) -> int:
    from pathlib import Path

    from . import evaluate as ev

    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmqError(f"cannot read --text {args.text}: {getattr(e, 'strerror', None) or e}") from None
    engine = ev.open_engine(Path(args.model), args.engine, args.ctx, args.threads, args.act_quant)
    tokens, add_bos, bos_id = ev.tokenize_for_ppl(engine, text)
    chunks = ev.make_chunks(tokens, args.ctx, args.chunks, add_bos, bos_id)
    res = ev.evaluate(ev.engine_logits_fn(engine), chunks, save_base=args.save_base and Path(args.save_base),
                      kld_base=args.kld_base and Path(args.kld_base), progress=True)
    print(f"{args.model} [{args.engine}] {len(chunks)} chunks x {args.ctx} tokens, {res.n_tokens} scored")
    print(f"PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}")
    if isinstance(res, ev.KLDResult):
        print(f"PPL(base) = {res.ppl_base:.4f}")
        print(f"KLD mean = {res.kld_mean:.6f} +/- {res.kld_mean_err:.6f}  median = {res.kld_median:.6f}  "
              f"p99 = {res.kld_p99:.6f}  p99.9 = {res.kld_p999:.6f}  max = {res.kld_max:.6f}")
        print(f"same top token = {100 * res.top1:.3f}%  RMS dp = {100 * res.rms_dp:.3f}%")
    return 0


def _cmd_demo(args) -> int:
    from pathlib import Path

    from .demo import run_demo

    run_demo(Path(args.workdir), types=args.types.split(","), chunks=args.chunks, threads=args.threads)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .mixes import FILE_TYPES

    p = argparse.ArgumentParser(prog="llmq", description="Hugging Face checkpoints to llama.cpp GGUF, and a small "
                                "CPU runtime for them.")
    p.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="HF checkpoint (directory or hub id) -> GGUF")
    c.add_argument("src", help="local HF model directory or hub id (owner/name)")
    c.add_argument("-o", "--output", required=True, help="output .gguf path")
    c.add_argument("--type", default="F16", metavar="TYPE", type=str.upper,
                   help=f"file type: {', '.join(FILE_TYPES)} (default F16)")
    c.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="override the type of tensors whose GGUF name matches REGEX (repeatable)")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.add_argument("--allow-nonfinite", action="store_true", help="convert even if weights hold NaN/Inf")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the conversion may use, e.g. 4G (default: what the machine has available)")
    c.add_argument("--method", default="rtn", choices=["rtn", "awq", "gptq", "awq+gptq"],
                   help="quantiser: rtn (default; importance-weighted when --calib is given), awq, gptq, awq+gptq "
                   "(these need --calib)")
    c.add_argument("--calib", metavar="TEXT_FILE", help="calibration text (plain UTF-8)")
    c.add_argument("--calib-samples", type=int, default=None, metavar="N", help="calibration windows (default 64)")
    c.add_argument("--calib-len", type=int, default=None, metavar="L", help="tokens per window (default 512)")
    c.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant migration strength in [0, 1], folded in before the method (needs --calib)")
    c.add_argument("--act-order", action="store_true", help="GPTQ: quantise columns by decreasing importance on "
                   "grids chosen up front (default: natural order, each block's scales chosen when reached)")
    c.add_argument("--awq-clip", action="store_true", help="--method awq: also search per-group clipping ratios "
                   "(llm-awq's auto_clip) scored on the layer output")
    c.add_argument("--auto-fallback", type=float, default=None, metavar="BPW",
                   help="bits-per-weight budget for the whole file: measure each tensor's sensitivity on --calib and "
                   "upgrade the most sensitive ones to higher types while the file stays within BPW")
    c.set_defaults(func=_cmd_convert)

    i = sub.add_parser("inspect", help="show a GGUF file's metadata and tensor table")
    i.add_argument("file")
    i.add_argument("--tensors-only", action="store_true")
    i.add_argument("--max-array", type=int, default=8, help="array elements shown per metadata key")
    i.set_defaults(func=_cmd_inspect)

    u = sub.add_parser("unpack", help="GGUF -> HF checkpoint (safetensors, config.json, tokenizer files)")
    u.add_argument("file")
    u.add_argument("outdir")
    u.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    u.add_argument("--force", action="store_true", help="replace an existing output directory")
    u.set_defaults(func=_cmd_unpack)

    e = sub.add_parser("ppl", help="perplexity (llama-perplexity protocol) and KL divergence vs a saved reference")
    e.add_argument("model", help="GGUF file")
    e.add_argument("--text", required=True, help="plain-text file to score")
    e.add_argument("--engine", default="native", choices=["native", "llama.cpp"])
    e.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    e.add_argument("--chunks", type=int, default=None, help="score at most N chunks")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--save-base", metavar="F", help="store this model's log-probs (top-64 fp16 + rest) as the reference")
    e.add_argument("--kld-base", metavar="F", help="compare with a reference saved by --save-base")
    e.add_argument("--act-quant", default="none", choices=["none", "int8-token"],
                   help="native engine: round every linear's input to int8 per token (W8A8-style serving)")
    e.set_defaults(func=_cmd_ppl)

    d = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M-Instruct, end to end")
    d.add_argument("--workdir", default="llmq-demo", help="where files go (default ./llmq-demo)")
    d.add_argument("--types", default="Q8_0,Q4_K_M,Q4_0,Q3_K_M")
    d.add_argument("--chunks", type=int, default=8, help="perplexity chunks of 512 tokens per file and engine")
    d.add_argument("--threads", type=int, default=None)
    d.set_defaults(func=_cmd_demo)

    from . import benchmark, compare, verify

    verify.register(sub)
    compare.register(sub)
    benchmark.register(sub)

    try:
        from runtime import cli as runtime_cli
    except ImportError:
        runtime_cli = None
    if runtime_cli is not None and hasattr(runtime_cli, "register"):
        runtime_cli.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="llmq: %(message)s")
    try:
        return int(args.func(args) or 0)
    except LlmqError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("llmq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
