"""Test setup: Triton runs under its interpreter when there is no GPU; `gpu` tests skip without CUDA."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported by a test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


class LiveBytes:
    """Peak bytes of tensor storage alive at once while the `with` block runs, counted at the ATen level (every
    op's new outputs, freed when their storage dies): what a caching allocator would have to hold, on the CPU.
    Views share storage and count once."""

    def __init__(self):
        import weakref
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        key = st.data_ptr()
                        if st.nbytes() and key not in tracker._sizes:
                            tracker._sizes[key] = st.nbytes()
                            tracker.current += st.nbytes()
                            tracker.peak = max(tracker.peak, tracker.current)
                            weakref.finalize(st, tracker._free, key)
                return out

        self._mode = _Mode()
        self._sizes: dict = {}
        self.current = self.peak = 0

    def _free(self, key):
        self.current -= self._sizes.pop(key, 0)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


@pytest.fixture
def live_bytes():
    return LiveBytes


@pytest.fixture
def sglang_context():
    """SGLang's release path and prepare_for_decode read the published ServerArgs: publish defaults; afterwards
    no plugin runtime is left installed."""
    from sglang.srt.runtime_context import get_context
    from sglang_ams.engine import runtime as ams_runtime
    override = get_context().override_server_args()
    override.install()
    yield
    override.restore()
    ams_runtime.install(None)
