"""The built-in scorers, in the order the user-facing list shows them (flags, README, errors), and the one way to
build a scorer from a PolicyConfig."""
from __future__ import annotations

from . import tova, snapkv, h2o, streaming, expected_attention, keydiff, rkv, triattention  # noqa: F401, I001
from . import random_scorer  # noqa: F401  (importing a scorer's module registers it)
from .base import REGISTRY, Scorer

SCORERS: tuple[str, ...] = tuple(REGISTRY)


def make_scorer(cfg, name: str | None = None) -> Scorer:
    """The scorer `name` (default cfg.scorer) with its hyper-parameters taken from cfg."""
    return REGISTRY[name or cfg.scorer].from_config(cfg)
