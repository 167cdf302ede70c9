"""Fixtures of the engine tests."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _published_server_args(sglang_context):
    """Every test here runs under conftest's sglang_context."""
    yield
