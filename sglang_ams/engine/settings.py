"""Server-level settings of the plugin: the policy plus the few knobs that only the engine has.

They reach a scheduler process once, as JSON in the environment variable AMS_KV_CONFIG, parsed when the plugin
registers its hooks at process start (before SGLang hands it the ServerArgs); the copy attached to ServerArgs
(pickled with it) is only compared against them at scheduler start.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from ..config import EXTERNAL_NAMES, ConfigError, PolicyConfig
from ..layer_budget import engine_refusal
from ..settings_fields import Choice, Flag, Int, Number, flag_table, setting, specs
from ..settings_fields import validate as validate_fields

ENV_VAR = "AMS_KV_CONFIG"
PROMPT_CACHE_MODES = ("private", "cached")
SCORING_LSE_MODES = ("decode", "recompute")
RING_STORES = ("torch", "triton")
SELECTIONS = ("torch", "triton")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    policy: PolicyConfig = PolicyConfig()
    prompt_cache: str = setting("private", "ams_prompt_cache", "private: the prompt is compressible and not inserted "
                                "into the radix tree; cached: it is shared through the radix tree and pinned, only "
                                "generated tokens are compressed", Choice(PROMPT_CACHE_MODES))
    ring_rows: int = setting(0, "ams_ring_rows", "rows of the query ring (requests collecting window queries at "
                             "once); 0 sizes it from the KV pool", Int(0, note=" (0 = automatic)"))
    debug_checks: bool = setting(False, "ams_debug_checks", "assert the bookkeeping after every compaction and check "
                                 "decode-LSE scoring against the two-pass kernel (slow; testing)", Flag())
    scoring_lse: str = setting("decode", "ams_scoring_lse", "decode: window attention takes each window query's "
                               "log-sum-exp from the decode attention (keys read once); recompute: the scoring "
                               "kernel computes it (keys read twice)", Choice(SCORING_LSE_MODES))
    ring_store: str = setting("triton", "ams_ring_store", "how a decode step puts each layer's queries (and their "
                              "LSE) into the query ring: triton: one kernel per layer that stores only for "
                              "requests holding a row; torch: two indexed stores per layer for every request, "
                              "those without a row into a trash row (4-13x the GPU time inside a decode graph on "
                              "an H200)", Choice(RING_STORES))
    selection: str = setting("triton", "ams_selection", "how a compaction step selects AMS's kept tokens: torch: "
                             "~180 tensor operations per chunk; triton: one kernel, a program per (request, layer, "
                             "KV head) row of up to 4096 tokens, the same result bit for bit (longer rows take the "
                             "torch path)", Choice(SELECTIONS))
    batch_slack: float = setting(0.5, "ams_batch_slack", "a request this fraction of its interval short of its "
                                 "trigger compacts in the same step as a request at its trigger (fewer, larger "
                                 "steps); 0: each request compacts exactly at its trigger",
                                 Number(0, 1, hi_open=True))
    step_requests: int = setting(0, "ams_step_requests", "at most this many requests compact in one step, the "
                                 "most urgent first, each step as late as the triggers allow (engine/pacing.py): a "
                                 "batch that reaches its triggers together compacts over several short steps within "
                                 "the batch slack; more only where one would pass its trigger. A request already "
                                 "past its trigger when it becomes ready (a long prompt) may wait up to the batch "
                                 "slack in tokens, which admission reserves for it. 0: every ready request "
                                 "compacts in the step the first reaches its trigger",
                                 Int(0, 1 << 16, note=" (0 = no limit)", show_hi=False))
    workspace_mib: int = setting(0, "ams_workspace_mib", "GPU memory (MiB) a compaction step may use for its "
                                 "temporaries, reserved from the KV budget; 0: the larger of 2 % of the KV budget and "
                                 "one layer of one context-length request under the costliest scorer (a smaller "
                                 "value is refused at startup with that size)",
                                 Int(0, 1 << 24, note=" (0 = automatic)", show_hi=False))
    profile_steps: int = setting(0, "ams_profile_steps", "profile compaction steps 2 .. N + 1 with torch.profiler "
                                 "and log a summary of each (kernels, GPU and host time, top operations); a "
                                 "diagnostic that slows those steps. 0: off", Int(0, 1000, show_hi=False))
    warmup: bool = setting(True, "ams_warmup", "compile the compaction kernels at startup, so the first compaction "
                           "costs what later ones do", Flag())

    def __post_init__(self):
        if not isinstance(self.policy, PolicyConfig):
            raise ConfigError("kv_policy", self.policy, "a PolicyConfig")
        validate_fields(self)

    def slack_tokens(self, interval: int) -> int:
        """Tokens before its trigger at which a request joins another request's compaction (< interval)."""
        return min(interval - 1, int(self.batch_slack * interval))

    def overdue_wait(self, interval: int) -> int:
        """Tokens a request already past its trigger when it becomes ready may wait under --ams-step-requests
        (so that a wave of long prompts spreads over steps too); 0 without pacing."""
        return self.slack_tokens(interval) if self.step_requests else 0

    @property
    def enabled(self) -> bool:
        return self.policy.enabled

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "EngineSettings":
        d = json.loads(text)
        return cls(policy=PolicyConfig(**d.pop("policy")), **d)


ENGINE_NAMES = {field: spec.name for field, spec in specs(EngineSettings).items()}
ALL_NAMES = tuple(EXTERNAL_NAMES.values()) + tuple(ENGINE_NAMES.values())


def readme_flag_table() -> str:
    """The README's flag table: every flag, its default, valid values and meaning (`sglang-ams flags`)."""
    return flag_table(PolicyConfig, EngineSettings)


def from_user_values(values: Mapping[str, Any]) -> EngineSettings:
    """Build settings from user-facing names (Engine kwargs / parsed CLI flags); validates everything."""
    policy_names = {v: k for k, v in EXTERNAL_NAMES.items()}
    engine_names = {v: k for k, v in ENGINE_NAMES.items()}
    policy, engine = {}, {}
    for key, value in values.items():
        if key in policy_names:
            policy[policy_names[key]] = value
        elif key in engine_names:
            engine[engine_names[key]] = value
        else:
            raise ConfigError(key, value, "not a sglang-ams setting")
    settings = EngineSettings(policy=PolicyConfig(**policy), **engine)
    refusal = engine_refusal(settings.policy)
    if refusal is not None:
        raise refusal
    return settings


class _ProcessSettings:
    """This process's settings and the environment text they came from: the launcher sets them (publish), a
    scheduler process parses AMS_KV_CONFIG the first time it asks. Per-request hooks (the verify hooks in the
    tokenizer manager) then compare one string, never parse JSON; a changed variable (tests) is parsed again."""
    text: str | None = None
    settings: EngineSettings | None = None


_PROCESS = _ProcessSettings()


def publish(settings: EngineSettings | None) -> None:
    """Make the settings this process's and visible to child processes spawned after this call (the
    schedulers)."""
    if settings is None or not settings.enabled:
        os.environ.pop(ENV_VAR, None)
        _PROCESS.text, _PROCESS.settings = None, None
    else:
        os.environ[ENV_VAR] = _PROCESS.text = settings.to_json()
        _PROCESS.settings = settings


def current() -> EngineSettings | None:
    """The published settings of this process (None: no policy was published)."""
    text = os.environ.get(ENV_VAR) or None
    if text != _PROCESS.text:
        _PROCESS.text, _PROCESS.settings = text, (EngineSettings.from_json(text) if text else None)
    return _PROCESS.settings
