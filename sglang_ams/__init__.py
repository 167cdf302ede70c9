"""sglang-ams: Adaptive Mass-Segmented KV-cache compression for SGLang."""
from pathlib import Path as _Path

# Installed, kernels/ and patches/ live inside this package (pyproject maps them). Imported straight from a
# source checkout (e.g. `python -m sglang.launch_server` started in the repository root, which puts the root
# first on sys.path), they sit next to it: let the package find them there too.
_ROOT = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "patches").is_dir() and (_ROOT / "patches" / "__init__.py").is_file() \
        and (_ROOT / "pyproject.toml").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 - the package's own __path__

from .config import ConfigError, PolicyConfig  # noqa: E402

__all__ = ["ConfigError", "PolicyConfig"]
__version__ = "0.1.0"
