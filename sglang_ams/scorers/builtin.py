"""Imports every built-in scorer so that `register` puts it in the registry (make_scorer imports this)."""
from . import (expected_attention, h2o, keydiff, random_scorer, rkv, snapkv,  # noqa: F401
               streaming, tova, triattention)
