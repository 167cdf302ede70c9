"""Host values to the GPU without waiting for it.

`torch.tensor(values, device="cuda")` and `cpu_tensor.to("cuda")` copy from pageable host memory with
non_blocking=False: the host waits until every kernel queued before the copy has run. In a compaction step
that means the scheduler stops at each small index tensor it builds from Python lists until the GPU has caught
up, so host and GPU take turns instead of overlapping. Staging through pinned memory with non_blocking=True
queues the copy in stream order instead; PyTorch's pinned-memory cache keeps the staging block until the copy
has run.
"""
from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """values (a list, or a CPU tensor) as a tensor of dtype on device, without a host wait on a GPU."""
    device = torch.device(device)
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
