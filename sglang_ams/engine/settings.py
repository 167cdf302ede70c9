"""Server-level settings of the plugin: the policy plus the few knobs that only the engine has.

They travel from the launching process to the scheduler processes twice: attached to ServerArgs (pickled with
it) and as JSON in the environment variable AMS_KV_CONFIG, which a scheduler reads before SGLang hands it the
ServerArgs (hooks are registered at process start).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

from ..config import EXTERNAL_NAMES, ConfigError, PolicyConfig
from ..layer_budget import engine_refusal

ENV_VAR = "AMS_KV_CONFIG"
PROMPT_CACHE_MODES = ("private", "cached")
SCORING_LSE_MODES = ("decode", "recompute")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    policy: PolicyConfig = PolicyConfig()
    prompt_cache: str = "private"   # "cached": the prompt goes into the radix tree (pinned); "private": compressible
    ring_rows: int = 0              # query-ring rows; 0 = sized from the KV pool
    debug_checks: bool = False      # assert bookkeeping invariants after every compaction (slow)
    scoring_lse: str = "decode"     # "decode": the decode attention's LSE of each window query (keys read once)
    batch_slack: float = 0.5        # fraction of the interval a request may compact early to join a due one
    workspace_mib: int = 0          # transient GPU memory of a compaction step; 0 = automatic (workspace.py)
    warmup: bool = True             # compile the compaction kernels at startup (warmup.py)

    def __post_init__(self):
        if self.prompt_cache not in PROMPT_CACHE_MODES:
            raise ConfigError("ams_prompt_cache", self.prompt_cache, "one of " + ", ".join(PROMPT_CACHE_MODES))
        if not isinstance(self.ring_rows, int) or isinstance(self.ring_rows, bool) or self.ring_rows < 0:
            raise ConfigError("ams_ring_rows", self.ring_rows, "an integer >= 0 (0 = automatic)")
        if not isinstance(self.warmup, bool):
            raise ConfigError("ams_warmup", self.warmup, "true or false")
        if not isinstance(self.debug_checks, bool):
            raise ConfigError("ams_debug_checks", self.debug_checks, "true or false")
        if self.scoring_lse not in SCORING_LSE_MODES:
            raise ConfigError("ams_scoring_lse", self.scoring_lse, "one of " + ", ".join(SCORING_LSE_MODES))
        if isinstance(self.batch_slack, bool) or not isinstance(self.batch_slack, (int, float)) \
                or not 0.0 <= self.batch_slack < 1.0:
            raise ConfigError("ams_batch_slack", self.batch_slack, "a number in [0, 1)")
        if not isinstance(self.workspace_mib, int) or isinstance(self.workspace_mib, bool) \
                or not 0 <= self.workspace_mib <= 1 << 24:
            raise ConfigError("ams_workspace_mib", self.workspace_mib, "an integer >= 0 (0 = automatic)")

    def slack_tokens(self, interval: int) -> int:
        """Tokens before its trigger at which a request joins another request's compaction (< interval)."""
        return min(interval - 1, int(self.batch_slack * interval))

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


ENGINE_NAMES = {"prompt_cache": "ams_prompt_cache", "ring_rows": "ams_ring_rows", "debug_checks": "ams_debug_checks",
                "scoring_lse": "ams_scoring_lse", "batch_slack": "ams_batch_slack", "workspace_mib": "ams_workspace_mib",
                "warmup": "ams_warmup"}
ALL_NAMES = tuple(EXTERNAL_NAMES.values()) + tuple(ENGINE_NAMES.values())


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


def publish(settings: EngineSettings | None) -> None:
    """Make the settings visible to child processes spawned after this call (the schedulers)."""
    if settings is None or not settings.enabled:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = settings.to_json()


def from_environment() -> EngineSettings | None:
    """The published settings; parsed once per distinct value (the verify hook asks on every request)."""
    text = os.environ.get(ENV_VAR)
    return _parsed(text) if text else None


@functools.lru_cache(maxsize=4)
def _parsed(text: str) -> EngineSettings:
    return EngineSettings.from_json(text)       # frozen dataclasses: safe to share
