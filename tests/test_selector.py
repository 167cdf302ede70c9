"""The selector registry: one class per policy, its fields from the PolicyConfig, its declared inputs, and the same
selection the functions of selection.py make."""
import dataclasses

import pytest
import torch

from sglang_ams.compaction import plan, scorer_for
from sglang_ams.config import POLICIES, PolicyConfig
from sglang_ams.scorers.base import Inputs, ScoreInputs
from sglang_ams.selection import select_ams, select_topk
from sglang_ams.selector import AMS, SELECTORS, Streaming, TopK
from sglang_ams.window_attention import attention_evidence, window_attention


def test_registry_is_the_policy_list():
    assert POLICIES == ("none", "topk", "ams", "streaming")
    assert [SELECTORS[p] for p in POLICIES[1:]] == [TopK, AMS, Streaming]
    assert PolicyConfig().selector is None and PolicyConfig().inputs == Inputs()


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_selector_fields_come_from_the_config(policy):
    cfg = PolicyConfig(policy=policy, keep_lastn=7, delta=0.05, qmin=3, use_credit=False)
    sel = cfg.selector
    assert type(sel) is SELECTORS[policy]
    assert all(getattr(sel, f.name) == getattr(cfg, f.name) for f in dataclasses.fields(sel))
    assert sel.keep_lastn == 7 and not sel.uses_credit


def test_declared_inputs():
    assert PolicyConfig(policy="streaming", scorer="tova").scorer_name == "streaming"
    assert PolicyConfig(policy="streaming", scorer="tova").inputs == Inputs()
    assert PolicyConfig(policy="topk", scorer="tova").inputs == Inputs(last_row=True)
    assert PolicyConfig(policy="ams", scorer="keydiff").inputs == Inputs(keys=True, queries=True, attention=True)
    # The mass ablation reads no attention but still waits for a window of queries (as before).
    no_mass = PolicyConfig(policy="ams", scorer="keydiff", use_mass=False)
    assert no_mass.inputs == Inputs(keys=True, queries=True) and no_mass.needs_queries
    assert PolicyConfig(policy="topk", scorer="triattention", triattention_stats="s.pt").inputs == \
        Inputs(keys=True, rope=True, positions=True)
    assert (Inputs(keys=True) | Inputs(last_row=True)) == Inputs(keys=True, last_row=True)


def _inputs():
    g = torch.Generator().manual_seed(0)
    n, nl, h, hq, t, w, d = 2, 2, 2, 4, 96, 4, 8
    lengths = torch.tensor([96, 70])
    keys = torch.randn(n, nl, h, t, d, generator=g)
    queries = torch.randn(n, nl, hq, w, d, generator=g)
    return ScoreInputs(keys=keys, values=torch.randn(n, nl, h, t, d, generator=g), lengths=lengths,
                       queries=queries, query_pos=lengths[:, None] - w + torch.arange(w)[None])


@pytest.mark.parametrize("policy", POLICIES[1:])
def test_plan_is_the_selection_functions(policy):
    cfg = PolicyConfig(policy=policy, scorer="snapkv", budget=40, interval=8, window=4, keep_lastn=8, sink=4,
                       lmin=4, lmax=32, qmin=2)
    inputs = _inputs()
    n_pinned, n_keep = torch.tensor([4, 4]), torch.tensor([40, 40])
    credit = torch.rand(2, 2, 2, 96, generator=torch.Generator().manual_seed(1))
    got = plan(cfg, scorer_for(cfg), inputs, n_pinned, n_keep, credit, k_max=40)
    scores = scorer_for(cfg).score(inputs)
    if policy == "ams":
        evidence = attention_evidence(window_attention(inputs.keys, inputs.queries, inputs.lengths), 2,
                                      cfg.pool_kernel)
        want = select_ams(scores, evidence, inputs.lengths, n_pinned, n_keep, cfg, credit, k_max=40)
        assert torch.equal(got.credit, want.credit)
    else:
        want = select_topk(scores, inputs.lengths, n_pinned, n_keep, cfg.keep_lastn, k_max=40)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.n_keep, want.n_keep)


def test_selection_bytes():
    assert TopK().transient_bytes(4) == Streaming().transient_bytes(4) == 48
    assert AMS().transient_bytes(4) == 160 + 4 * 4 + 4 + 4
    assert AMS(use_mass=False, use_credit=False).transient_bytes(4) == 160
