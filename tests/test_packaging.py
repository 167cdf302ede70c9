"""Packaging: the wheel ships every subpackage (an editable install on CPU would hide a missing one until the GPU
run), and the top-level kernels/ folder never shadows the `kernels` distribution SGLang depends on."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
LINKED = {"sglang_ams.kernels": "kernels", "sglang_ams.patches": "patches"}    # top-level folders (design card)


def _modules(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.py")}


def test_every_subpackage_is_declared():
    declared = set(SETUPTOOLS["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sglang_ams").rglob("__init__.py")
             if "kernels" not in p.parts and "patches" not in p.parts}
    assert found | set(LINKED) <= declared, f"packages missing from pyproject.toml: {sorted(found - declared)}"
    assert {k: v for k, v in SETUPTOOLS["package-dir"].items() if k != "sglang_ams"} == LINKED


def test_top_level_folders_are_the_linked_subpackages():
    """sglang_ams/kernels and sglang_ams/patches are links to the top-level folders, so a source checkout imports
    the same files the wheel ships (no __path__ tricks)."""
    for name, folder in LINKED.items():
        link = ROOT / name.replace(".", "/")
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), f"{link} is not a link to {folder}/"
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow SGLang's `kernels`"


def test_no_top_level_kernels_package_is_installed():
    assert not any(p.split(".")[0] in ("kernels", "patches") for p in SETUPTOOLS["packages"])


def test_repo_root_first_on_sys_path_imports_sglangs_kernels():
    """`python -m pytest` and `python -m sglang.launch_server` from the repository root put it first on sys.path:
    `kernels` must still be SGLang's dependency, and sglang_ams.kernels must be ours."""
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import kernels, sglang_ams.kernels.scoring as s, sglang_ams.patches as p\n"
            "print(kernels.__file__); print(s.__file__); print(p.__file__)")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs, scoring, patches = (Path(line).resolve() for line in out.stdout.split())
    assert theirs.name == "__init__.py" and ROOT / "kernels" not in theirs.parents, f"`import kernels` found the repository's folder: {theirs}"
    assert scoring == ROOT / "kernels" / "scoring.py" and patches == ROOT / "patches" / "__init__.py"


@pytest.mark.slow
def test_wheel_layout(tmp_path):
    """Build the wheel (pip, isolated build: fetches setuptools) from a copy of the sources (the build leaves
    build/ behind) and check where every source module lands."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "sglang_ams", "kernels", "patches"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"symlinks": True, "ignore": shutil.ignore_patterns("__pycache__")}
                                         if copy is shutil.copytree else {}))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, cwd=tmp_path)
    if out.returncode:
        pytest.skip(f"no wheel could be built here: {out.stderr[-500:]}")
    (wheel,) = tmp_path.glob("sglang_ams-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not {n for n in names if n.split("/")[0] in ("kernels", "patches", "tests")}
    for name, folder in LINKED.items():
        prefix = name.replace(".", "/") + "/"
        assert {n[len(prefix):] for n in names if n.startswith(prefix)} == _modules(ROOT / folder), name
    for sub in ("", "engine/", "scorers/"):
        shipped = {n[len("sglang_ams/" + sub):] for n in names if n.startswith("sglang_ams/" + sub)}
        assert _modules(ROOT / "sglang_ams" / sub) <= shipped, sub
