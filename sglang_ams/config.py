"""One validated configuration object for a KV policy.

Every field declares its user-facing name (the Engine keyword / per-request key; the CLI flag), help and valid
range (settings_fields.py); errors name both names and the range, so a bad flag fails at startup and a bad request
field becomes an HTTP 400. Only the rule that spans fields (interval vs window) is written out here.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

from .scorers.base import Inputs
from .scorers.builtin import SCORERS, make_scorer
from .selector import SELECTORS, Selector
from .settings_fields import ConfigError, short_repr  # noqa: F401 - part of this module's interface
from .settings_fields import Choice, Flag, Int, Number, Text, setting, specs
from .settings_fields import validate as validate_fields

POLICIES = ("none", *SELECTORS)
SEGMENTERS = ("equal_mass", "fixed_length")
LAYER_BUDGETS = ("uniform", "adaptive")   # adaptive: per-layer budgets (reference loop only, layer_budget.py)
MAX_TOKENS = 1 << 30       # no context is longer; keeps every count far inside int32/int64 arithmetic
MAX_WINDOW = 1024          # window queries per request and layer (the query ring holds W of them per row)


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    policy: str = setting("none", "kv_policy", "none: upstream SGLang, byte-identical; topk: global top-k of the "
                          "scorer; ams: adaptive mass-segmented quotas on top of the scorer; streaming: sink + recent",
                          Choice(POLICIES))
    # B: KV tokens a request keeps (beyond a radix-shared prefix), sink and recent included
    budget: int = setting(1024, "kv_budget", "KV tokens each request keeps (beyond a radix-shared prefix), sink and "
                          "recent tokens included",
                          Int(lambda c: c.sink + c.keep_lastn + 1, MAX_TOKENS, lo_text="ams_sink + ams_keep_lastn + 1",
                              note=" (more than ams_sink + ams_keep_lastn)"))
    interval: int = setting(512, "kv_interval", "compaction runs when a request holds budget + interval tokens; at "
                            "least the window when queries are read", Int(1, MAX_TOKENS))
    scorer: str = setting("snapkv", "kv_scorer", "token importance inside segments (ams) or globally (topk)",
                          Choice(SCORERS))
    window: int = setting(8, "ams_window", "W recent decode queries whose attention is the evidence (size of the "
                          "query ring)", Int(1, MAX_WINDOW))
    pool_kernel: int = setting(5, "ams_pool_kernel", "width of the average pooling over the evidence",
                               Int(1, MAX_WINDOW, odd=True))
    delta: float = setting(0.02, "ams_delta", "Δ: mass per AMS segment (segments cut at equal cumulative mass)",
                           Number(0.0, 1.0, lo_open=True))
    lmin: int = setting(32, "ams_lmin", "shortest AMS segment; shorter ones merge into a neighbour",
                        Int(1, MAX_TOKENS))
    lmax: int = setting(1024, "ams_lmax", "longest AMS segment; longer ones are split",
                        Int(lambda c: c.lmin, MAX_TOKENS, lo_text="ams_lmin", note=" (at least ams_lmin)"))
    qmin: int = setting(8, "ams_qmin", "floor quota of tokens every segment keeps", Int(0, MAX_TOKENS))
    keep_lastn: int = setting(32, "ams_keep_lastn", "R: most recent tokens always kept", Int(0, MAX_TOKENS))
    sink: int = setting(4, "ams_sink", "first tokens always kept", Int(0, MAX_TOKENS))
    credit_decay: float = setting(0.8, "ams_credit_decay", "λ: EMA decay of the carried credit", Number(0.0, 1.0))
    mass_mix: float = setting(0.7, "ams_mass_mix", "β: weight of the fresh mass against the carried credit",
                              Number(0.0, 1.0))
    segmenter: str = setting("equal_mass", "ams_segmenter", "how segments are cut (fixed_length is the ablation)",
                             Choice(SEGMENTERS))
    use_credit: bool = setting(True, "ams_use_credit", "carry the EMA credit across compactions (ablation: false)",
                               Flag())
    use_mass: bool = setting(True, "ams_use_mass", "share the budget by segment mass (ablation: false = by length)",
                             Flag())
    seed: int = setting(0, "ams_seed", "seed of the random scorer", Int(0, 2**63 - 1))
    triattention_stats: str = setting("", "ams_triattention_stats", "calibration statistics for the triattention "
                                      "scorer (empty: estimated from the window queries)", Text("a file path or empty"))
    # The window may start with the prompt's last W queries (SnapKV's observation window), so a prompt already
    # past the trigger compacts right after prefill; off: only decode queries, a first compaction W steps later.
    prefill_window: bool = setting(False, "ams_prefill_window", "fill the query window with the prompt's last W "
                                   "queries at prefill (SnapKV's observation window): a prompt already past its "
                                   "trigger compacts two decode steps after prefill, not W + 2 (see below)", Flag())
    layer_budget: str = setting("uniform", "ams_layer_budget", "uniform: every layer keeps the budget; adaptive: "
                                "layers x budget split by attention spread (layer_budget.py), in the reference loop "
                                "only: the engine refuses it (its pool keeps equal counts per layer)",
                                Choice(LAYER_BUDGETS))

    # A request decodes at least this many steps before its first compaction: under the overlap scheduler the
    # post-prefill radix-cache call for a request runs one iteration after it joined the decode batch.
    MIN_DECODE_STEPS: ClassVar[int] = 2

    def __post_init__(self):
        validate(self)

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    # --- what compaction under this config reads (the scorer's and the selector's declarations) -----------------
    @functools.cached_property
    def selector(self) -> Selector | None:
        """The selector of the policy (None for "none"), its fields taken from this config."""
        cls = SELECTORS.get(self.policy)
        return None if cls is None else cls.from_config(self)

    @property
    def scorer_name(self) -> str:
        """The scorer compaction runs: the policy's own (streaming) or the configured one."""
        return (self.selector.scorer if self.selector is not None else None) or self.scorer

    @functools.cached_property
    def inputs(self) -> Inputs:
        """The inputs compaction builds: its scorer's and its selector's (nothing when the policy is off)."""
        if self.selector is None:
            return Inputs()
        need = make_scorer(self, self.scorer_name).needs | self.selector.needs
        # adaptive layer budgets split the budget by window attention (layer_budget.py)
        return need | Inputs(queries=True, attention=True) if self.layer_budget == "adaptive" else need

    @functools.cached_property
    def needs_queries(self) -> bool:
        """Whether compaction reads window queries (the engine's query ring)."""
        return self.inputs.reads_window

    # --- how long a request grows and what it keeps (prefix: the tokens it shares with the radix tree) ----------
    @property
    def cap(self) -> int:
        """Most KV tokens a request under this policy holds beyond its shared prefix."""
        return self.budget + self.interval

    def trigger_len(self, prefix: int) -> int:
        """The physical length at which a request behind `prefix` shared tokens compacts."""
        return prefix + self.cap

    def kept_len(self, prefix):
        """Tokens kept per (layer, KV head): the shared prefix (free to the request) plus the budget (ints or
        tensors)."""
        return prefix + self.budget

    def pinned_len(self, prefix: int) -> int:
        """Front tokens never moved: the shared prefix, or the sink if that is longer."""
        return max(prefix, self.sink)

    @functools.cached_property
    def lead_tokens(self) -> int:
        """Tokens a request may decode past its trigger before it can compact: MIN_DECODE_STEPS steps before it may
        take a query-ring row, then a full window of queries written after that (the two add up, they don't
        overlap)."""
        return self.window + self.MIN_DECODE_STEPS if self.needs_queries else self.MIN_DECODE_STEPS

    def replace(self, **changes) -> "PolicyConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Field → user-facing name (Engine kwarg, per-request key without prefix, CLI flag with dashes).
EXTERNAL_NAMES = {field: spec.name for field, spec in specs(PolicyConfig).items()}


def validate(cfg: PolicyConfig) -> None:
    validate_fields(cfg)
    if cfg.needs_queries and cfg.interval < cfg.window:
        raise ConfigError("kv_interval", cfg.interval,
                          f"an integer >= {EXTERNAL_NAMES['window']} = {cfg.window} (compaction needs a full window "
                          "of queries newer than the last compaction)")
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
