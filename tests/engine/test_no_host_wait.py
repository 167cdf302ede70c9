"""A compaction step never makes the host wait for the GPU: no host→device copy from pageable memory.

On a GPU, `torch.tensor(values, device=cuda)` and `cpu_tensor.to(cuda)` wait for every kernel queued before them,
so a step that builds index tensors between its kernel launches runs host and GPU in turns. This CPU test records
the pattern itself (the device here is the CPU, so nothing would wait): a torch.tensor / torch.as_tensor with a
device, made by the engine or the kernels' Python side during a step, other than sglang_ams/transfer.py's pinned,
non-blocking copy; and a CPU tensor's blocking move to another device."""
from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode

from .checks import step
from .harness import MARKS, add_request, make_batch, make_env

pytestmark = MARKS


class BlockingCopies(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        blocking = False
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            blocking = True
        elif func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
            # (on this CPU-only machine a device tensor is a CPU tensor too: only a real move to another device
            # counts, which a GPU run of this test would see)
            target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None))
            blocking = target is not None and torch.device(target).type != "cpu" and not kwargs.get("non_blocking")
        if blocking:
            ours = [f for f in traceback.extract_stack()[:-1]
                    if any(part in f.filename for part in ("/sglang_ams/", "/kernels/", "/patches/"))]
            if ours and not ours[-1].filename.endswith("transfer.py"):
                self.found.append(f"{ours[-1].filename.rsplit('/', 2)[-1]}:{ours[-1].lineno} {ours[-1].line}")
        with torch._C.DisableTorchFunction():
            return func(*args, **kwargs)


def test_a_compaction_step_builds_its_index_tensors_without_a_blocking_copy():
    env = make_env(batch_slack=0.5)
    reqs = [add_request(env, rid, list(range(base, base + 34))) for rid, base in (("a", 2000), ("b", 3000))]
    batch = make_batch(env, reqs)
    steps = 0
    for _ in range(26):
        mode = BlockingCopies()
        with mode:
            report = env.compactor.step(batch)
        if report:
            steps += 1
            assert not mode.found, mode.found
        step(env, batch)               # the decode step between (checked by checks.step)
    assert steps >= 1


def test_to_device_keeps_values_and_dtype():
    from sglang_ams.transfer import to_device
    out = to_device([3, 1, 2], torch.int32, "cpu")
    assert out.dtype == torch.int32 and out.tolist() == [3, 1, 2]
    src = torch.tensor([5, 6], dtype=torch.int64)
    assert to_device(src, torch.int32, torch.device("cpu")).tolist() == [5, 6]
