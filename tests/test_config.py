import pytest

from sglang_ams.config import (DEFAULTS, EXTERNAL_NAMES, ConfigError, PolicyConfig, from_external,
                               request_override)

BAD = [
    (dict(policy="fast"), "kv_policy", "one of none, topk, ams, streaming"),
    (dict(scorer="magic"), "kv_scorer", "one of tova"),
    (dict(budget=36), "kv_budget", ">= 37"),             # sink 4 + keep_lastn 32
    (dict(budget=0), "kv_budget", ">= 37"),
    (dict(budget=2.5), "kv_budget", "an integer"),
    (dict(interval=0), "kv_interval", ">= 1"),
    (dict(policy="ams", window=16, interval=8), "kv_interval", ">= ams_window = 16"),
    (dict(delta=0.0), "ams_delta", "(0.0, 1.0]"),
    (dict(delta=1.5), "ams_delta", "(0.0, 1.0]"),
    (dict(delta=float("nan")), "ams_delta", "(0.0, 1.0]"),
    (dict(lmin=64, lmax=32), "ams_lmax", ">= 64"),
    (dict(lmin=0), "ams_lmin", ">= 1"),
    (dict(qmin=-1), "ams_qmin", ">= 0"),
    (dict(sink=-4), "ams_sink", ">= 0"),
    (dict(keep_lastn=-1), "ams_keep_lastn", ">= 0"),
    (dict(window=0), "ams_window", ">= 1"),
    (dict(pool_kernel=4), "ams_pool_kernel", "odd"),
    (dict(credit_decay=1.2), "ams_credit_decay", "[0.0, 1.0]"),
    (dict(mass_mix=-0.1), "ams_mass_mix", "[0.0, 1.0]"),
    (dict(segmenter="valleys"), "ams_segmenter", "equal_mass, fixed_length"),
    (dict(use_credit="yes"), "ams_use_credit", "true or false"),
    (dict(seed=-1), "ams_seed", ">= 0"),
]


@pytest.mark.parametrize("changes,field,valid", BAD)
def test_bad_values_name_field_and_range(changes, field, valid):
    with pytest.raises(ConfigError) as err:
        PolicyConfig(**changes)
    assert err.value.field == field
    assert field in str(err.value) and "--" + field.replace("_", "-") in str(err.value)
    assert valid in str(err.value)


def test_defaults_are_the_reference_hyperparameters():
    c = DEFAULTS
    assert (c.policy, c.delta, c.lmin, c.lmax, c.qmin, c.sink, c.keep_lastn) == ("none", 0.02, 32, 1024, 8, 4, 32)
    assert (c.credit_decay, c.mass_mix, c.budget, c.interval) == (0.8, 0.7, 1024, 512)
    assert c.cap == 1536 and not c.enabled


def test_every_field_has_an_external_name_and_round_trips():
    ext = {EXTERNAL_NAMES[k]: v for k, v in PolicyConfig(policy="ams", budget=512).to_dict().items()}
    assert from_external(ext) == PolicyConfig(policy="ams", budget=512)
    with pytest.raises(ConfigError, match="not a known setting"):
        from_external({"kv_budgett": 3})


def test_request_override():
    base = PolicyConfig(policy="ams", budget=1024)
    assert request_override(base, None) is base
    assert request_override(base, "none").policy == "none"
    assert request_override(base, {"budget": 256}).budget == 256
    with pytest.raises(ConfigError, match="kv_budget"):
        request_override(base, {"budget": 8})
    with pytest.raises(ConfigError, match="a key among"):
        request_override(base, {"delta": 0.1})
    with pytest.raises(ConfigError, match="kv_policy"):
        request_override(base, 42)


def test_needs_queries():
    assert PolicyConfig(policy="ams", scorer="keydiff").needs_queries
    assert not PolicyConfig(policy="topk", scorer="keydiff").needs_queries
    assert PolicyConfig(policy="topk", scorer="tova").needs_queries
    assert not PolicyConfig(policy="streaming").needs_queries
