"""Settings declared once: every field of PolicyConfig and EngineSettings carries, as dataclass metadata, its
user-facing name (Engine keyword argument; the CLI flag with dashes), its help text and its valid range.

That one declaration validates values (a ConfigError naming the flag and the range), builds the CLI flags
(patches/server_args.py) and renders the README flag table (tests/test_readme_flags.py compares the two).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable

KEY = "sglang_ams"          # the metadata key of a setting's Spec


class ConfigError(ValueError):
    """A setting is out of range. `field` is the user-facing name (e.g. ``kv_budget``)."""

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


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# --- ranges ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Choice:
    options: tuple

    def check(self, name, v, obj):
        if not isinstance(v, str) or v not in self.options:
            raise ConfigError(name, v, self.describe())

    def describe(self) -> str:
        return "one of " + ", ".join(self.options)

    def argparse(self) -> dict:
        return {"choices": self.options}


@dataclasses.dataclass(frozen=True)
class Flag:
    def check(self, name, v, obj):
        if not isinstance(v, bool):
            raise ConfigError(name, v, self.describe())

    def describe(self) -> str:
        return "true or false"

    def argparse(self) -> dict:
        return {"type": parse_bool, "metavar": "{true,false}"}


@dataclasses.dataclass(frozen=True)
class Int:
    lo: int | Callable[[Any], int]       # a callable: a bound set by other fields (validated before this one)
    hi: int | None = None
    note: str = ""                       # appended to the range (why the bound, what 0 means)
    lo_text: str = ""                    # how the table names a callable bound
    odd: bool = False
    show_hi: bool = True                 # (a sanity cap that would only clutter the message)

    @property
    def depends(self) -> bool:
        return callable(self.lo)

    def check(self, name, v, obj):
        lo = self.lo(obj) if callable(self.lo) else self.lo
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= lo and (self.hi is None or v <= self.hi)
        if not ok:
            raise ConfigError(name, v, self.describe(lo))
        if self.odd and v % 2 == 0:
            raise ConfigError(name, v, f"an odd integer >= {lo}")

    def describe(self, lo=None) -> str:
        """The range in an error message (`lo`: the bound the value failed) or in the table (bounds by name)."""
        note = self.note
        if lo is None:
            lo, note = (self.lo_text, "") if callable(self.lo) else (self.lo, note)   # (the name says why)
        hi = f" and <= {self.hi}" if self.hi is not None and self.show_hi else ""
        return ("an odd integer" if self.odd else "an integer") + f" >= {lo}{hi}{note}"

    def argparse(self) -> dict:
        return {"type": int}


@dataclasses.dataclass(frozen=True)
class Number:
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def check(self, name, v, obj):
        # (ints are compared as they are: math.isfinite of a huge int raises OverflowError)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or math.isfinite(v)) \
            and (v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi)
        if not ok:
            raise ConfigError(name, v, self.describe())

    def describe(self) -> str:
        return f"a number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"

    def argparse(self) -> dict:
        return {"type": float}


@dataclasses.dataclass(frozen=True)
class Text:
    valid: str

    def check(self, name, v, obj):
        if not isinstance(v, str):
            raise ConfigError(name, v, self.valid)

    def describe(self) -> str:
        return self.valid

    def argparse(self) -> dict:
        return {"type": str}


# --- declaration -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    name: str               # user-facing: Engine keyword, per-request key with its prefix, CLI flag with dashes
    help: str
    range: Choice | Flag | Int | Number | Text

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def setting(default, name: str, help: str, range) -> Any:
    """A dataclass field with its user-facing declaration."""
    return dataclasses.field(default=default, metadata={KEY: Spec(name, help, range)})


def specs(cls) -> dict[str, Spec]:
    """{field name: Spec} of a settings dataclass, in declaration order (fields without a Spec are skipped)."""
    return {f.name: f.metadata[KEY] for f in dataclasses.fields(cls) if KEY in f.metadata}


def defaults(cls) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if KEY in f.metadata}


def validate(obj) -> None:
    """Check every declared field of a settings dataclass; fields whose bound depends on others come last."""
    items = list(specs(type(obj)).items())
    for field, spec in sorted(items, key=lambda item: bool(getattr(item[1].range, "depends", False))):
        spec.range.check(spec.name, getattr(obj, field), obj)


# --- the README table --------------------------------------------------------------------------------------
def _shown_default(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`" if value else "empty"
    return repr(value)


def flag_table(*classes) -> str:
    """The Markdown flag table of the README, generated from the declarations (`sglang-ams flags`)."""
    rows = ["| flag | default | valid values | meaning |", "|---|---|---|---|"]
    for cls in classes:
        values = defaults(cls)
        for field, spec in specs(cls).items():
            rows.append(f"| `{spec.flag}` | {_shown_default(values[field])} | {spec.range.describe()} | "
                        f"{spec.help} |")
    return "\n".join(rows) + "\n"
