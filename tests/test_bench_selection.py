"""benchmarks/selection.py on CPU: the --dry-run checks every row keeps B per (layer, head), that the selection
kernel (under the Triton interpreter here) equals the torch selection, and counts the calls."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "selection.py"


def test_dry_run_rows():
    spec = importlib.util.spec_from_file_location("bench_selection", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = module.main(["--dry-run"])
    assert [(r["policy"], r["requests"]) for r in rows] == [(p, n) for n in (1, 3) for p in ("ams", "ams-triton", "topk")]
    ams = [r["launches"] for r in rows if r["policy"] == "ams"]
    topk = [r["launches"] for r in rows if r["policy"] == "topk"]
    # vectorised over requests: the call count does not grow with N, and AMS costs more calls than top-k
    assert ams[0] == ams[1] and topk[0] == topk[1] and ams[0] > topk[0] > 0
    assert all("gpu_ms" not in r for r in rows)          # no timings on the CPU


def test_dry_run_warps_sweep(monkeypatch):
    """--warps adds a kernel row per warp count, each equal to the torch path (the script asserts it) and each
    launched at that count."""
    spec = importlib.util.spec_from_file_location("bench_selection_warps", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from sglang_ams.kernels import select_ams as kernel
    seen = []
    real = kernel._select_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["num_warps"])
                return real[grid](*args, **kw)
            return launch
    monkeypatch.setattr(kernel, "_select_kernel", Spy())
    rows = module.main(["--dry-run", "--warps", "2,16"])
    assert [r["policy"] for r in rows if r["requests"] == 1] == ["ams", "ams-triton", "ams-triton-w2",
                                                                 "ams-triton-w16", "topk"]
    assert {2, 16} <= set(seen) and kernel._warps(512) == 4           # the shipped rule is back afterwards
