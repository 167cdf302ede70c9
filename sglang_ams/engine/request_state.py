"""Per-request policy state, stored on SGLang's Req object (which has no __slots__)."""
from __future__ import annotations

import dataclasses
import logging

import torch

from ..config import ConfigError, PolicyConfig, request_override
from . import runtime

logger = logging.getLogger("sglang_ams")

ATTR = "_ams"
REQUEST_KEY = "kv_policy"     # custom_params key of the per-request override


@dataclasses.dataclass
class RequestState:
    cfg: PolicyConfig
    pos_offset: int = 0                    # logical - physical position of the next token
    compacted: bool = False                # KV no longer matches its tokens: never insert it into the tree
    compactions: int = 0
    ring_row: int = 0                      # query-ring row (0: none)
    ring_start: int = -1                   # physical length when the ring row started collecting
    ring_lse: bool = True                  # every query of the row came with its decode-attention LSE
    credit: torch.Tensor | None = None     # [L, H, kept] EMA credit of the kept tokens
    overdue_since: int = 0                 # length at which it became ready already past its trigger (0: not)
    wake: int = 0                          # physical length before which readiness cannot change (0: check)

    def release_ring_row(self, ring, req_pool_idx: int | None) -> None:
        """Give the query-ring row back (after a compaction, or when SGLang releases the request's KV): the next
        window starts from scratch. The only place a row is returned."""
        release_ring_rows(ring, [self], [req_pool_idx])


def release_ring_rows(ring, states: list, req_pool_indices: list) -> None:
    """release_ring_row for several requests with one device write (a compaction step commits many)."""
    held = [(idx, st.ring_row) for st, idx in zip(states, req_pool_indices) if st.ring_row and idx is not None]
    if held:
        ring.release_many([idx for idx, _ in held], [row for _, row in held])
    for st in states:
        st.ring_row, st.ring_start, st.ring_lse, st.wake = 0, -1, True, 0


def requested_override(req):
    """The request's kv_policy override, or None. custom_params is typed as a dict but not checked by SGLang's
    native endpoint (a list or a string passes), so anything else means no override, as upstream treats it."""
    params = getattr(req.sampling_params, "custom_params", None)
    return params.get(REQUEST_KEY) if isinstance(params, dict) else None


def state_of(req, server_cfg: PolicyConfig) -> RequestState | None:
    """The request's state, created on first use; None when no policy applies to it.

    Runs in the scheduler, where an exception kills the server: an override that the verify hook should have
    refused (a path that skipped it) falls back to the server's policy, with a warning."""
    st = getattr(req, ATTR, False)
    if st is False:
        try:
            cfg = request_override(server_cfg, requested_override(req))
        except ConfigError as err:
            logger.warning("sglang-ams: request %s: ignoring its override (%s); the server policy applies",
                           getattr(req, "rid", "?"), err)
            cfg = server_cfg
        st = RequestState(cfg=cfg) if cfg.enabled else None
        setattr(req, ATTR, st)
    return st


def lookup(req) -> tuple:
    """(runtime, state) of a request in a policy process; (None, None) without a runtime, (rt, None) when no
    policy applies to the request. What every hook that needs the state asks."""
    rt = runtime.get()
    if rt is None:
        return None, None
    return rt, state_of(req, rt.settings.policy)


def existing_state(req) -> RequestState | None:
    st = getattr(req, ATTR, None)
    return st or None


def reset(req) -> None:
    """Forget compaction state (retraction re-prefills from scratch, so logical == physical again)."""
    st = existing_state(req)
    if st is not None:
        setattr(req, ATTR, RequestState(cfg=st.cfg))
