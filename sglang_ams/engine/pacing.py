"""How many of the ready requests compact in this step, under --ams-step-requests N.

A batch whose requests started together reaches its triggers together, and one compaction step over all of them
stalls decode for many step-times. With N > 0 a step compacts at most N requests, the most urgent first, and
runs as late as the triggers allow: it is skipped while N per step from the next step on still compacts every
ready request before its deadline, and takes more than N only when fewer would let one pass it. The deadline is
the trigger; for a request that became ready already past it (a long prompt), that length plus the overdue wait
(Compactor._deadline). Either way a request never holds more than admission reserved for it (one that had to
wait for a query-ring row aside).
"""
from __future__ import annotations


def paced_count(steps_left: list[int], n: int) -> int:
    """`steps_left`: for each ready request, most urgent first, the decode steps before it reaches its trigger
    (0: at it). Returns how many of them compact now: 0 if waiting one step keeps every request within its
    trigger at n per step, else max(n, the smallest per-step count that does), at most all of them."""
    left = [max(0, d) for d in steps_left]
    # Request i (0-based) is the (i + 1)-th to go; from the next step on it has left[i] steps.
    if all(i + 1 <= n * d for i, d in enumerate(left)):
        return 0
    needed = max(-(-(i + 1) // (d + 1)) for i, d in enumerate(left))     # ceil((i + 1) / (steps incl. now))
    return min(len(left), max(n, needed))
