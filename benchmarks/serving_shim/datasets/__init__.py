"""Stand-in for Hugging Face `datasets` on a machine without it (the GPU machine has no network).

`sglang.bench_serving` imports `load_dataset` at module level for its MMMU dataset only; the random-ids and
generated-shared-prefix datasets never call it. benchmarks/serving.py appends this folder to the client's
PYTHONPATH only when no real `datasets` is importable.
"""
__version__ = "0.0.0+serving-standin"


def load_dataset(*args, **kwargs):
    raise RuntimeError("this is benchmarks/serving_shim's stand-in for `datasets`; install the real package "
                       "for datasets that download (mmmu, longbench_v2)")
