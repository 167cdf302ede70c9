"""Compaction bookkeeping over two compactions, and the prefill window."""
from __future__ import annotations

import pytest
import torch

from sglang_ams.engine import request_state
from sglang_ams.engine import sglang_compat as compat

from .checks import compacted, step
from .harness import CFG, MARKS, SHARED, add_request, cache_prefix, make_batch, make_env, prefill

pytestmark = MARKS


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_compaction_bookkeeping(page_size, dtype):
    """Three requests (below the cap, above it, above it behind a pinned radix prefix) decoded through two
    compactions; `step` checks every compaction, this test pins down when they happen and what they free."""
    env = make_env(page_size=page_size, dtype=dtype)
    cache_prefix(env, SHARED)
    # short: 16-token prefix shared with `pinned` (tree), stays below its trigger (cap 72, ring from 64).
    short = add_request(env, "short", SHARED[:16] + list(range(3000, 3014)), pinned=16)
    # long: no prefix, cap 56; ring from length 48, so it compacts at exactly 56 (drops 16).
    long = add_request(env, "long", list(range(2000, 2046)))
    # pinned: 32-token page-aligned prefix, cap 88, already past cap - window when it may first take a ring
    # row (length 86), so it compacts 8 queries later at 94 (drops 22); keep = 72 is not page-aligned.
    pinned = add_request(env, "pinned", SHARED + list(range(4000, 4052)), pinned=32)
    batch = make_batch(env, [short, long, pinned])
    prefix_before = {r.rid: env.r2t[compat.pool_idx(r), :compat.protected_len(r)].clone() for r in (short, pinned)}
    short_row = env.r2t[compat.pool_idx(short)].clone()

    history = []
    for _ in range(27):
        last = step(env, batch)
        history.append(compacted(last))
        if len(history) in (3, 9):      # rings: long takes its row at 48, pinned at 86 (both at step 3)
            st = request_state.existing_state(long)
            assert st.ring_row and st.ring_start == 48 and int(env.rt.ring.row_of[compat.pool_idx(long)]) == st.ring_row
            assert request_state.existing_state(pinned).ring_start == 86
    first, second = history[10], history[26]
    assert all(not h for i, h in enumerate(history) if i not in (10, 26)), history
    assert first == {"long": (56, 40), "pinned": (94, 72)}
    assert second == {"long": (56, 40), "pinned": (88, 72)}      # the second one from the ring at cap - window
    assert len(last.chunks) == 1                                 # both requests in one launch
    # (c) freed: page 1 every dropped slot (16 + 22, then 16 + 16); page 16 only whole pages past
    # align_up(keep): 56 -> 40 frees [48, 64), 94 -> 72 frees [80, 96); then [48, 64) and [80, 96) again.
    assert env.freed == ([38, 32] if page_size == 1 else [32, 32])

    # (d, e) offsets accumulate over the two compactions.
    assert env.dropped == {"short": 0, "long": 32, "pinned": 38}
    for r in (long, pinned):
        assert request_state.existing_state(r).compactions == 2
    # (b) the pinned prefixes never moved, (f) the request below its cap is untouched, row and state.
    for r in (short, pinned):
        assert torch.equal(env.r2t[compat.pool_idx(r), :compat.protected_len(r)], prefix_before[r.rid])
    assert torch.equal(env.r2t[compat.pool_idx(short), :30], short_row[:30])
    st = request_state.existing_state(short)
    assert st.pos_offset == 0 and not st.compacted and st.ring_row == 0
    assert compat.committed_len(short) == 30 + 27
    # After compaction the next decode token lands right after the kept tokens, in the kept last page.
    if page_size > 1:
        row = compat.pool_idx(long)       # keep = 40: positions 40.. share the page of position 39
        assert int(env.r2t[row, 40]) == int(env.r2t[row, 39]) + 1

def test_prefill_window_compacts_two_steps_after_prefill():
    """Prompts already past their trigger take a ring row at prefill and compact after MIN_DECODE_STEPS decode
    steps on the prompt's last queries (`step` checks the window against the queries the prefill wrote; scoring
    recomputes the LSE: the prefill gave none); the second compaction is an ordinary one (decode window, decode
    LSE). A prompt below its trigger and a request without a policy take no row (the latter's prompt tail goes to
    the trash row)."""
    env = make_env(policy=CFG.replace(prefill_window=True))
    cache_prefix(env, SHARED)
    long = add_request(env, "long", list(range(2000, 2080)))                     # 80 >= cap 56 - W
    pinned = add_request(env, "pinned", SHARED + list(range(4000, 4060)), pinned=32)   # 92 >= 88 - W
    short = add_request(env, "short", list(range(3000, 3020)))                   # 20 < 48: decode rows later
    off = add_request(env, "off", list(range(5000, 5090)), override="none")
    trash_before = env.rt.ring.buf[:, 0].clone()
    assert prefill(env, [long, pinned, short, off]) == 2
    st = {r.rid: request_state.state_of(r, env.rt.settings.policy) for r in (long, pinned, short, off)}
    assert (st["long"].ring_start, st["pinned"].ring_start) == (72, 84) and not st["long"].ring_lse
    assert st["short"].ring_row == 0 and st["off"] is None
    assert not torch.equal(env.rt.ring.buf[:, 0], trash_before)          # the other prompts' tails went there
    for r in (long, pinned):                                            # the prompt's last W queries, by slot
        for pos in range(compat.committed_len(r) - CFG.window, compat.committed_len(r)):
            assert torch.equal(env.rt.ring.buf[:, st[r.rid].ring_row, pos % CFG.window], env.queries[r.rid][pos])

    batch = make_batch(env, [long, pinned, short, off])
    runs = [step(env, batch) for _ in range(20)]
    history = [compacted(report) for report in runs]
    assert history[2] == {"long": (82, 40), "pinned": (94, 72)}, history    # decode steps 2: 80 + 2, 92 + 2
    assert not any(history[:2])
    assert [(g.ring_lse, g.decode_lse) for g in runs[2].chunks] == [(False, False)]    # no LSE from the prefill
    later = [report for report in runs[3:] if report]
    assert later and all(g.ring_lse and g.decode_lse for report in later for g in report.chunks)
    assert history[18] == {"long": (56, 40), "pinned": (88, 72)}    # the second: decode windows at the trigger
