"""Where the evaluation data lives (GSM8K, needle essays, QA sets): standard library only, so the load generator
can import it without torch."""
from __future__ import annotations

import os
from pathlib import Path


def find_data_dir() -> Path | None:
    """$SGLANG_AMS_DATA, else ../shared/data beside the repo root or the working directory (None if absent)."""
    env = os.environ.get("SGLANG_AMS_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    repo_root = Path(__file__).resolve().parents[1]
    for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                      Path.cwd() / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return None
