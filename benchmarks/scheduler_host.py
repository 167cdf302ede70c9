"""Host time the plugin adds to one scheduler iteration when nothing compacts: the compactor's look at a decode
batch of N requests far from their triggers (every step), and the admission hook SGLang's PrefillAdder calls for
every running request (each time it considers a prefill). Real SGLang requests, batches, pools and radix cache on
CPU tensors (the engine tests' harness), AMS at budget 1024, interval 512, 256-token requests.

    python benchmarks/scheduler_host.py [--requests 512] [--reps 50]

`every step` is the rule without RequestState.wake: each request's readiness checked at every step (monkeypatched
the way tests/engine/test_wake.py does), for comparison.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from results_io import save, table

from sglang_ams.config import PolicyConfig
from sglang_ams.engine import request_state
from sglang_ams.engine.compactor import Compactor
from sglang_ams.patches import schedule_policy
from tests.engine import harness

PROMPT = 256


def per_call_ms(fn, reps: int, rounds: int = 20) -> float:
    """The best of `rounds` means over `reps` calls (a small shared machine is noisy)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps)
    return 1e3 * best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    cfg = PolicyConfig(policy="ams", scorer="snapkv", budget=1024, interval=512)
    env = harness.make_env(policy=cfg, debug_checks=False, trace=False, pool_tokens=a.requests * (PROMPT + 16),
                           req_slots=a.requests + 1, max_context=2 * PROMPT)
    reqs = [harness.add_request(env, f"r{i}", list(range(PROMPT))) for i in range(a.requests)]
    for r in reqs:
        r.decode_batch_idx = 100        # well past the first decode steps
    batch = harness.make_batch(env, reqs)

    def offsets():
        for r in reqs:
            schedule_policy.running_offset_hook(lambda adder, req: 1 << 20, None, r)

    rows = [{"requests": a.requests, "what": "compactor step (wake)", "ms": per_call_ms(lambda: env.compactor.step(batch), a.reps)}]
    readiness = Compactor._readiness

    def every_step(self, req, st, length):
        ready = readiness(self, req, st, length)
        st.wake = 0
        return ready
    Compactor._readiness = every_step
    for r in reqs:
        request_state.existing_state(r).wake = 0
    try:
        rows.append({"requests": a.requests, "what": "compactor step (every step)",
                     "ms": per_call_ms(lambda: env.compactor.step(batch), a.reps)})
    finally:
        Compactor._readiness = readiness
    rows.append({"requests": a.requests, "what": "admission hook over the running batch", "ms": per_call_ms(offsets, a.reps)})
    print(table(rows, ["requests", "what", "ms"]))
    print(save("scheduler_host", rows, {"args": vars(a)}))


if __name__ == "__main__":
    main()
