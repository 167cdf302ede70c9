"""Hostile request bodies against SGLang's real SamplingParams and our hooks, with the policy off and on.

What a client sends in `sampling_params.custom_params` (native /generate types it as a plain dict and does not
check it; the OpenAI endpoints pass their `custom_params` through) reaches SamplingParams.verify in the tokenizer
manager and, unless refused there, the scheduler, where any exception is fatal to the server. Required:
* policy none: every body is accepted unchanged (upstream SGLang without the plugin accepts all of these);
* policy on: a malformed override is a ValueError (HTTP 400) naming custom_params.kv_policy, anything else is
  accepted; whatever verify said, the scheduler-side hooks never raise (also for a body that skipped verify).
"""
from __future__ import annotations

import math
from array import array
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang.srt.sampling.sampling_params")

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.managers.scheduler import Scheduler  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from sglang_ams.config import PolicyConfig  # noqa: E402
from sglang_ams.engine import request_state  # noqa: E402
from sglang_ams.engine import runtime as ams_runtime  # noqa: E402
from sglang_ams.engine import settings as ams_settings  # noqa: E402
from sglang_ams.engine.settings import ENV_VAR, EngineSettings  # noqa: E402
from sglang_ams.patches import sampling_params as sp_hooks  # noqa: E402
from sglang_ams.patches import schedule_policy as policy_hooks  # noqa: E402

NOT_A_DICT = [[1, 2], "abc", "kv_policy", "has kv_policy inside", 5, -1, 1.5, float("nan"), True, False, None,
              10**30, [], [{"kv_policy": "ams"}]]
BAD_OVERRIDES = [
    [1, 2], 5, 1.5, float("nan"), float("inf"), True, 10**30, "", "AMS", "magic", ["ams"], {"ams": 1},
    {1: 2}, {None: "ams"}, {(1, 2): 3}, {"window": 3}, {"policy": ["ams"]}, {"policy": {"x": 1}}, {"policy": 7},
    {"scorer": 5}, {"scorer": "magic"}, {"budget": 8}, {"budget": -1}, {"budget": 0}, {"budget": "512"},
    {"budget": 512.5}, {"budget": 512.0}, {"budget": True}, {"budget": float("nan")}, {"budget": float("inf")},
    {"budget": 10**30}, {"budget": 2**63}, {"budget": 10**5000}, {"budget": None}, {"budget": [512]},
    {"budget": {"nested": [1, {"x": None}]}}, {"interval": 0}, {"interval": -5}, {"interval": 10**19},
    {"interval": 4}, {"policy": "ams", "budget": 2**40},
]
GOOD_OVERRIDES = [None, "none", "ams", "topk", "streaming", {}, {"budget": 512}, {"policy": "topk", "scorer": "tova"},
                  {"policy": "ams", "budget": 96, "interval": 64, "scorer": "keydiff"}, {"policy": "none"}]


def _bodies():
    for custom in NOT_A_DICT:
        yield custom, "accept"
    yield {"other": 1, "thinking_budget": 3}, "accept"
    for ov in GOOD_OVERRIDES:
        yield {"kv_policy": ov, "other": [1, 2]}, "accept"
    for ov in BAD_OVERRIDES:
        yield {"kv_policy": ov}, "refuse"


BODIES = list(_bodies())
SERVERS = {"none": EngineSettings(), "ams": EngineSettings(policy=PolicyConfig(policy="ams"))}


@pytest.fixture
def server(request, monkeypatch):
    """Publish the server's settings (the tokenizer manager reads them from the environment) and, for a policy
    server, a runtime as the scheduler would have one (only what the admission hooks read)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    settings = SERVERS[request.param]
    ams_settings.publish(settings)
    ams_runtime.install(SimpleNamespace(settings=settings, page_size=1) if settings.enabled else None)
    yield settings
    ams_runtime.install(None)
    ams_settings.publish(None)


def _verify(custom):
    """What the tokenizer manager does with a native request's sampling_params, then our AFTER hook."""
    sp = SamplingParams(max_new_tokens=16, custom_params=custom)
    sp.verify(1000)
    return sp, sp_hooks.verify_hook(None, sp, 1000)


def _scheduler():
    """The attributes Scheduler.init_req_max_new_tokens reads (the real method runs as `orig`)."""
    return SimpleNamespace(max_new_tokens_limit=None, max_req_len=4096, page_size=1, max_total_num_tokens=100000,
                           server_args=SimpleNamespace(dcp_size=1))


def _scheduler_side(sp) -> Req:
    """Receipt of the request in the scheduler: Req(), init_req_max_new_tokens (our AROUND hook), the state."""
    req = Req("r", "", array("q", range(1, 40)), sp)
    policy_hooks.init_req_max_new_tokens_hook(Scheduler.init_req_max_new_tokens, _scheduler(), req)
    server = ams_settings.current()
    if server is not None:          # (with the policy off no engine hook is registered: nothing else runs)
        request_state.state_of(req, server.policy)
    return req


@pytest.mark.parametrize("server", ["none", "ams"], indirect=True)
@pytest.mark.parametrize("custom, expected", BODIES, ids=[f"b{i}" for i in range(len(BODIES))])
def test_hostile_bodies(server, custom, expected):
    try:
        sp, result = _verify(custom)
        refused = None
    except ValueError as err:
        sp, refused = SamplingParams(max_new_tokens=16, custom_params=custom), str(err)
    if not server.enabled or expected == "accept":
        assert refused is None, refused
        assert result is None
    else:
        assert refused is not None, f"accepted a malformed override {custom!r}"
        assert refused.startswith("custom_params.kv_policy"), refused
        assert len(refused) < 400
    # The scheduler never raises, whether verify ran or was skipped (Engine paths, a future endpoint).
    req = _scheduler_side(sp)
    st = request_state.existing_state(req)
    if not server.enabled:
        assert st is None
    elif refused is not None:
        assert st is not None and st.cfg == server.policy       # fell back to the server's policy


@pytest.mark.parametrize("server", ["ams"], indirect=True)
def test_good_override_reaches_the_request(server):
    sp, _ = _verify({"kv_policy": {"policy": "topk", "budget": 300}})
    st = request_state.existing_state(_scheduler_side(sp))
    assert st.cfg.policy == "topk" and st.cfg.budget == 300
    sp, _ = _verify({"kv_policy": "none"})
    assert request_state.existing_state(_scheduler_side(sp)) is None


def test_error_messages_stay_short():
    from sglang_ams.config import ConfigError, short_repr
    assert len(str(ConfigError("kv_budget", 10**5000, "an integer"))) < 200
    assert short_repr(math.inf) == "inf" and short_repr("x" * 500).endswith("...")
