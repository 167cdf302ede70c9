"""Fixtures of the engine tests: every test runs under conftest's sglang_context; `recorded` records what the
compactor did."""
from __future__ import annotations

import pytest

from sglang_ams.engine import compactor as compactor_mod
from sglang_ams.engine import sglang_compat as compat
from sglang_ams.engine.compactor import Compactor

from .checks import Group, Item


@pytest.fixture(autouse=True)
def _published_server_args(sglang_context):
    """Every test here runs under conftest's sglang_context."""
    yield


@pytest.fixture
def recorded(monkeypatch):
    """Record every compaction group and the selection `plan` made for it (the real plan still runs)."""
    groups: list = []
    pending: list = []
    real_plan, real_group = compactor_mod.plan, Compactor._compact_group

    def recording_plan(cfg, scorer, inputs, n_pinned, n_keep, credit=None, k_max=None):
        sel = real_plan(cfg, scorer, inputs, n_pinned, n_keep, credit, k_max=k_max)
        pending.append((cfg, inputs, n_pinned.clone(), n_keep.clone(), None if credit is None else credit.clone(), sel))
        return sel

    def recording_group(self, items, layers=None):
        snap = [Item(d.req.rid, compat.pool_idx(d.req), d.length, d.prefix, d.keep, d.pinned) for d in items]
        before = self.rt.counters.decode_lse_launches
        ring_lse = all(d.state.ring_lse for d in items)
        real_group(self, items, layers)
        cfg, inputs, n_pinned, n_keep, credit, sel = pending.pop()
        used = self.rt.counters.decode_lse_launches > before
        groups.append(Group(snap, cfg, inputs, n_pinned, n_keep, credit, sel, used, ring_lse))

    monkeypatch.setattr(compactor_mod, "plan", recording_plan)
    monkeypatch.setattr(Compactor, "_compact_group", recording_group)
    return groups

