"""The process's settings: published once by the launcher, parsed once from the environment in a child process;
the per-request verify hooks never parse the JSON again."""
import os
from types import SimpleNamespace

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import settings as ams_settings
from sglang_ams.engine.settings import ENV_VAR, EngineSettings

SERVER = EngineSettings(policy=PolicyConfig(policy="ams", budget=512))


def test_environment_json_is_parsed_once(monkeypatch):
    from sglang_ams.patches import beam_search, sampling_params
    parsed = []
    real = EngineSettings.from_json.__func__
    monkeypatch.setattr(EngineSettings, "from_json", classmethod(lambda cls, text: parsed.append(text)
                                                                 or real(cls, text)))
    ams_settings.publish(None)
    monkeypatch.setenv(ENV_VAR, SERVER.to_json())         # what a spawned scheduler process inherits
    try:
        for _ in range(50):
            sampling_params.verify_hook(None, SimpleNamespace(custom_params={"kv_policy": {"budget": 256}}))
            beam_search.verify_hook(None, SimpleNamespace(beam_width=1))
        assert ams_settings.current() == SERVER and len(parsed) == 1
        ams_settings.publish(SERVER)                        # the launcher's own object: nothing to parse
        assert ams_settings.current() is SERVER and len(parsed) == 1
    finally:
        ams_settings.publish(None)
    assert ams_settings.current() is None and ENV_VAR not in os.environ
