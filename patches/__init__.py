"""Hooks registered on SGLang (installed as sglang_ams.patches), grouped by the SGLang module they touch."""
