"""The compaction step's bookkeeping against real SGLang 0.5.17 objects on CPU (Triton under TRITON_INTERPRET).

Real SGLang objects: MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator / PagedTokenToKVPoolAllocator,
RadixCache (holds the pinned prefixes), Req, ScheduleBatch, and SGLang's own `prepare_for_decode` (allocates the
next decode slot and bumps every length) and `release_kv_cache`. Stand-ins, only where SGLang needs a model:
`model_config` / `sampling_info` on the batch (prepare_for_decode reads one flag of each), the ForwardBatch and
attention layer handed to our forward / ring hooks, and the model itself (random K/V and queries, never zeros).

The loop each test drives is the scheduler's: Compactor.step (what our update_running_batch hook runs), then
prepare_for_decode, then a "forward" that writes the new token's K/V, records its query in the ring through the
RadixAttention hook (positions through the ForwardBatch hook) and appends an output token. Every compaction is
checked the same way (`checks.check_compaction`): moved data, untouched bytes, freed slots, lengths, offsets.

harness.py builds the SGLang objects and drives the loop, checks.py holds the checks, one test file per topic.
"""
import pytest

# Skips the package without SGLang; importing it here (warnings silenced) also keeps SGLang's import-time warnings
# out of the test report.
pytest.importorskip("sglang.srt.mem_cache.memory_pool")
