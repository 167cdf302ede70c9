"""Where benchmark results go: a JSON file per run under benchmarks/results/ with device, date, commit and
the exact command, next to a printed table."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def metadata() -> dict:
    return {"device": device_name(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("AMS_COMMIT") or commit(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}


def save(name: str, rows: list[dict], extra: dict | None = None, folder: Path | None = None) -> Path:
    folder = Path(folder) if folder else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    meta = metadata()
    stamp = meta["date"][:10].replace("-", "")
    dev = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-")[:40]
    path = folder / f"{name}-{stamp}-{dev}.json"
    path.write_text(json.dumps({**meta, **(extra or {}), "rows": rows}, indent=1))
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] +
                     [line([_fmt(r.get(c)) for c in columns]) for r in rows])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
