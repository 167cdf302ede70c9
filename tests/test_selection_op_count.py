"""A structural guard on how many torch operations one selection call dispatches.

On a GPU the selection of a compaction chunk is host-bound: each dispatched operation costs its Python and
dispatcher time (and usually a kernel launch) whatever the tensor size, and measured on an H200 that host time far
exceeds the GPU work. The count does not depend on the batch, so it is checked here on the CPU on a tiny input; it
is a regression guard, not a timing: raise the limit only for a change that needs the extra operations.
"""
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglang_ams.config import PolicyConfig
from sglang_ams.selection import select_ams, select_topk

AMS_OPS = 174          # measured 2026-12 (284 before the selection arithmetic was tightened)
TOPK_OPS = 30          # (49 before)
KERNEL_OPS = 5         # --ams-selection triton: keep counts and three outputs, besides the one launch
MARGIN = 8


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any("triton/runtime/interpreter" in f.filename for f in traceback.extract_stack()):
            self.ops += 1           # (what the Triton interpreter dispatches itself does not exist on a GPU)
        return func(*args, **(kwargs or {}))


def _inputs(n=3, layers=2, heads=2, t=96):
    g = torch.Generator().manual_seed(0)
    shape = (n, layers, heads, t)
    scores = torch.randn(shape, generator=g)
    evidence = torch.rand(shape, generator=g) ** 4
    credit = torch.rand(shape, generator=g) / t
    return scores, evidence, credit, torch.full((n,), t), torch.full((n,), 4), torch.full((n,), 40)


def _ops(fn) -> int:
    mode = _Count()
    with mode:
        fn()
    return mode.ops


def test_select_ams_op_count():
    scores, evidence, credit, lengths, pinned, keep = _inputs()
    cfg = PolicyConfig(policy="ams", budget=40)
    ops = _ops(lambda: select_ams(scores, evidence, lengths, pinned, keep, cfg, credit, k_max=40))
    assert ops <= AMS_OPS + MARGIN, f"select_ams dispatches {ops} torch operations (guard: {AMS_OPS} + {MARGIN})"


def test_select_topk_op_count():
    scores, _, _, lengths, pinned, keep = _inputs()
    ops = _ops(lambda: select_topk(scores, lengths, pinned, keep, 32, k_max=40))
    assert ops <= TOPK_OPS + MARGIN, f"select_topk dispatches {ops} torch operations (guard: {TOPK_OPS} + {MARGIN})"


def test_select_ams_kernel_op_count():
    scores, evidence, credit, lengths, pinned, keep = _inputs()
    cfg = PolicyConfig(policy="ams", budget=40)
    ops = _ops(lambda: select_ams(scores, evidence, lengths, pinned, keep, cfg, credit, k_max=40, kernel=True))
    assert ops <= KERNEL_OPS + 2, f"the selection kernel's call dispatches {ops} torch operations"
