"""sglang-ams: Adaptive Mass-Segmented KV-cache compression for SGLang.

kernels/ and patches/ live at the top of the repository; sglang_ams/kernels and sglang_ams/patches are links to
them (a source checkout imports them like any subpackage) and pyproject maps them into the wheel. kernels/ has no
__init__.py, so with the repository root on sys.path `import kernels` still finds SGLang's `kernels` dependency.
"""
from .config import ConfigError, PolicyConfig

__all__ = ["ConfigError", "PolicyConfig"]
__version__ = "0.1.0"
