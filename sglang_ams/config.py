"""One validated configuration object for a KV policy.

Every field has a user-facing name (the Engine keyword / per-request key) and a CLI flag; errors name both,
with the valid range, so a bad flag fails at startup and a bad request field becomes an HTTP 400.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

POLICIES = ("none", "topk", "ams", "streaming")
SEGMENTERS = ("equal_mass", "fixed_length")
LAYER_BUDGETS = ("uniform", "adaptive")   # adaptive: per-layer budgets (reference loop only, layer_budget.py)
SCORERS = ("tova", "snapkv", "h2o", "streaming", "expected_attention", "keydiff", "rkv",
           "triattention", "random")
MAX_TOKENS = 1 << 30       # no context is longer; keeps every count far inside int32/int64 arithmetic
MAX_WINDOW = 1024          # window queries per request and layer (the query ring holds W of them per row)
# Scorers that read the window queries of the request (the query ring in the engine).
QUERY_SCORERS = ("tova", "snapkv", "h2o", "rkv", "expected_attention")


class ConfigError(ValueError):
    """A policy setting is out of range. `field` is the user-facing name (e.g. ``kv_budget``)."""

    def __init__(self, field: str, value: Any, valid: str):
        self.field, self.value, self.valid = field, value, valid
        flag = "--" + field.replace("_", "-")
        super().__init__(f"{field} ({flag}) = {short_repr(value)} is invalid: {valid}")


def short_repr(value: Any, limit: int = 80) -> str:
    """repr for error messages about client input: bounded length, and never raising (a 5000-digit int's repr
    does: Python's int-to-str limit)."""
    try:
        text = repr(value)
    except Exception:       # noqa: BLE001 - any object a client managed to send
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    policy: str = "none"
    budget: int = 1024            # B: KV tokens a request keeps (beyond a radix-shared prefix), sink and recent included
    interval: int = 512           # compaction runs when the KV reaches budget + interval
    scorer: str = "snapkv"
    window: int = 8               # W: window queries kept per request and layer
    pool_kernel: int = 5          # 1-D average pooling of attention evidence (odd)
    delta: float = 0.02           # Δ: mass per segment
    lmin: int = 32                # segments shorter than this are merged into a neighbour
    lmax: int = 1024              # segments longer than this are split
    qmin: int = 8                 # per-segment floor quota
    keep_lastn: int = 32          # R: most recent tokens always kept
    sink: int = 4                 # first tokens always kept
    credit_decay: float = 0.8     # λ of the EMA credit
    mass_mix: float = 0.7         # β: weight of the fresh mass against the carried credit
    segmenter: str = "equal_mass"
    use_credit: bool = True       # ablation: no credit
    use_mass: bool = True         # ablation: uniform mass (quotas by length only)
    seed: int = 0                 # random scorer
    triattention_stats: str = ""  # path of calibration statistics; empty: estimate from the window queries
    # The window may start with the prompt's last W queries (SnapKV's observation window), so a prompt already
    # past the trigger compacts right after prefill; off: only decode queries, a first compaction W steps later.
    prefill_window: bool = False
    # uniform: every layer keeps `budget`; adaptive: layers x budget split by attention spread (reference loop only)
    layer_budget: str = "uniform"

    def __post_init__(self):
        validate(self)

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    @property
    def needs_queries(self) -> bool:
        """Whether compaction reads window queries (AMS mass always does)."""
        if self.policy == "ams" or (self.enabled and self.layer_budget == "adaptive"):
            return True     # (adaptive splits the budget by attention evidence)
        return self.policy == "topk" and (self.scorer in QUERY_SCORERS or
                                          (self.scorer == "triattention" and not self.triattention_stats))

    @property
    def cap(self) -> int:
        """Most KV tokens a request under this policy holds beyond its shared prefix."""
        return self.budget + self.interval

    def replace(self, **changes) -> "PolicyConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Field → user-facing name (Engine kwarg, per-request key without prefix, CLI flag with dashes).
EXTERNAL_NAMES = {
    "policy": "kv_policy", "budget": "kv_budget", "interval": "kv_interval", "scorer": "kv_scorer",
    **{f.name: "ams_" + f.name for f in dataclasses.fields(PolicyConfig)
       if f.name not in ("policy", "budget", "interval", "scorer")},
}
def _int(cfg, name, lo, hi=None, extra=""):
    v = getattr(cfg, name)
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if not ok:
        rng = f"an integer >= {lo} and <= {hi}" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(EXTERNAL_NAMES[name], v, rng + extra)


def _float(cfg, name, lo, hi, lo_open=False):
    v = getattr(cfg, name)
    # (ints are compared as they are: math.isfinite of a huge int raises OverflowError)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v)) \
        and (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        raise ConfigError(EXTERNAL_NAMES[name], v, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")


def _choice(cfg, name, choices):
    v = getattr(cfg, name)
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(EXTERNAL_NAMES[name], v, "one of " + ", ".join(choices))


def validate(cfg: PolicyConfig) -> None:
    _choice(cfg, "policy", POLICIES)
    _choice(cfg, "scorer", SCORERS)
    _choice(cfg, "segmenter", SEGMENTERS)
    _choice(cfg, "layer_budget", LAYER_BUDGETS)
    for name in ("use_credit", "use_mass", "prefill_window"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(EXTERNAL_NAMES[name], getattr(cfg, name), "true or false")
    _int(cfg, "sink", 0, MAX_TOKENS)
    _int(cfg, "keep_lastn", 0, MAX_TOKENS)
    _int(cfg, "budget", cfg.sink + cfg.keep_lastn + 1, MAX_TOKENS,
         extra=f" (more than {EXTERNAL_NAMES['sink']} + {EXTERNAL_NAMES['keep_lastn']})")
    _int(cfg, "window", 1, MAX_WINDOW)
    _int(cfg, "interval", 1, MAX_TOKENS)
    if cfg.needs_queries and cfg.interval < cfg.window:
        raise ConfigError("kv_interval", cfg.interval,
                          f"an integer >= {EXTERNAL_NAMES['window']} = {cfg.window} (compaction needs a full window "
                          "of queries newer than the last compaction)")
    _int(cfg, "pool_kernel", 1, MAX_WINDOW)
    if cfg.pool_kernel % 2 == 0:
        raise ConfigError(EXTERNAL_NAMES["pool_kernel"], cfg.pool_kernel, "an odd integer >= 1")
    _float(cfg, "delta", 0.0, 1.0, lo_open=True)
    _int(cfg, "lmin", 1, MAX_TOKENS)
    _int(cfg, "lmax", cfg.lmin, MAX_TOKENS, extra=f" (at least {EXTERNAL_NAMES['lmin']})")
    _int(cfg, "qmin", 0, MAX_TOKENS)
    _float(cfg, "credit_decay", 0.0, 1.0)
    _float(cfg, "mass_mix", 0.0, 1.0)
    _int(cfg, "seed", 0, 2**63 - 1)
    if not isinstance(cfg.triattention_stats, str):
        raise ConfigError(EXTERNAL_NAMES["triattention_stats"], cfg.triattention_stats, "a file path or empty")
    if cfg.layer_budget == "adaptive" and cfg.scorer == "triattention" and cfg.triattention_stats:
        raise ConfigError(EXTERNAL_NAMES["layer_budget"], cfg.layer_budget,
                          "uniform with calibrated triattention statistics (per-layer scoring runs layers as a batch)")


DEFAULTS = PolicyConfig()


def from_external(values: Mapping[str, Any], base: PolicyConfig = DEFAULTS) -> PolicyConfig:
    """Build a config from user-facing names (``kv_budget=...``, ``ams_delta=...``); unknown names are errors."""
    inverse = {v: k for k, v in EXTERNAL_NAMES.items()}
    changes = {}
    for key, value in values.items():
        if key not in inverse:
            raise ConfigError(key, value, "not a known setting; known: " + ", ".join(sorted(inverse)))
        changes[inverse[key]] = value
    return dataclasses.replace(base, **changes)


# Per-request override: the short keys users put in a request body ({"kv_policy": {"budget": 512}}).
REQUEST_KEYS = ("policy", "budget", "interval", "scorer", "layer_budget")


def request_override(base: PolicyConfig, override: Any) -> PolicyConfig:
    """Apply a per-request ``kv_policy`` body field: a policy name or an object with REQUEST_KEYS.

    Anything a client can send ends in a ConfigError naming the field (never another exception): the value
    comes straight from a JSON body or an Engine call."""
    if override is None:
        return base
    if isinstance(override, str):
        override = {"policy": override}
    if not isinstance(override, Mapping):
        raise ConfigError("kv_policy", override, "a policy name or an object with keys " + ", ".join(REQUEST_KEYS))
    for key in override:
        if not isinstance(key, str) or key not in REQUEST_KEYS:
            raise ConfigError("kv_policy", key, "a key among " + ", ".join(REQUEST_KEYS))
    return dataclasses.replace(base, **dict(override))
