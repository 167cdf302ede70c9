"""Triton kernels (installed as sglang_ams.kernels): window-attention scoring and per-head KV compaction."""
