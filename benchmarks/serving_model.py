r"""What `python -m sglang.bench_serving` needs from a dummy-weight model folder and from the client's Python.

    python benchmarks/serving_model.py tokenizer DIR [--vocab-size 32000] [--max-positions 32768]
    python benchmarks/serving_model.py datasets-path        # prints the stand-in `datasets` folder

bench_serving loads a tokenizer even for `--dataset-name random-ids` (it draws ids below `tokenizer.vocab_size`)
and the server detokenizes every streamed chunk (the client counts tokens from the text it gets), so a
config-only folder (../shared/gpu/tools/mkmodel.py) needs a tokenizer whose vocabulary is the model's: a
WordLevel vocabulary of words t0..t{V-1}, split on whitespace, so that decode -> encode gives back the same
number of tokens (generated-shared-prefix builds its prompts that way). The config's vocab_size becomes V.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SHIM = Path(__file__).resolve().parent / "serving_shim"     # holds a stand-in `datasets` package


def word(i: int) -> str:
    return f"t{i}"


def add_tokenizer(model_dir, vocab_size: int = 32000, max_positions: int | None = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json into `model_dir` and fit its config.json to them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    if vocab_size < 16:
        raise ValueError(f"vocab_size {vocab_size} is too small")
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    # t0 doubles as the unknown word; it is not registered as a special token, so decoding never drops it
    tok = Tokenizer(models.WordLevel({word(i): i for i in range(vocab_size)}, unk_token=word(0)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    cfg_path = d / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["vocab_size"] = vocab_size
    for key, default in (("bos_token_id", 1), ("eos_token_id", 2)):      # mkmodel's Llama ids are >= 32000
        ids = cfg.get(key)
        if isinstance(ids, int) and ids >= vocab_size or isinstance(ids, list) and any(i >= vocab_size for i in ids):
            cfg[key] = default
    if max_positions and cfg.get("max_position_embeddings", 0) < max_positions:
        cfg["max_position_embeddings"] = max_positions      # e.g. 512 + 8192 or 16384 + 1024 tokens per request
    cfg_path.write_text(json.dumps(cfg, indent=1))
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "model_max_length": cfg.get("max_position_embeddings", 1 << 20)}
    (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/serving_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="give a model folder a WordLevel tokenizer of --vocab-size words")
    t.add_argument("dir")
    t.add_argument("--vocab-size", type=int, default=32000)
    t.add_argument("--max-positions", type=int, default=None,
                   help="raise the config's max_position_embeddings to at least this")
    sub.add_parser("datasets-path", help="print the folder to put on PYTHONPATH when `import datasets` fails")
    args = p.parse_args(argv)
    if args.cmd == "tokenizer":
        d = add_tokenizer(args.dir, args.vocab_size, args.max_positions)
        cfg = json.loads((d / "config.json").read_text())
        print(f"serving_model: tokenizer of {args.vocab_size} words in {d} "
              f"(vocab_size {cfg['vocab_size']}, max_position_embeddings {cfg.get('max_position_embeddings')})")
    else:
        print(SHIM)
    return 0


if __name__ == "__main__":
    sys.exit(main())
