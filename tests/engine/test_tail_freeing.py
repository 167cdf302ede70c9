"""Tail freeing after compaction (compactor.free_tails over kernels.compaction.tail_to_free) against SGLang's real
token and paged allocators: exactly the pages past align_up(keep) go back, once, and the next decode slot still
lands right after the kept tokens."""
from __future__ import annotations

import pytest
import torch
from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.compactor import free_tails

from .harness import MARKS

pytestmark = MARKS


POOL = 1024
# (keep, length): keep and length mid-page, keep page-aligned, nothing dropped, nothing kept, keep and length in
# one page, many pages.
CASES = [(40, 70), (32, 45), (33, 33), (0, 16), (17, 31), (5, 200), (64, 64), (48, 65)]


def allocator_for(page_size: int):
    kv = MHATokenToKVPool(POOL, page_size, torch.bfloat16, 1, 8, 1, device="cpu", enable_memory_saver=False)
    if page_size == 1:
        return TokenToKVPoolAllocator(POOL, torch.bfloat16, "cpu", kv, need_sort=False)
    allocator = PagedTokenToKVPoolAllocator(POOL, page_size, torch.bfloat16, "cpu", kv, need_sort=False)
    allocator.debug_mode = True     # SGLang's own checks: one representative per page, no page free twice
    return allocator


def free_pages(allocator) -> list:
    return compat.free_page_ids(allocator).tolist()


def scattered_rows(allocator, req_pool, lengths, gen) -> list:
    """One req_to_token row per request, over whole pages dealt out in a random order (as a busy pool looks)."""
    ps = allocator.page_size
    counts = [-(-n // ps) for n in lengths]
    pages = allocator.alloc(sum(counts) * ps).view(-1, ps)[torch.randperm(sum(counts), generator=gen)]
    rows, used = list(range(1, len(lengths) + 1)), 0
    for row, n, c in zip(rows, lengths, counts):
        req_pool.req_to_token[row, :n] = pages[used:used + c].reshape(-1)[:n].to(torch.int32)
        used += c
    return rows


@pytest.mark.parametrize("page_size", [1, 16])
def test_free_tails_gives_back_exactly_the_tail_pages(page_size):
    gen = torch.Generator().manual_seed(page_size)
    allocator = allocator_for(page_size)
    req_pool = ReqToTokenPool(size=len(CASES) + 1, max_context_len=256, device="cpu", enable_memory_saver=False)
    keeps, lengths = [k for k, _ in CASES], [n for _, n in CASES]
    rows = scattered_rows(allocator, req_pool, lengths, gen)
    r2t = req_pool.req_to_token
    before = free_pages(allocator)

    freed = free_tails(allocator, r2t, rows, keeps, lengths)

    ps = page_size
    want, kept = [], set()
    for row, keep, n in zip(rows, keeps, lengths):      # plain loops over positions: the reference
        start = -(-keep // ps) * ps
        tail = {int(r2t[row, p]) // ps for p in range(start, n)}
        kept |= {int(r2t[row, p]) // ps for p in range(min(start, n))}
        want.append(tail)
    assert freed == [len(t) * ps for t in want]
    after = free_pages(allocator)
    assert len(set(after)) == len(after), "a page is free twice"
    assert set(before) <= set(after) and set(after) - set(before) == set().union(*want)
    assert not kept & set(after), "a page that still holds kept tokens was freed"
    assert allocator.available_size() == len(after) * ps

    # SGLang's decode allocation after compaction: the next token goes right after the kept ones, in the kept
    # last page when keep is not page-aligned, else in a fresh page.
    if ps > 1:
        live = [j for j, k in enumerate(keeps) if k > 0]
        seq_lens = torch.tensor([keeps[j] + 1 for j in live])
        last_loc = torch.stack([r2t[rows[j], keeps[j] - 1].long() for j in live])
        slots = allocator.alloc_decode(seq_lens, seq_lens, last_loc)
        for j, slot, last in zip(live, slots.tolist(), last_loc.tolist()):
            if keeps[j] % ps:
                assert slot == last + 1, CASES[j]
            else:
                assert slot % ps == 0 and slot // ps in set(after), CASES[j]      # a free page


def test_free_tails_with_nothing_to_free():
    allocator = allocator_for(16)
    req_pool = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    rows = scattered_rows(allocator, req_pool, [20], torch.Generator().manual_seed(0))
    before = allocator.available_size()
    assert free_tails(allocator, req_pool.req_to_token, rows, [20], [20]) == [0]
    assert free_tails(allocator, req_pool.req_to_token, [], [], []) == []
    assert allocator.available_size() == before


@pytest.mark.parametrize("page_size", [1, 16])
def test_free_tails_inside_a_free_group(page_size):
    """Inside SGLang's free group the frees are staged (compat.in_free_group: debug mode then skips its size
    check) and land at free_group_end."""
    allocator = allocator_for(page_size)
    req_pool = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    rows = scattered_rows(allocator, req_pool, [50], torch.Generator().manual_seed(1))
    before = allocator.available_size()
    assert not compat.in_free_group(allocator)
    allocator.free_group_begin()
    assert compat.in_free_group(allocator)
    freed = free_tails(allocator, req_pool.req_to_token, rows, [20], [50])
    assert allocator.available_size() == before and freed == [30 if page_size == 1 else 32]
    allocator.free_group_end()
    assert not compat.in_free_group(allocator) and allocator.available_size() == before + freed[0]
