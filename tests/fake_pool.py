"""A fake SGLang KV pool for the kernel tests and benchmarks/kernels.py: dense K/V scattered over random slots
and pages of per-layer buffers, with a req_to_token table (no SGLang needed)."""
from __future__ import annotations

import dataclasses

import torch
import triton


@dataclasses.dataclass
class FakePool:
    """SGLang-shaped KV storage built from dense tensors: per-layer buffers [slots, H, d] and a req_to_token table."""
    k_buffers: list
    v_buffers: list
    req_to_token: torch.Tensor      # int32 [rows, max_context]
    req_rows: torch.Tensor          # int32 [N]
    lengths: torch.Tensor           # int32 [N]
    page_size: int = 1

    @property
    def k_ptrs(self) -> torch.Tensor:
        return torch.tensor([b.data_ptr() for b in self.k_buffers], dtype=torch.int64, device=self.req_to_token.device)

    @property
    def v_ptrs(self) -> torch.Tensor:
        return torch.tensor([b.data_ptr() for b in self.v_buffers], dtype=torch.int64, device=self.req_to_token.device)

    @property
    def slot_stride(self) -> int:
        return self.k_buffers[0].stride(0)

    def dense(self, which: str = "k", width: int | None = None) -> torch.Tensor:
        """[N, L, H, T, d] view of the pool in position order (positions past a length read slot 0)."""
        buffers = self.k_buffers if which == "k" else self.v_buffers
        width = int(self.lengths.max()) if width is None else width
        slots = self.req_to_token[self.req_rows.long(), :width].long()
        slots = torch.nn.functional.pad(slots, (0, width - slots.shape[1]))     # width may exceed the table
        pos = torch.arange(width, device=slots.device)
        slots = torch.where(pos[None, :] < self.lengths[:, None], slots, torch.zeros_like(slots))
        per_layer = [b[slots].permute(0, 2, 1, 3) for b in buffers]          # [N, H, T, d] each
        return torch.stack(per_layer, dim=1)


def fake_pool(keys: torch.Tensor, lengths: torch.Tensor, values: torch.Tensor | None = None, *,
              page_size: int = 1, spare_pages: int = 3, spare_rows: int = 2, generator=None) -> FakePool:
    """Scatter dense keys/values [N, L, H, T, d] into a fake pool: each request gets a random req_to_token
    row and its positions a random permutation of scattered slots (page_size > 1: scattered pages, position p in
    slot page*page_size + p % page_size, as SGLang's paged allocator does). Slot 0 stays reserved. Free slots,
    and row entries past each length, hold other requests' slots or random data, never zeros."""
    n, num_layers, h, t, d = keys.shape
    device = keys.device
    lens = [int(x) for x in lengths]
    pages_per_req = [triton.cdiv(x, page_size) for x in lens]
    num_pages = 1 + sum(pages_per_req) + spare_pages                  # page 0 reserved
    perm = torch.randperm(num_pages - 1, generator=generator) + 1
    num_rows = n + spare_rows + 1
    rows = torch.randperm(num_rows - 1, generator=generator)[:n] + 1
    max_ctx = t + 5
    # Entries past each length point at random real slots: a kernel that reads them gets wrong answers.
    r2t = torch.randint(1, num_pages * page_size, (num_rows, max_ctx), generator=generator, dtype=torch.int32)
    pos_in_page = torch.arange(t) % page_size
    used = 0
    for i, length in enumerate(lens):
        pages = perm[used:used + pages_per_req[i]]
        used += pages_per_req[i]
        if page_size == 1:
            slots = pages
        else:
            slots = pages.repeat_interleave(page_size)[:length] * page_size + pos_in_page[:length]
        r2t[rows[i], :length] = slots.to(torch.int32)
    r2t = r2t.to(device)
    num_slots = num_pages * page_size

    def scatter(dense):
        buffers = []
        for layer in range(num_layers):
            buf = torch.randn(num_slots, h, d, generator=generator).to(dense.dtype).to(device)
            for i, length in enumerate(lens):
                buf[r2t[rows[i], :length].long()] = dense[i, layer, :, :length].transpose(0, 1)
            buffers.append(buf)
        return buffers

    values = torch.randn(keys.shape, generator=generator).to(keys.dtype).to(device) if values is None else values
    return FakePool(scatter(keys), scatter(values), r2t, rows.to(torch.int32).to(device),
                    torch.tensor(lens, dtype=torch.int32, device=device), page_size)
