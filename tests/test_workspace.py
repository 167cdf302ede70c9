"""The compaction step's memory bound: the planner's chunks for extreme groups, and the startup bound."""
import random

import pytest

from sglang_ams.compaction import scorer_for
from sglang_ams.config import SCORERS, PolicyConfig
from sglang_ams.engine import workspace

LLAMA_8B = dict(num_kv_heads=8, group=4, head_dim=128, elem_size=2)
QWEN_7B = dict(num_kv_heads=4, group=7, head_dim=128, elem_size=2)


def _cost(cfg, dims):
    return workspace.chunk_cost(cfg, scorer_for(cfg), **dims)


def _check(lengths, layers, cost, bound):
    chunks = workspace.plan_chunks(lengths, layers, cost, bound)
    covered = {}
    for c in chunks:
        assert c.tokens == max(lengths[i] for i in c.members)
        assert cost.bytes(len(c.members), len(c.layers), c.tokens) <= bound, c
        assert len(c.members) == 1 or len(c.layers) == layers     # only a lone request is split by layers
        for i in c.members:
            covered.setdefault(i, []).extend(c.layers)
    assert sorted(covered) == list(range(len(lengths)))
    assert all(v == list(range(layers)) for v in covered.values()), "every layer once, in order"
    return chunks


@pytest.mark.parametrize("dims", [LLAMA_8B, QWEN_7B])
@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("policy", ["topk", "ams"])
def test_chunks_stay_inside_the_bound(dims, scorer, policy):
    cfg = PolicyConfig(policy=policy, scorer=scorer)
    cost = _cost(cfg, dims)
    rng = random.Random(hash((scorer, policy)) & 0xFFFF)
    context = 131072
    bound = workspace.auto_bound(workspace.smallest_chunk(cfg, context_len=context, **dims), 100 << 30)
    groups = [[context] * 3, [1600] * 1000, [rng.randint(1536, context) for _ in range(300)], [1536], [context]]
    for lengths in groups:
        chunks = _check(lengths, 32, cost, bound)
        assert len(chunks) <= len(lengths) * 32
    # A generous bound runs a small group in one chunk; a bound of one layer splits every long request fully.
    assert len(_check([2000] * 4, 32, cost, 1 << 50)) == 1
    one_layer = cost.bytes(1, 1, 20000)
    assert len(_check([20000, 20000], 32, cost, one_layer)) == 64


def test_smallest_chunk_covers_every_reachable_config():
    server = PolicyConfig(policy="ams")
    smallest = workspace.smallest_chunk(server, context_len=32768, **LLAMA_8B)
    for cfg in workspace.reachable_configs(server):
        assert _cost(cfg, LLAMA_8B).bytes(1, 1, 32768) <= smallest
    # A query-free server cannot be asked for query-reading configs (no ring), so its bound may be smaller.
    keyonly = PolicyConfig(policy="topk", scorer="keydiff")
    assert all(not c.needs_queries for c in workspace.reachable_configs(keyonly))
    # An interval below the window is valid without queries; the query-reading combinations it rules out are
    # skipped, not raised while the server sizes its pool (they were, for this valid command line).
    short = PolicyConfig(policy="topk", scorer="keydiff", interval=4)
    assert all(not c.needs_queries for c in workspace.reachable_configs(short))
    assert workspace.smallest_chunk(short, context_len=32768, **LLAMA_8B) > 0
    assert workspace.auto_bound(smallest, 100 << 30) == 2 << 30        # 2 % of the KV budget
    assert workspace.auto_bound(smallest, 1 << 30) == smallest          # never below one context-length layer


def test_operator_bound_below_the_smallest_chunk_is_refused():
    from sglang_ams.engine.runtime import Unsupported
    from sglang_ams.engine.settings import EngineSettings
    from sglang_ams.patches.mem_cache import workspace_bound
    settings = EngineSettings(policy=PolicyConfig(policy="ams"), workspace_mib=1)
    with pytest.raises(Unsupported, match="--ams-workspace-mib 1 is below"):
        workspace_bound(settings, LLAMA_8B, 32768, 100 << 30)
    assert workspace_bound(settings.__class__(policy=settings.policy, workspace_mib=4096), LLAMA_8B, 32768,
                           100 << 30) == 4096 << 20


def test_credit_is_reserved_as_a_share_of_the_pool():
    from sglang_ams.patches.mem_cache import credit_fraction
    # fp32 credit per kept (token, layer, KV head) against bf16 K and V of head_dim 128: 4 / 512 of the pool
    assert credit_fraction(LLAMA_8B) == 4 / 512
