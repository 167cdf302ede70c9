"""The wheel ships every subpackage: an editable install on CPU would hide a missing one until the GPU run."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sglang_ams").rglob("__init__.py")}
    found |= {f"sglang_ams.{name}" for name in config["package-dir"] if name != "sglang_ams"
              for name in [name.split(".", 1)[1]]}
    assert found <= declared, f"packages missing from pyproject.toml: {sorted(found - declared)}"
    for name, folder in config["package-dir"].items():
        assert (ROOT / folder / "__init__.py").exists(), f"{name} maps to {folder}/ without __init__.py"


def test_no_top_level_kernels_package_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any(p.split(".")[0] in ("kernels", "patches") for p in config["packages"])
