"""Per-request policy state, stored on SGLang's Req object (which has no __slots__)."""
from __future__ import annotations

import dataclasses

import torch

from ..config import PolicyConfig, request_override

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


def requested_override(req):
    params = getattr(req.sampling_params, "custom_params", None) or {}
    return params.get(REQUEST_KEY)


def state_of(req, server_cfg: PolicyConfig) -> RequestState | None:
    """The request's state, created on first use; None when no policy applies to it."""
    st = getattr(req, ATTR, False)
    if st is False:
        cfg = request_override(server_cfg, requested_override(req))
        st = RequestState(cfg=cfg) if cfg.enabled else None
        setattr(req, ATTR, st)
    return st


def existing_state(req) -> RequestState | None:
    st = getattr(req, ATTR, None)
    return st or None


def reset(req) -> None:
    """Forget compaction state (retraction re-prefills from scratch, so logical == physical again)."""
    st = existing_state(req)
    if st is not None:
        setattr(req, ATTR, RequestState(cfg=st.cfg))
