"""The ``padded`` backend: pad every DOM to the longest DOM of the batch, one SDPA with a key-padding mask.

``prepare`` builds the padding index once per batch: ``rows`` (D, L) with L = ``max_dom_pulses``, the
packed row of the j-th pulse of DOM d (row 0 where j is past the DOM's end), and ``valid`` (D, L).
``attend`` gathers q, k, v into (D, H, L, Dh), runs one ``F.scaled_dot_product_attention`` (``sdpa.sdpa``) whose boolean
mask (D, 1, 1, L) hides padded keys, and averages the real query rows (``mean_pool_padded``). Padded query
rows still see the DOM's real keys, so nothing is NaN; they are dropped by the pooling.

Memory and work grow as D * L (and D * L^2 for scores): cheap when DOMs are similar in size, wasteful on
IceCube, where the median DOM has one pulse and the longest a few hundred.
"""

from __future__ import annotations

import torch

from iceaggr_lib.backends import MODES, BackendSpec
from iceaggr_lib.backends.pooling import mean_pool_padded
from iceaggr_lib.backends.sdpa import sdpa
from iceaggr_lib.collate import DomBatch


def prepare(batch: DomBatch, n_heads: int, head_dim: int, dtype: torch.dtype):
    device = batch.cu_seqlens.device
    length = batch.max_dom_pulses
    offsets = torch.arange(length, device=device)
    counts = batch.dom_pulse_counts
    valid = offsets[None, :] < counts[:, None]
    rows = torch.where(valid, batch.cu_seqlens[:-1, None].long() + offsets[None, :], 0)
    return {"rows": rows, "valid": valid, "counts": counts}


def attend(q, k, v, batch: DomBatch, prep, scale: float):
    rows, valid = prep["rows"].to(q.device), prep["valid"].to(q.device)
    qp, kp, vp = (t[rows].transpose(1, 2) for t in (q, k, v))  # (D, H, L, Dh)
    out = sdpa(qp, kp, vp, attn_mask=valid[:, None, None, :], scale=scale)
    return mean_pool_padded(out, valid, prep["counts"].to(q.device))


SPEC = BackendSpec(
    name="padded",
    description="pad DOMs to max_dom_pulses, one SDPA with a key-padding mask",
    devices=frozenset({"cpu", "cuda"}),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
    modes=frozenset(MODES),
    attend=attend,
    prepare=prepare,
)
