"""The example scripts' logic on CPU: the frontend programs run against a recording backend (SGLang's own
interpreter, our programs; no server), the Engine example's batch carries valid overrides, counters parse."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from sglang_ams.config import ConfigError, PolicyConfig, request_override

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.sglang_api        # the frontend programs run through SGLang's interpreter


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def frontend():
    return _load("frontend_programs")


@pytest.fixture(scope="module")
def offline():
    return _load("offline_engine")


def recording_backend():
    """A frontend backend that answers every gen with a numbered string and records the prompt and sampling
    params it saw (built on first use: importing SGLang's frontend is slow)."""
    from sglang.lang.backend.base_backend import BaseBackend
    from sglang.lang.chat_template import get_chat_template

    class _Backend(BaseBackend):
        def __init__(self):
            super().__init__()
            self.calls = []
            self.chat_template = get_chat_template("default")

        def get_chat_template(self):
            return self.chat_template

        def generate(self, s, sampling_params):
            self.calls.append((s.text_, sampling_params.max_new_tokens, sampling_params.temperature))
            return f" out{len(self.calls)}", {}

    return _Backend()


def test_frontend_programs_build_the_expected_prompts(frontend):
    backend = recording_backend()
    state = frontend.reasoning.run(question="What is 2+2?", max_tokens=77, backend=backend)
    assert state["answer"] == " out1"
    prompt, max_tokens, temperature = backend.calls[0]
    assert "What is 2+2? Think step by step" in prompt and max_tokens == 77 and temperature == 0

    backend = recording_backend()
    state = frontend.branches.run(question="Q?", num_branches=3, max_tokens=9, backend=backend)
    assert state["best"].startswith(" out")                               # waits for the whole program
    branch_prompts = [c[0] for c in backend.calls[:3]]
    assert all(p.startswith("Q?\n") for p in branch_prompts)           # every fork shares the question prefix
    assert sorted(p.split("\n")[-1] for p in branch_prompts) == ["Approach 1:", "Approach 2:", "Approach 3:"]
    assert state["best"].startswith(" out")

    backend = recording_backend()
    state = frontend.conversation.run(turns=["a", "b"], max_tokens=5, backend=backend)
    assert state["turn1"] == " out2"                                       # reading a variable waits for it
    assert len(backend.calls) == 2 and " out1" in backend.calls[1][0]     # turn 2 sees turn 1's answer

    backend = recording_backend()
    state = frontend.few_shot.run(question="What is 1+1?", backend=backend)
    assert state["answer"] == " out1"
    assert backend.calls[0][0].count("A: 42") == len(frontend.FEW_SHOT)
    assert backend.calls[0][0].endswith("Q: What is 1+1?\nA:")


def test_counters_are_read_per_scheduler(frontend, offline):
    info = {"internal_states": [{"sglang_ams": {"compactions": 3, "tokens_freed": 10, "kept_ratio": 0.5}},
                                {"last_gen_throughput": 1.0}]}
    for module in (frontend, offline):
        assert module.ams_counters(info) == [{"compactions": 3, "tokens_freed": 10, "kept_ratio": 0.5}]
        assert module.ams_counters({}) == []


def test_offline_batch_overrides_are_valid_and_mixed(offline):
    prompts, params = offline.build_batch([f"q{i}" for i in range(8)], budget=256, max_new_tokens=100)
    assert len(prompts) == len(params) == 8
    base = PolicyConfig(policy="ams", budget=256, interval=64)
    overrides = [sp.get("custom_params", {}).get("kv_policy") for sp in params]
    assert overrides[0] == "none" and overrides[1:4] == [None] * 3
    resolved = [request_override(base, o) if o is not None else base for o in overrides]
    assert resolved[0].policy == "none"
    assert {c.budget for c in resolved[4:]} == {128}
    with pytest.raises(ConfigError):                  # the same path rejects a bad budget
        request_override(base, offline.kv_override(budget=2)["custom_params"]["kv_policy"])
