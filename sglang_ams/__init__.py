"""sglang-ams: Adaptive Mass-Segmented KV-cache compression for SGLang."""
from .config import ConfigError, PolicyConfig

__all__ = ["ConfigError", "PolicyConfig"]
__version__ = "0.1.0"
