"""The ``varlen`` backend: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention on packed sequences).

How it works
------------
The packed (N, H, Dh) q, k, v and ``cu_seqlens`` are exactly FlashAttention's varlen layout: each DOM is one
"sequence", ``max_dom_pulses`` is ``max_seqlen``; no padding, no mask, work = sum over DOMs of n^2. The
per-pulse output is mean-pooled per DOM (``pooling.mean_pool_packed``).

Chunking: the kernel launches one grid row per sequence, and CUDA's grid y/z limit is 65,535; a batch of
~4,096 events holds ~200k DOMs and failed with "CUDA error: invalid argument". ``prepare`` therefore cuts
the DOMs into chunks of at most ``MAX_DOMS_PER_CALL`` (65,535) DOMs and makes each chunk's cu_seqlens
(rebased to 0) and max length once per batch; ``attend`` makes one call per chunk (a handful, never one
per DOM) and concatenates.

Supported: CUDA, fp16/bf16 (FlashAttention), forward and backward (varlen_attn has an autograd formula).
The signature changed across PyTorch versions (2.10: ``is_causal``; 2.11+: keyword ``scale``); when the
installed version takes no ``scale``, q is pre-multiplied so that the default 1/sqrt(Dh) gives ``scale``.
"""

from __future__ import annotations

import inspect

import torch

from iceaggr_lib.backends import BackendSpec, UnsupportedError
from iceaggr_lib.backends.pooling import mean_pool_packed
from iceaggr_lib.collate import DomBatch

MAX_DOMS_PER_CALL = 65_535

try:
    from torch.nn.attention.varlen import varlen_attn
    _TAKES_SCALE = "scale" in inspect.signature(varlen_attn).parameters
except ImportError:  # PyTorch < 2.10
    varlen_attn = None
    _TAKES_SCALE = False


def chunk_plan(cu_seqlens: torch.Tensor, dom_pulse_counts: torch.Tensor, max_doms: int = MAX_DOMS_PER_CALL):
    """[(row0, row1, cu_chunk int32 on device, max_len)] covering all DOMs, at most ``max_doms`` each."""
    n_doms = int(dom_pulse_counts.shape[0])
    bounds = list(range(0, n_doms, max_doms)) + [n_doms]
    cu_host = cu_seqlens[bounds].tolist()  # D/65,535 + 1 numbers to the host
    chunk_max = [int(m) for m in torch.stack([dom_pulse_counts[a:b].max() for a, b in zip(bounds, bounds[1:])]).tolist()]
    plan = []
    for (d0, d1), (r0, r1), max_len in zip(zip(bounds, bounds[1:]), zip(cu_host, cu_host[1:]), chunk_max):
        plan.append((r0, r1, (cu_seqlens[d0:d1 + 1] - r0).to(torch.int32), max_len))
    return plan


def prepare(batch: DomBatch, n_heads: int, head_dim: int, dtype: torch.dtype):
    return chunk_plan(batch.cu_seqlens, batch.dom_pulse_counts)


def attend(q, k, v, batch: DomBatch, prep, scale: float):
    if varlen_attn is None:
        raise UnsupportedError(f"backend 'varlen': torch {torch.__version__} has no torch.nn.attention.varlen")
    default_scale = q.shape[-1] ** -0.5
    outs = []
    for r0, r1, cu, max_len in prep:
        cu = cu.to(q.device)
        qc, kc, vc = q[r0:r1], k[r0:r1], v[r0:r1]
        if _TAKES_SCALE:
            out = varlen_attn(qc, kc, vc, cu, cu, max_len, max_len, scale=scale)
        else:
            if scale != default_scale:
                qc = qc * (scale / default_scale)
            out = varlen_attn(qc, kc, vc, cu, cu, max_len, max_len)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return mean_pool_packed(out, batch)


SPEC = BackendSpec(
    name="varlen",
    description="torch varlen_attn (FlashAttention, packed cu_seqlens), chunked to <= 65,535 DOMs per call",
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.bfloat16, torch.float16}),
    modes=frozenset({"forward", "forward_backward"}),
    attend=attend,
    prepare=prepare,
)
