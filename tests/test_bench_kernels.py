"""benchmarks/kernels.py on CPU: its byte math, grid filter and a --dry-run through the interpreter."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_byte_formulas(bench):
    llama = bench.MODELS[0]
    assert (llama.layers, llama.kv_heads, llama.head_dim, llama.group) == (32, 8, 128, 4)
    assert llama.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2                      # 128 KiB per token
    assert bench.compaction_formula_bytes(llama, requests=2, kept=1024) == 2 * 2 * 1024 * 32 * 8 * 128 * 2 * 2
    # every (n, l, h, j) moving is exactly the formula
    assert bench.compaction_moved_bytes(2 * 1024 * 32 * 8, llama) == bench.compaction_formula_bytes(llama, 2, 1024)
    assert bench.scoring_bytes(llama, 1, 8192) == 2 * bench.scoring_bytes(llama, 1, 8192, passes=1)
    assert bench.scoring_bytes(llama, 1, 8192, passes=1) == 8192 * 32 * 8 * 128 * 2


def test_grid_skips_what_does_not_fit(bench):
    rows = bench.grid_rows(bench.MODELS, bench.FULL_GRID, 60e9)
    for _, model, tokens, kept, requests in rows:
        assert bench.kv_bytes(model, requests, tokens) <= 60e9
        assert kept is None or kept < tokens
    llama = [r for r in rows if r[1].name == "llama3-8b" and r[0] == "scoring"]
    assert max(r[4] for r in llama if r[2] == 32768) == 8            # 16 x 32k x 128 KiB = 68.7 GB: skipped
    assert {r[0] for r in rows} == {"scoring", "scoring_lse", "compaction"}


def test_inputs_are_valid(bench):
    g = torch.Generator().manual_seed(0)
    table = bench.scattered_rows(3, 40, slots=16 * 12, page=16, device="cpu", generator=g)
    used = table[1:].flatten()
    assert used.unique().numel() == used.numel() and int(used.min()) >= 16      # distinct; page 0 reserved
    assert torch.equal(table[1:] % 16, (torch.arange(40) % 16).expand(3, 40).int())
    keep = bench.stratified_keep(2, bench.TINY, tokens=100, kept=30, device="cpu", generator=g)
    assert keep.shape == (2, bench.TINY.layers, bench.TINY.kv_heads, 30)
    assert bool((keep[..., 1:] > keep[..., :-1]).all()) and int(keep.max()) < 100
    assert bool((keep >= torch.arange(30)).all())


def test_dry_run_writes_a_report(bench, tmp_path):
    out = tmp_path / "kernels.json"
    report = bench.main(["--dry-run", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["dry_run"] and saved["rows"] and saved["device"] == report["device"]
    for key in ("date", "git_commit", "command", "copy_gbps", "settings", "check"):
        assert key in saved
    assert saved["check"]["compaction_exact"] and saved["check"]["scoring_max_abs_err"] < 1e-4
    assert {r["kernel"] for r in saved["rows"]} == {"scoring", "scoring_lse", "compaction"}


def test_default_output_name(bench):
    args = bench.parse_args(["--quick"])
    path = bench.output_path(args, torch.device("cpu"))
    assert path.parent == bench.RESULTS_DIR and path.name.startswith("kernels-") and path.suffix == ".json"


def test_same_size_copy_scales_beyond_its_buffers(bench, monkeypatch):
    def one_second(fn, warmup, reps, flush):
        fn()
        return 1.0
    monkeypatch.setattr(bench, "time_cuda", one_second)
    copy = bench.SameSizeCopy(torch.device("cpu"), max_bytes=400)          # 100 bf16 elements per buffer
    assert copy.seconds(200, 1, 1, None) == 1.0                             # 50 elements: fits, copied once
    assert torch.equal(copy.dst[:50], copy.src[:50]) and not torch.equal(copy.dst[50:], copy.src[50:])
    assert copy.seconds(4000, 1, 1, None) == 10.0                           # 1000 elements: 10 x the buffer
