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
                  tensor_types=args.tensor_type, progress=not args.quiet)
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
