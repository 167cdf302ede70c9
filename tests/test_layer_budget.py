"""Per-layer budgets: the allocator (sglang_ams/layer_budget.py), the config field and the reference loop."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from sglang_ams.config import ConfigError, PolicyConfig, request_override
from sglang_ams.layer_budget import apportion, engine_refusal, layer_budgets, missed_mass
from sglang_ams.reference import generate_reference

sys.path.insert(0, str(Path(__file__).resolve().parent))      # the tests folder (importlib mode keeps it off)
from reference_oracle import masked_replay, prompt, small_policy, tiny_model  # noqa: E402


def _evidence(n, nl, h, t, seed=0, temperature=None):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, nl, h, t, generator=g)
    if temperature is not None:
        logits = logits / temperature.view(1, nl, 1, 1)
    return torch.softmax(logits, -1)


@pytest.mark.parametrize("seed", range(6))
def test_total_conserved_floors_and_capacity(seed):
    g = torch.Generator().manual_seed(seed)
    n, nl, h, t = 3, 7, 2, 200
    ev = _evidence(n, nl, h, t, seed, temperature=torch.rand(nl, generator=g) * 3 + 0.05)
    lengths = torch.randint(120, t + 1, (n, nl), generator=g)
    pinned = torch.tensor([4, 4, 10])
    budget = torch.tensor([40, 64, 100])
    b = layer_budgets(ev, lengths, pinned, 8, budget)
    assert b.dtype == torch.long and b.shape == (n, nl)
    assert (b.sum(-1) == budget * nl).all()
    assert (b >= torch.ceil(budget * 0.25).long()[:, None]).all()
    assert (b >= (pinned[:, None] + 8)).all()                 # pinned + recent always fit
    assert (b <= lengths).all()
    assert not (b == budget[:, None]).all()                   # the split really differs from uniform


def test_uniform_evidence_gives_the_uniform_split():
    n, nl, h, t = 2, 6, 3, 150
    for ev in (torch.ones(n, nl, h, t), _evidence(1, 1, h, t).expand(n, nl, h, t).contiguous(),
               torch.zeros(n, nl, h, t)):
        b = layer_budgets(ev, torch.full((n, nl), t), torch.tensor([4, 4]), 16, 50)
        assert (b == 50).all()


def test_budget_moves_to_spread_layers_and_is_monotone_in_spread():
    nl, h, t = 4, 2, 300
    base = _evidence(1, 1, h, t, seed=3)[0, 0]
    temps = torch.tensor([0.3, 0.3, 0.3, 0.3])
    shares = []
    for spread in (0.3, 0.6, 1.0, 2.0, 5.0):                     # layer 0 ever more spread, the others fixed
        temps[0] = spread
        ev = torch.softmax(torch.log(base)[None] / temps.view(nl, 1, 1), -1)[None]
        b = layer_budgets(ev, torch.full((1, nl), t), torch.tensor([4]), 16, 60)
        assert int(b.sum()) == 4 * 60
        assert b[0, 1] == b[0, 2] == b[0, 3]                    # identical layers, identical budgets
        shares.append(int(b[0, 0]))
    assert shares == sorted(shares) and shares[-1] > shares[0]
    assert shares[0] == 60                                      # equal spread: uniform


def test_missed_mass_is_what_the_top_tokens_miss():
    ev = torch.tensor([[[[0.0, 0.5, 0.3, 0.2, 9.0]]]])          # the last token is outside C
    comp = torch.tensor([[[False, True, True, True, False]]])
    got = missed_mass(ev, comp, torch.tensor([[1]]))
    assert torch.allclose(got, torch.tensor([[0.5]], dtype=got.dtype))
    assert torch.allclose(missed_mass(ev, comp, torch.tensor([[2]])), torch.tensor([[0.2]], dtype=got.dtype))
    assert missed_mass(ev, comp, torch.tensor([[3]])).abs().max() < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_apportion_is_exact_and_monotone_in_own_weight(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(1, 9, generator=g)
    base = torch.randint(0, 5, (1, 9), generator=g)
    cap = base + torch.randint(0, 40, (1, 9), generator=g)
    total = torch.tensor([int(base.sum()) + 100])
    a = apportion(w, base, cap, total)
    assert int(a.sum()) == min(int(total), int(cap.sum())) and (a >= base).all() and (a <= cap).all()
    for layer in range(9):
        heavier = w.clone()
        heavier[0, layer] *= 1.7
        assert apportion(heavier, base, cap, total)[0, layer] >= a[0, layer]


def test_nonfinite_evidence_does_not_break_the_split():
    ev = _evidence(1, 3, 2, 80)
    ev[0, 1, 0, 10] = float("nan")
    ev[0, 2, 1, 5] = float("inf")
    b = layer_budgets(ev, torch.full((1, 3), 80), torch.tensor([4]), 8, 30)
    assert int(b.sum()) == 90 and (b >= 12).all()


# ----------------------------------------------------------------------------------------------------------------
# The config field

def test_config_field_override_and_engine_refusal():
    cfg = PolicyConfig(policy="topk", scorer="keydiff", layer_budget="adaptive")
    assert cfg.needs_queries                                    # the split reads attention evidence
    assert not PolicyConfig(policy="topk", scorer="keydiff").needs_queries
    with pytest.raises(ConfigError, match="ams_layer_budget"):
        PolicyConfig(layer_budget="pyramid")
    with pytest.raises(ConfigError, match="triattention"):
        PolicyConfig(policy="topk", scorer="triattention", triattention_stats="x.pt", layer_budget="adaptive")
    assert request_override(PolicyConfig(policy="ams"), {"layer_budget": "adaptive"}).layer_budget == "adaptive"
    assert engine_refusal(PolicyConfig()) is None
    err = engine_refusal(cfg)
    assert isinstance(err, ConfigError) and "reference loop only" in str(err) and "--ams-layer-budget" in str(err)


def test_engine_settings_refuse_adaptive():
    from sglang_ams.engine.settings import from_user_values
    assert from_user_values({"kv_policy": "ams"}).policy.layer_budget == "uniform"
    with pytest.raises(ConfigError, match="equal counts|same token count"):
        from_user_values({"kv_policy": "ams", "ams_layer_budget": "adaptive"})


# ----------------------------------------------------------------------------------------------------------------
# The reference loop with per-layer caches

def _deep_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():                                   # layers 1 and 3 attend sharply: spreads differ
        for layer in (1, 3):
            model.model.layers[layer].self_attn.q_proj.weight.mul_(12.0)
    return model


@pytest.mark.parametrize("policy", ["topk", "ams"])
def test_adaptive_loop_keeps_the_total_and_matches_the_masked_full_cache(policy):
    model = _deep_model()
    ids = prompt(40)
    cfg = small_policy(policy, layer_budget="adaptive")
    result = generate_reference(model, ids, cfg, 90)
    assert result.num_compactions >= 3
    assert max(result.kv_lengths) <= cfg.cap
    per_layer_differs = False
    for c in result.compactions:
        counts = (c.kept >= 0).sum(-1)                          # [L, H]
        assert (counts == counts[:, :1]).all()                  # composite slots: heads of a layer keep as many
        assert int(counts[:, 0].sum()) == 4 * cfg.budget        # layers x budget in all
        assert (counts[:, 0] >= cfg.sink + cfg.keep_lastn).all()
        per_layer_differs |= bool((counts[:, 0] != cfg.budget).any())
        valid = c.kept >= 0
        assert (c.kept[..., :cfg.sink] == torch.arange(cfg.sink)).all()
        assert c.kept[valid].max() < c.logical_length
    assert per_layer_differs
    clamped = dataclasses.replace(result, compactions=[dataclasses.replace(c, kept=c.kept.clamp(min=0))
                                                       for c in result.compactions])
    assert masked_replay(model, ids, clamped) == result.token_ids


@pytest.mark.parametrize("policy", ["topk", "ams"])
def test_uniform_field_is_the_default_loop(policy):
    model = tiny_model("llama")
    ids = prompt(40)
    a = generate_reference(model, ids, small_policy(policy), 60)
    b = generate_reference(model, ids, small_policy(policy, layer_budget="uniform"), 60)
    assert a.token_ids == b.token_ids and a.kv_lengths == b.kv_lengths
    assert all(torch.equal(x.kept, y.kept) for x, y in zip(a.compactions, b.compactions))


@pytest.mark.parametrize("policy", ["topk", "ams"])
def test_adaptive_with_a_full_floor_is_the_uniform_loop(policy, monkeypatch):
    """A floor of the whole budget leaves nothing to move: the per-layer path (layers as the batch, own lengths,
    credit transposed) must then keep exactly what the uniform path keeps."""
    import sglang_ams.layer_budget as lb
    monkeypatch.setattr(lb, "FLOOR_FRACTION", 1.0)
    model = _deep_model()
    ids = prompt(40)
    a = generate_reference(model, ids, small_policy(policy), 80)
    b = generate_reference(model, ids, small_policy(policy, layer_budget="adaptive"), 80)
    assert a.num_compactions >= 3
    assert a.token_ids == b.token_ids and a.kv_lengths == b.kv_lengths
    assert all(torch.equal(x.kept, y.kept) for x, y in zip(a.compactions, b.compactions))
