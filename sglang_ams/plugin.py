"""SGLang plugin entry point (group ``sglang.srt.plugins``): registers our hooks in every process."""
from __future__ import annotations


def register() -> None:
    from .patches import register_all
    register_all()
