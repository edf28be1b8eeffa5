"""`generate` and `chat` subcommands (registered into llmq's CLI by `register`, or run as `python -m runtime.cli`).
Option names and defaults follow llama.cpp's llama-cli."""

from __future__ import annotations

import argparse
import sys
import time

from llmq.errors import LlmqError

from .kvcache import CACHE_TYPES
from .sampling import Sampler, SamplerParams

ENGINES = ("native", "llama.cpp")


def _common_options(p: argparse.ArgumentParser) -> None:
    d = SamplerParams()
    p.add_argument("model", metavar="MODEL.gguf", help="GGUF file to run")
    p.add_argument("--engine", choices=ENGINES, default="native", help="native runtime or llama-cpp-python")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="context size in tokens (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("-ctk", "--cache-type-k", choices=CACHE_TYPES, default="f16", help="K cache type (default f16)")
    p.add_argument("-ctv", "--cache-type-v", choices=CACHE_TYPES, default="f16", help="V cache type (default f16)")
    p.add_argument("--temp", type=float, default=d.temperature, help=f"temperature, <= 0: greedy ({d.temperature})")
    p.add_argument("--top-k", type=int, default=d.top_k, help=f"top-k, 0: off ({d.top_k})")
    p.add_argument("--top-p", type=float, default=d.top_p, help=f"top-p, 1: off ({d.top_p})")
    p.add_argument("--min-p", type=float, default=d.min_p, help=f"min-p, 0: off ({d.min_p})")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty, help=f"({d.repeat_penalty}, 1: off)")
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n, help=f"({d.repeat_last_n}, -1: all)")
    p.add_argument("-s", "--seed", type=int, default=-1, help="random seed, -1: random (default)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory the run may use, e.g. 2G (default: what the machine has available)")


def register(subparsers) -> None:
    """Add `generate` and `chat` to an argparse subparsers object; each sets `func(args) -> exit code`."""
    g = subparsers.add_parser("generate", help="continue a prompt with a GGUF model",
                              description="Continue a prompt with a GGUF model, streaming the text to stdout.")
    _common_options(g)
    g.add_argument("-p", "--prompt", required=True, help="prompt text (special tokens like <|im_start|> parsed)")
    g.add_argument("-n", "--n-predict", type=int, default=256, help="tokens to generate, -1: until end or context")
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser("chat", help="chat with a GGUF model using its chat template",
                              description="Interactive chat using the model's chat template. /reset, /exit.")
    _common_options(c)
    c.add_argument("-sys", "--system", default=None, help="system message")
    c.add_argument("-n", "--n-predict", type=int, default=-1, help="max tokens per answer, -1: until end")
    c.set_defaults(func=cmd_chat)


def check_run_memory(args) -> None:
    """Say what the run will need before mapping the model, and refuse when the machine cannot hold it."""
    from llmq.memory import MiB, check_memory, estimate_runtime_peak

    need = estimate_runtime_peak(args.model, args.ctx, args.cache_type_k, args.cache_type_v)
    check_memory(need, f"running {args.model} with --ctx {args.ctx}", getattr(args, "max_memory", None))
    print(f"[{args.engine}] expected peak memory ~{need / MiB:,.0f} MiB (weights + KV cache for {args.ctx} tokens "
          f"+ activations)", file=sys.stderr)


def make_engine(args):
    if args.ctx < 1:
        raise LlmqError(f"--ctx must be positive, got {args.ctx}")
    check_run_memory(args)
    if args.engine == "llama.cpp":
        from .llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(args.model, n_ctx=args.ctx, threads=args.threads, cache_type_k=args.cache_type_k,
                              cache_type_v=args.cache_type_v, logits_all=False)
    from .generate import NativeEngine

    return NativeEngine.from_gguf(args.model, n_ctx=args.ctx, threads=args.threads, cache_type_k=args.cache_type_k,
                                  cache_type_v=args.cache_type_v)


def make_sampler(args) -> Sampler:
    return Sampler(SamplerParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                 repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                                 seed=None if args.seed < 0 else args.seed))


def cmd_generate(args) -> int:
    from .generate import generate

    engine = make_engine(args)
    t0 = time.perf_counter()
    stream = generate(engine, args.prompt, make_sampler(args), max_tokens=args.n_predict)
    t_first = None
    for piece in stream:
        if t_first is None:
            t_first = time.perf_counter()
        sys.stdout.write(piece)
        sys.stdout.flush()
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    if stream.finish_reason == "context":
        print(f"[context is full ({engine.n_ctx} tokens); use a larger --ctx]", file=sys.stderr)
    n_gen = len(stream.tokens)
    t_first = t_first or t_end
    print(f"[{engine.name}] prompt {stream.n_prompt} tokens in {t_first - t0:.2f} s, "
          f"generated {n_gen} tokens in {t_end - t_first:.2f} s "
          f"({(n_gen - 1) / max(t_end - t_first, 1e-9):.1f} tok/s)", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from .chat import ChatSession, run_repl

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    session = ChatSession(make_engine(args), make_sampler(args), system=args.system, max_tokens=args.n_predict)
    run_repl(session)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.cli", description="Run GGUF models on the CPU.")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LlmqError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
