"""Triton helpers shared by dom_fused's kernels (``dom_fused``, ``dom_classes``): fp32 dots as three tf32
passes, the "same DOM" mask of a packed tile, and the masked softmax. Imported only where triton is."""

import triton
import triton.language as tl


@triton.jit
def _tf32_hi(x):
    """``x`` (fp32) rounded to tf32's 10 mantissa bits (to nearest, ties away from zero), as fp32."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """``tl.dot(a, b)`` at precision PREC. "tf32x3_mask" is tf32x3 with the operand split written here:
    hi = x rounded to tf32 by integer ops on its bits, lo = x - hi (exact), then
    a_lo b_hi + a_hi b_lo + a_hi b_hi on the tensor cores; Triton's own "tf32x3" rounds both halves with
    ``cvt.rna.tf32.f32``, which sm_90 runs as a sequence of integer and compare instructions per element.
    lo goes to the tensor cores unrounded: a tf32 product reads the top 19 bits of the register, so lo is
    truncated there, an error of <= 2^-21 of x (GPU tests: output errors unchanged, at fp32's own rounding)."""
    if PREC == "tf32x3_mask" and a.dtype == tl.float32 and b.dtype == tl.float32:
        a_hi = _tf32_hi(a)
        b_hi = _tf32_hi(b)
        acc = tl.dot(a - a_hi, b_hi, input_precision="tf32")
        acc = tl.dot(a_hi, b - b_hi, acc, input_precision="tf32")
        return tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    elif PREC == "tf32x3_mask":  # 16-bit operands: the tensor cores take them as they are
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _same_dom(own, dom_r, T2: tl.constexpr):
    """(T2, T2) mask of the tile's pairs (query row, key row) of owned rows of one DOM, by one compare per
    pair: rows not owned get ids below zero that match nothing (query and key ids of them differ)."""
    i = tl.arange(0, T2)
    kid = tl.where(own, dom_r, -1 - i)
    qid = tl.where(own, dom_r, -1 - T2 - i)
    return qid[:, None] == kid[None, :]


@triton.jit
def _masked_softmax(s, keep, qk_scale, AXIS: tl.constexpr):
    """Softmax of the unscaled scores ``s`` along their last axis ``AXIS`` (1 for a tile, 2 for a batch of
    heads' tiles), over the pairs where ``keep`` (broadcast to ``s``) holds, in the log2 domain (``qk_scale``
    includes log2 e); a row without any such pair comes out as zeros. The scale is applied inside the
    exponent (one fused multiply-add per score: max(s) * scale = max(s * scale))."""
    s = tl.where(keep, s, float("-inf"))
    m = tl.max(s, axis=AXIS)
    m = tl.where(m == float("-inf"), 0.0, m * qk_scale)  # a row without pairs: all exp2(-inf) = 0
    p = tl.exp2(s * qk_scale - tl.expand_dims(m, AXIS))
    l = tl.sum(p, axis=AXIS)
    return p * tl.expand_dims(1.0 / tl.where(l > 0, l, 1.0), AXIS)
