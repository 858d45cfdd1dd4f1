"""The layer's two input projections (``pulse_embed`` then ``qkv_proj``) as one Triton launch, for the
graphed small-batch forward (``graphs.GraphedDomForward``).

Why: at 16 events (~1.2k pulses) the layer forward replayed from a CUDA graph is three kernels, and in fp32
(tf32 off) the two projections are cuBLAS GEMMs on the CUDA cores, about 15 TFLOP/s at this size (run 73,
``scripts/profile_graph.py``: 2.9 + 8.5 µs of kernels at a 1,280-row bucket, beside 7.4 µs of attention).
One launch computes both: each program takes ``BM`` pulses and a ``BN``-column block of the output, makes their
embedding ``h = x We^T + be`` (the 6 features padded to 16 for the dot) ``KC`` columns at a time, in registers,
and multiplies each chunk into the output block, adding the bias last, so ``h`` never goes to memory.

The arithmetic: in bf16 the eager layer's (the features rounded to bf16 first, ``h`` rounded to bf16 between the
two products, both accumulated in fp32, as the two ``nn.Linear`` calls do); in fp32 (tf32 off in the eager layer)
each product as three tf32 tensor-core passes on split operands (``tile_math._mm``'s "tf32x3_mask", as dom_fused's
fp32 attention), whose error is fp32's own class (rel err 1.8e-7 against float64 in run 73, before v18 cut
the split's hi by masking; the tests hold it to 1e-5 since), not one tf32 pass's (1.5e-3).
Triton's fp32 dots on the CUDA cores ("ieee") are exact too but 2-3x slower than cuBLAS here (run 72). Results agree
with the eager layer to the dtype's rounding (the summation order differs), not bit for bit.
"""

from __future__ import annotations

import torch

from iceaggr_lib.backends.triton_launch import HAVE_TRITON, tl, triton

BM = 32  # pulses per program
BN = 64  # output columns per program
KC = 32  # d_model columns of the embedding per step


if HAVE_TRITON:
    from iceaggr_lib.backends.tile_math import _mm

    @triton.jit
    def _project_kernel(X, WE, BE, WQ, BQ, OUT, n, F, sx_n, so_n, D: tl.constexpr, FP: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr, PREC: tl.constexpr):
        """Rows ``BM`` x columns ``BN`` of ``(x We^T + be) Wqkv^T + bqkv``, d_model in chunks of KC: each chunk of
        the embedding is made (a K = FP dot) and at once multiplied into the output block (fp32 dots over all of
        d_model at once keep too much live: ptxas spills kilobytes per thread)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        rm = rows < n
        fcol = tl.arange(0, FP)
        fm = fcol < F
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        x = tl.load(X + rows[:, None].to(tl.int64) * sx_n + fcol[None, :], mask=rm[:, None] & fm[None, :], other=0.0)
        x = x.to(WE.dtype.element_ty)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, D, KC):
            kcol = k0 + tl.arange(0, KC)
            we_t = tl.load(WE + kcol[None, :] * F + fcol[:, None], mask=fm[:, None], other=0.0)  # We^T[:, chunk]
            h = _mm(x, we_t, PREC) + tl.load(BE + kcol)[None, :].to(tl.float32)
            wq_t = tl.load(WQ + cols[None, :] * D + kcol[:, None])  # Wqkv^T[chunk, column block]
            acc += _mm(h.to(wq_t.dtype), wq_t, PREC)
        o = acc + tl.load(BQ + cols)[None, :].to(tl.float32)
        tl.store(OUT + rows[:, None].to(tl.int64) * so_n + cols[None, :], o.to(OUT.dtype.element_ty),
                 mask=rm[:, None])


def supports(embed: torch.nn.Linear, qkv: torch.nn.Linear) -> bool:
    """Whether ``fused_qkv`` takes these layers: Triton present, weights on CUDA (or the interpreter) in fp32 or
    bf16, both with biases, d_model a power of two >= 32 and a multiple of ``BN`` for the qkv's 3 d_model."""
    w = qkv.weight
    d = embed.out_features
    return (HAVE_TRITON and embed.bias is not None and qkv.bias is not None and w.dtype in (torch.float32, torch.bfloat16)
            and embed.weight.dtype == w.dtype and d >= 32 and d & (d - 1) == 0 and (3 * d) % BN == 0
            and qkv.in_features == d and embed.in_features <= 16)


def fused_qkv(x: torch.Tensor, embed: torch.nn.Linear, qkv: torch.nn.Linear, precision: str = "tf32x3_mask"
              ) -> torch.Tensor:
    """``qkv(embed(x.to(dtype)))`` for pulse features ``x`` (N, F) in one launch: (N, 3 * d_model) in the layers'
    dtype. ``supports(embed, qkv)`` must hold. ``precision``: of the fp32 dots, "tf32x3_mask" (three tf32
    tensor-core passes, fp32-class error: ``tile_math._mm``) or "ieee" (CUDA-core FMAs; 2-3x slower, run 72)."""
    if precision not in ("tf32x3_mask", "ieee"):
        raise ValueError(f"fused_qkv: precision must be 'tf32x3_mask' or 'ieee', got {precision!r}")
    if not supports(embed, qkv):
        raise ValueError(f"fused_qkv: layers not supported (triton {HAVE_TRITON}, {embed} then {qkv}, dtype "
                         f"{qkv.weight.dtype}; see fused_projection.supports)")
    if x.device != qkv.weight.device:
        raise ValueError(f"fused_qkv: x is on {x.device}, the layers on {qkv.weight.device}")
    n, f = x.shape
    if f != embed.in_features:
        raise ValueError(f"fused_qkv: x has {f} features, pulse_embed takes {embed.in_features}")
    d = embed.out_features
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((n, 3 * d), device=x.device, dtype=qkv.weight.dtype)
    if n == 0:
        return out
    we, wq = embed.weight.contiguous(), qkv.weight.contiguous()
    _project_kernel[(triton.cdiv(n, BM), 3 * d // BN)](x, we, embed.bias, wq, qkv.bias, out, n, f, x.stride(0),
                                                       out.stride(0), D=d, FP=16, BM=BM, BN=BN, KC=min(KC, d),
                                                       PREC=precision, num_warps=4)
    return out
