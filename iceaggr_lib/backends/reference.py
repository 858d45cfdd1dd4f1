"""The float64 reference backend: plainly written, vectorised, used to check every other backend.

How it works
------------
Every input is cast to float64. DOMs are bucketed by their pulse count rounded up to the next power of two
(1, 2, 4, ..., 512): a DOM of n pulses is padded to L = next_pow2(n) rows, so padding at most doubles the
work and the number of buckets is ~10, never one per DOM. Within a bucket, DOMs are gathered into a padded
(n_doms, H, L, Dh) block, attention is the textbook

    softmax(q k^T * scale  with padded keys set to -inf) v

and the mean over the real query rows gives one row per DOM. Buckets are processed in chunks whose score
tensor stays under ``CHUNK_ELEMENTS`` float64 numbers (~256 MiB), so a 4,096-event batch (~450k pulses,
~200k DOMs) fits on a GPU and ~1k events fit on a CPU. The cost is sum over DOMs of L^2, never N^2.

Outputs are float64 whatever the input dtype; autograd works through it (gathers, softmax and matmuls),
so gradients of the other backends are checked against it too.
"""

from __future__ import annotations

import torch

from iceaggr_lib.backends import MODES, BackendSpec
from iceaggr_lib.collate import DomBatch

CHUNK_ELEMENTS = 32 * 2**20  # float64 score elements per chunk: 256 MiB


def prepare(batch: DomBatch, n_heads: int, head_dim: int, dtype: torch.dtype):
    """Bucket DOMs by next-power-of-two length: a list of (L, dom indices) with the DOMs of that bucket."""
    counts = batch.dom_pulse_counts
    padded_len = torch.where(counts <= 1, torch.ones_like(counts),
                             2 ** torch.ceil(torch.log2(counts.double())).long())
    order = torch.argsort(padded_len, stable=True)
    lengths, n_per_length = torch.unique_consecutive(padded_len[order], return_counts=True)
    buckets = []
    start = 0
    for length, n in zip(lengths.tolist(), n_per_length.tolist()):  # ~10 buckets, not one per DOM
        buckets.append((int(length), order[start:start + n]))
        start += n
    return buckets


def attend(q, k, v, batch: DomBatch, prep, scale: float):
    n_heads, head_dim = q.shape[1], q.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    starts = batch.cu_seqlens[:-1].to(q.device, torch.long)
    counts = batch.dom_pulse_counts.to(q.device)
    pieces, dom_order = [], []
    for length, doms in prep:
        doms = doms.to(q.device)
        chunk = max(1, CHUNK_ELEMENTS // (n_heads * length * length))
        offsets = torch.arange(length, device=q.device)
        for c0 in range(0, len(doms), chunk):
            d = doms[c0:c0 + chunk]
            valid = offsets[None, :] < counts[d, None]  # (n, L)
            rows = torch.where(valid, starts[d, None] + offsets[None, :], 0)  # padded rows read row 0
            qd, kd, vd = (t[rows].transpose(1, 2) for t in (q, k, v))  # (n, H, L, Dh)
            scores = (qd @ kd.transpose(-1, -2)) * scale  # (n, H, L, L)
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
            out = scores.softmax(dim=-1) @ vd  # (n, H, L, Dh)
            out = (out * valid[:, None, :, None]).sum(dim=2) / counts[d, None, None]
            pieces.append(out)
            dom_order.append(d)
    out = torch.cat(pieces)
    inverse = torch.empty_like(torch.cat(dom_order))
    inverse[torch.cat(dom_order)] = torch.arange(len(inverse), device=q.device)
    return out[inverse].reshape(batch.n_doms, n_heads, head_dim)


SPEC = BackendSpec(
    name="reference",
    description="float64 textbook attention, DOMs bucketed by next-pow2 length (checks the others)",
    devices=frozenset({"cpu", "cuda"}),
    dtypes=frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16}),
    modes=frozenset(MODES),
    attend=attend,
    prepare=prepare,
)
