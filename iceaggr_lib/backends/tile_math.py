"""Triton helpers shared by dom_fused's kernels (``dom_fused``, ``dom_classes``): fp32 dots as three tf32
passes (``_mm``) or, in the flash loops, three fp16 passes (``_split16``, ``_mm16``), the "same DOM" mask of a
packed tile, the masked softmax, and the flash loop of one large DOM and head (``_flash_dom``: online softmax over
key blocks, fused with the mean pool), whose f16x3 loops may read k and v as fp16 halves split once per DOM into a
scratch slot (``_split_dom``, ``_kv16_block``: v20), and whose loops may run without a running max (``_fixed_rows``,
v24; 16-bit row sums per lane, v26). Imported only where triton is."""

import triton
import triton.language as tl


@triton.jit
def _tf32_hi(x):
    """``x`` (fp32) cut to tf32's 10 mantissa bits (the low 13 bits cleared: one AND), as fp32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """``tl.dot(a, b)`` at precision PREC. "tf32x3_mask" is tf32x3 with the operand split written here:
    hi = x cut to tf32 by masking its low 13 bits, lo = x - hi (exact, |lo| < 2^-10 |x|), then
    a_lo b_hi + a_hi b_lo + a_hi b_hi on the tensor cores; Triton's own "tf32x3" rounds both halves with
    ``cvt.rna.tf32.f32``, which sm_90 runs as a sequence of integer and compare instructions per element.
    lo goes to the tensor cores unrounded: a tf32 product reads the top 19 bits of the register, so lo is
    truncated there, an error below 2^-20 of x; the dropped a_lo b_lo is below 2^-20 of a b. (Until v18 hi was
    rounded to nearest, one integer add more per element, for 2^-21 and 2^-22.)"""
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
def _pow2_scale(m):
    """The power of two that brings ``m`` >= 0 (an fp32 scalar, a max of |x|) into [2^14, 2^15), i.e. below fp16's
    largest value 65504 with a factor 2 to spare, clamped to 2^-100 .. 2^100 (m = 0, subnormal or inf): built
    from m's exponent bits, so that scaling by it (and by its inverse) is exact. The clamp leaves |x| above 2^115
    (4e34) out of fp16's range after scaling: such inputs come out inf or NaN."""
    e = ((m.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32)  # m's biased exponent
    b = tl.minimum(tl.maximum(127 + 14 + 127 - e, 27), 227)
    return (b.to(tl.uint32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _split16(x):
    """fp32 ``x``, scaled so that its block's largest |x| lies in [2^14, 2^15) (``_pow2_scale``), as two fp16
    halves: hi = x rounded to fp16 (11 significant bits), lo = x - hi (exact in fp32) rounded to fp16 (the next 11
    bits). lo's rounding error is at most 2^-23 |x|, or 2^-25 where lo falls among fp16's subnormals (below 2^-14),
    i.e. below 2^-39 of the block's largest |x|: x = hi + lo to 22 bits, like tf32x3's two halves."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _mm16(a_hi, a_lo, b_hi, b_lo):
    """a @ b from their ``_split16`` halves: a_hi b_lo + a_lo b_hi + a_hi b_hi, three fp16 tensor-core dots with
    fp32 accumulation (products of 11-bit halves are exact in fp32; the dropped a_lo b_lo is below 2^-22 of a b).
    An fp16 mma (m16n8k16) does twice the products of a tf32 one (m16n8k8) per instruction, takes half the
    registers per operand, and its A operand layout is the accumulator's, so P needs no ``_pv_order``."""
    acc = tl.dot(a_hi, b_lo)
    acc = tl.dot(a_lo, b_hi, acc)
    return tl.dot(a_hi, b_hi, acc)


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


@triton.jit
def _saved_rows(SV, rows64, h, NH: tl.constexpr, W: tl.constexpr):
    """Pointers to rows ``rows64``, head ``h`` of the fp32 (N, NH, W) buffer a training step's forward leaves
    for the backward's large DOMs: W = DH + 2 holds [O (DH), log2-sum-exp, Di]; without a saved forward the
    backward makes a W = 2 one for [log2-sum-exp, Di] (pass 1 writes, pass 2 reads)."""
    return SV + (rows64 * NH + h) * W


@triton.jit
def _pv_order(x):
    """The key (column) order of the fp32 P @ V dot: within each group of 8 keys, key 2t + e moves to t + 4e.
    Why: a tf32 mma (m16n8k8) leaves a thread the score columns 2t, 2t+1 of each 8-column group but takes its
    A operand as columns t, t+4; with P's columns and V's rows both in this order (the sum over keys does not
    care) the scores are already where the P @ V dot wants them, and the layout change (a shuffle and selects
    per element of P's two tf32 halves) goes away. 16-bit dots need no such order (their layouts agree)."""
    return (x // 8) * 8 + (x % 4) * 2 + (x % 8) // 4


@triton.jit
def _p_in_pv_order(pb):
    """P's columns in v's row order (``_pv_order``): within each group of 8 keys, column 2t + e moves to t + 4e."""
    R: tl.constexpr = pb.shape[0]
    BL: tl.constexpr = pb.shape[1]
    return tl.reshape(tl.permute(tl.reshape(pb, (R, BL // 8, 4, 2)), (0, 1, 3, 2)), (R, BL))


@triton.jit
def _kv_block(K, V, s0, ks, n_d, h, sk_n, sk_h, sv_n, sv_h, DH: tl.constexpr, BL: tl.constexpr,
              PV_ORDER: tl.constexpr = False, MASK: tl.constexpr = True):
    """Key and value rows ks .. ks+BL-1 of the DOM starting at row s0 (n_d rows), head h: (in-DOM mask, k, v);
    ``PV_ORDER``: v's rows in ``_pv_order``. ``MASK`` False (only for a block wholly inside the DOM; ignored with
    ``PV_ORDER``): the loads without the in-DOM mask, a compare and a predicate per row fewer (v26)."""
    bl = tl.arange(0, BL)
    dcol = tl.arange(0, DH)
    km = (ks + bl) < n_d
    kr = s0 + ks + bl
    if MASK or PV_ORDER:
        kb = tl.load(K + kr[:, None] * sk_n + h * sk_h + dcol[None, :], mask=km[:, None], other=0.0)
    else:
        kb = tl.load(K + kr[:, None] * sk_n + h * sk_h + dcol[None, :])
    if PV_ORDER:
        vbl = _pv_order(bl)
        vb = tl.load(V + (s0 + ks + vbl)[:, None] * sv_n + h * sv_h + dcol[None, :],
                     mask=((ks + vbl) < n_d)[:, None], other=0.0)
    elif MASK:
        vb = tl.load(V + kr[:, None] * sv_n + h * sv_h + dcol[None, :], mask=km[:, None], other=0.0)
    else:
        vb = tl.load(V + kr[:, None] * sv_n + h * sv_h + dcol[None, :])
    return km, kb, vb


@triton.jit
def _kv16_offsets(r16, ks, h, NH: tl.constexpr, DH: tl.constexpr, BL: tl.constexpr):
    """(BL, DH) offsets of the DOM's rows ks .. ks+BL-1, head h, in the (rows, NH, 4, DH) fp16 scratch ``KV16`` of
    ``_split_dom``, where the DOM's row 0 is scratch row ``r16`` (int64); per row and head k_hi, k_lo, v_hi, v_lo,
    the half j at + j * DH."""
    return (r16 + ks + tl.arange(0, BL))[:, None] * (NH * 4 * DH) + h * (4 * DH) + tl.arange(0, DH)[None, :]


@triton.jit
def _kv16_block(KV16, r16, ks, n_d, h, NH: tl.constexpr, DH: tl.constexpr, BL: tl.constexpr):
    """Key and value rows ks .. ks+BL-1 of a DOM of n_d rows, head h, as the scaled fp16 halves that ``_split_dom``
    wrote from scratch row ``r16`` on: (in-DOM mask, k_hi, k_lo, v_hi, v_lo)."""
    km = (ks + tl.arange(0, BL)) < n_d
    offs = _kv16_offsets(r16, ks, h, NH, DH, BL)
    m = km[:, None]
    return (km, tl.load(KV16 + offs, mask=m, other=0.0), tl.load(KV16 + DH + offs, mask=m, other=0.0),
            tl.load(KV16 + 2 * DH + offs, mask=m, other=0.0), tl.load(KV16 + 3 * DH + offs, mask=m, other=0.0))


@triton.jit
def _flash_step(qb, kb, vb, km, m_i, l_i, acc, qk_scale, PREC: tl.constexpr, MASK: tl.constexpr,
                PV_ORDER: tl.constexpr = False, q_lo=None, k_scale=1.0, v_scale=1.0, k_lo=None, v_lo=None):
    """One key block of the online softmax (``_flash_rows``): ``MASK`` = whether some of its rows lie past the
    DOM's end (``km``), whose scores are then set to -inf; a block inside the DOM skips that select per score.
    ``PV_ORDER``: ``vb``'s rows came in ``_pv_order`` (``_kv_block``), and P's columns are put in that order too.
    ``PREC`` "f16x3" (fp32 inputs): ``qb`` / ``q_lo`` are q's ``_split16`` halves, k and v are scaled by
    ``k_scale`` / ``v_scale`` and split here, P is made 2^14 times larger inside its exponent (free: the row's
    subtrahend takes it) so that it fills fp16's range too; the scores, P, the row sum and ``acc`` come out in scaled
    units (``_flash_rows`` folds the scales into ``qk_scale`` and its row max; the caller divides acc by v_scale).
    ``k_lo`` / ``v_lo`` given: ``kb`` / ``vb`` are k's and v's scaled fp16 hi halves already (``_split_dom``)."""
    PRESPLIT: tl.constexpr = k_lo is not None
    F16: tl.constexpr = PREC == "f16x3" and (kb.dtype == tl.float32 or PRESPLIT)
    if PRESPLIT:
        sb = _mm16(qb, q_lo, tl.trans(kb), tl.trans(k_lo))
    elif F16:
        k_hi, k_lo = _split16(kb * k_scale)
        sb = _mm16(qb, q_lo, tl.trans(k_hi), tl.trans(k_lo))
    else:
        sb = _mm(qb, tl.trans(kb), PREC)
    if MASK:
        sb = tl.where(km[None, :], sb, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sb, axis=1))
    alpha = tl.exp2((m_i - m_new) * qk_scale)
    if F16:  # P * 2^14 (and the row sum with it: o = acc / l does not change)
        pb = tl.exp2(sb * qk_scale - (m_new * qk_scale - 14.0)[:, None])
    else:
        pb = tl.exp2(sb * qk_scale - (m_new * qk_scale)[:, None])
    l_i = l_i * alpha + tl.sum(pb, axis=1)
    if PV_ORDER:
        pb = _p_in_pv_order(pb)
    if PRESPLIT:
        p_hi, p_lo = _split16(pb)
        acc = acc * alpha[:, None] + _mm16(p_hi, p_lo, vb, v_lo)
    elif F16:
        v_hi, v_lo = _split16(vb * v_scale)
        p_hi, p_lo = _split16(pb)
        acc = acc * alpha[:, None] + _mm16(p_hi, p_lo, v_hi, v_lo)
    else:
        acc = acc * alpha[:, None] + _mm(pb.to(vb.dtype), vb, PREC)
    return m_new, l_i, acc


@triton.jit
def _flash_rows(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale,
                DH: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr, FULL: tl.constexpr = False,
                k_scale=1.0, v_scale=1.0, KV16=None, NH: tl.constexpr = 1, r16=0):
    """Online softmax of the query block ``qb`` (R x DH, R = BL or a multiple) over the n_d keys of one DOM starting
    at row s0: (row max, row sum, unnormalised P @ V), in the log2 domain, key blocks of BL rows. The running max is
    kept unscaled and the scale applied inside the exponents (one fused multiply-add per score). ``FULL``:
    the blocks wholly inside the DOM skip the end-of-DOM mask, only the last partial block applies it. fp32 dots
    (tf32 passes) take P's columns and v's rows in ``_pv_order``. ``PREC`` "f16x3" with fp32 inputs: q is scaled by
    a power of two of its own and split once (``_split16``), k and v by the DOM's ``k_scale`` / ``v_scale``
    (``_flash_dom``) in ``_flash_step``; P @ V comes back in units of v_scale, and the row max 14 lower (P and the
    row sum are 2^14 times larger: ``_flash_step``), so that the log-sum-exp, row max + log2(row sum), is right.
    ``KV16`` given (f16x3): the key blocks are read as the DOM's fp16 halves that ``_split_dom`` wrote from scratch row
    ``r16`` on (no ``FULL``)."""
    F16: tl.constexpr = PREC == "f16x3" and V.dtype.element_ty == tl.float32
    PV_ORDER: tl.constexpr = V.dtype.element_ty == tl.float32 and PREC != "ieee" and not F16
    q_lo = None
    if F16:  # scores in units of q_scale * k_scale: the exponents' scale takes them back
        q_scale = _pow2_scale(tl.max(tl.max(tl.abs(qb), axis=1), axis=0))
        qb, q_lo = _split16(qb * q_scale)
        qk_scale = qk_scale / (q_scale * k_scale)
    m_i = tl.full([qb.shape[0]], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([qb.shape[0]], dtype=tl.float32)
    acc = tl.zeros([qb.shape[0], DH], dtype=tl.float32)
    if F16 and KV16 is not None:
        for ks in range(0, n_d, BL):
            km, k_hi, k_lo, v_hi, v_lo = _kv16_block(KV16, r16, ks, n_d, h, NH, DH, BL)
            m_i, l_i, acc = _flash_step(qb, k_hi, v_hi, km, m_i, l_i, acc, qk_scale, PREC, True, False, q_lo,
                                        k_scale, v_scale, k_lo, v_lo)
    elif FULL:
        n_full = n_d - n_d % BL
        for ks in range(0, n_full, BL):
            km, kb, vb = _kv_block(K, V, s0, ks, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL, PV_ORDER)
            m_i, l_i, acc = _flash_step(qb, kb, vb, km, m_i, l_i, acc, qk_scale, PREC, False, PV_ORDER, q_lo,
                                        k_scale, v_scale)
        if n_full < n_d:
            km, kb, vb = _kv_block(K, V, s0, n_full, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL, PV_ORDER)
            m_i, l_i, acc = _flash_step(qb, kb, vb, km, m_i, l_i, acc, qk_scale, PREC, True, PV_ORDER, q_lo,
                                        k_scale, v_scale)
    else:
        for ks in range(0, n_d, BL):
            km, kb, vb = _kv_block(K, V, s0, ks, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL, PV_ORDER)
            m_i, l_i, acc = _flash_step(qb, kb, vb, km, m_i, l_i, acc, qk_scale, PREC, True, PV_ORDER, q_lo,
                                        k_scale, v_scale)
    if F16:
        return m_i * qk_scale - 14.0, l_i, acc
    return m_i * qk_scale, l_i, acc


@triton.jit
def _query_block(Q, s0, n_d, qs, h, sq_n, sq_h, DH: tl.constexpr, R: tl.constexpr):
    """Query rows qs .. qs+R-1 of the DOM starting at row s0 (n_d rows), head h: (in-DOM mask, row numbers, q)."""
    rows = tl.arange(0, R)
    qm = (qs + rows) < n_d
    qr = s0 + qs + rows
    return qm, qr, tl.load(Q + qr[:, None] * sq_n + h * sq_h + tl.arange(0, DH)[None, :], mask=qm[:, None],
                           other=0.0)


@triton.jit
def _flash_query_rows(Q, K, V, SV, s0, n_d, qs, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH: tl.constexpr,
                      DH: tl.constexpr, BL: tl.constexpr, R: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr,
                      FULL: tl.constexpr, k_scale=1.0, v_scale=1.0, KV16=None, r16=0):
    """Query rows qs .. qs+R-1 of the DOM starting at row s0 (n_d rows), head h, over all its keys
    (``_flash_rows``): the sum of their outputs (DH,), for the mean pool; ``SAVE``: O and log-sum-exp of the rows
    to ``SV`` too."""
    qm, qr, qb = _query_block(Q, s0, n_d, qs, h, sq_n, sq_h, DH, R)
    m_i, l_i, acc = _flash_rows(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale, DH, BL, PREC, FULL,
                                k_scale, v_scale, KV16, NH, r16)
    o = acc / (l_i * v_scale)[:, None]
    if SAVE:
        saved = _saved_rows(SV, qr, h, NH, DH + 2)
        tl.store(saved[:, None] + tl.arange(0, DH)[None, :], o, mask=qm[:, None])
        tl.store(saved + DH, m_i + tl.log2(l_i), mask=qm)
    return tl.sum(tl.where(qm[:, None], o, 0.0), axis=0)


# v24, the flash loops with a fixed subtrahend (``FIXED``): where the online softmax keeps a running row max and
# rescales the row sum and the P @ V accumulator whenever it grows, these loops take each query row's max over the
# DOM's *first* key block as the subtrahend of every block's exponents. The scores of later blocks may then exceed
# it, so P may exceed 1: in fp32 and bf16 (8 exponent bits) that is harmless up to a margin, checked after the
# loop: a row sum at or above the constexpr ``FIXED`` (``dom_classes.FIXED_ROW_SUM_LIMIT``, 2^64) or an output that
# is not finite sends the whole DOM to the online loops again. What goes: per block and row a max over the scores
# (an intra-thread max and two shuffles), its exponential, the rescaling of the row sum and of the accumulator.
# With 16-dim heads v24 estimated that at 40-50 of the ~170 instructions per warp and 32 x 32 block of the online
# loops (bf16; from the mma layout, not counted in SASS), counting the row sum's shuffles, which v25 keeps. Measured (do_bench forward, 4,096 events 8x16, the grid's
# batch 1): fp32 1.8 % faster (run 127); bf16 2.4 % faster with the row sums by ``tl.sum`` (v25, run 128), unchanged
# with v24's first form, which took 16-bit row sums as one more tensor-core dot (P @ ones into an (R, DH)
# accumulator: 16 more fp32 registers per thread, ptxas spilling 60 / 80 B at bf16's 128-register cap against 40 /
# 60 B with ``tl.sum``). Hence ``flash_fixed_max`` "auto" = several heads (without f16x3 loops).
# v26 (16-bit inputs; runs 130-132): the row sums per lane of the mma quad (``_lane_row_sums``), added up after the
# loop, and the blocks inside the DOM loaded without the mask: 200 -> 179 SASS instructions per warp and pair step,
# bf16 forward 1.4 % faster (0.5834 -> 0.5754 ms, the same batch). fp32's loop is left as measured in its grid.

@triton.jit
def _lane_row_sums(pb):
    """(R, 4) partial row sums of the 16-bit loops' P (R, BL): within each group of 8 keys, keys 2t and 2t + 1 go to
    column t. The sums are right in any layout; in the m16n8 mma accumulator layout that Triton gives P (sm_90, seen in
    the SASS) lane t of each quad holds exactly those keys, so each thread adds only its own values, and
    ``_fixed_rows`` adds the 4 columns once after the loop (two shuffles per row) instead of per key block (v26)."""
    R: tl.constexpr = pb.shape[0]
    BL: tl.constexpr = pb.shape[1]
    return tl.sum(tl.sum(tl.reshape(pb, (R, BL // 8, 4, 2)), axis=3), axis=1)


@triton.jit
def _fixed_accumulate(sb, vb, m, l, acc, qk_scale, PREC: tl.constexpr, PV_ORDER: tl.constexpr):
    """One key block of ``_fixed_rows``: P = 2^(scores * qk_scale - m) added into the row sums ``l`` and ``acc`` +=
    P @ V. ``l``: (R,) in fp32, (R, 4) partial sums per lane with 16-bit inputs (``_lane_row_sums``)."""
    pb = tl.exp2(sb * qk_scale - m[:, None])
    if vb.dtype != tl.float32:
        l += _lane_row_sums(pb)
        acc = tl.dot(pb.to(vb.dtype), vb, acc)
    else:
        l += tl.sum(pb, axis=1)
        if PV_ORDER:
            pb = _p_in_pv_order(pb)
        acc += _mm(pb, vb, PREC)
    return l, acc


@triton.jit
def _fixed_rows(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale, DH: tl.constexpr, BL: tl.constexpr,
                PREC: tl.constexpr):
    """``_flash_rows`` with a fixed subtrahend (v24, see above): (m, l, acc), m = each row's max score over the
    DOM's first key block times ``qk_scale`` (log2 units), l its row sums (R,), acc = P @ V; the output is acc / l.
    Key blocks wholly inside the DOM skip the end-of-DOM mask (the first block and a last partial one apply it)."""
    PV_ORDER: tl.constexpr = V.dtype.element_ty == tl.float32 and PREC != "ieee"
    LANES: tl.constexpr = V.dtype.element_ty != tl.float32  # 16-bit: row sums per lane, full blocks unmasked (v26)
    R: tl.constexpr = qb.shape[0]
    km, kb, vb = _kv_block(K, V, s0, 0, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL, PV_ORDER)
    sb = tl.where(km[None, :], _mm(qb, tl.trans(kb), PREC), float("-inf"))
    m = tl.max(sb, axis=1) * qk_scale  # every row has key 0: finite
    acc = tl.zeros([R, DH], dtype=tl.float32)
    if LANES:  # per-lane partial sums (``_lane_row_sums``), added up after the loop
        l = tl.zeros([R, 4], dtype=tl.float32)
    else:
        l = tl.zeros([R], dtype=tl.float32)
    l, acc = _fixed_accumulate(sb, vb, m, l, acc, qk_scale, PREC, PV_ORDER)
    n_full = n_d - n_d % BL
    for ks in range(BL, n_full, BL):  # blocks inside the DOM (fp32 keeps the mask: its loop as measured)
        km, kb, vb = _kv_block(K, V, s0, ks, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL, PV_ORDER, not LANES)
        l, acc = _fixed_accumulate(_mm(qb, tl.trans(kb), PREC), vb, m, l, acc, qk_scale, PREC, PV_ORDER)
    if (n_full > 0) & (n_full < n_d):  # the last, partial block (n_full = 0: the first block was the only one)
        km, kb, vb = _kv_block(K, V, s0, n_full, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL, PV_ORDER)
        sb = tl.where(km[None, :], _mm(qb, tl.trans(kb), PREC), float("-inf"))
        l, acc = _fixed_accumulate(sb, vb, m, l, acc, qk_scale, PREC, PV_ORDER)
    if LANES:
        l = tl.sum(l, axis=1)
    return m, l, acc


@triton.jit
def _fixed_query_rows(Q, K, V, SV, s0, n_d, qs, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH: tl.constexpr,
                      DH: tl.constexpr, BL: tl.constexpr, R: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr,
                      FIXED: tl.constexpr):
    """``_flash_query_rows`` by ``_fixed_rows``: (the sum of the rows' outputs (DH,), how many of the rows' values
    failed the check: a row sum of ``FIXED`` or more (a later score far above the first block's max) or an output
    that is not finite; the caller then does the DOM again by the online loop)."""
    qm, qr, qb = _query_block(Q, s0, n_d, qs, h, sq_n, sq_h, DH, R)
    m, l, acc = _fixed_rows(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale, DH, BL, PREC)
    o = acc / l[:, None]
    ok = (l[:, None] < FIXED) & (tl.abs(o) < float("inf"))  # NaN fails both
    bad = tl.sum(tl.where(qm[:, None] & (ok == 0), 1, 0))
    if SAVE:
        saved = _saved_rows(SV, qr, h, NH, DH + 2)
        tl.store(saved[:, None] + tl.arange(0, DH)[None, :], o, mask=qm[:, None])
        tl.store(saved + DH, m + tl.log2(l), mask=qm)
    return tl.sum(tl.where(qm[:, None], o, 0.0), axis=0), bad


@triton.jit
def _online_pool(Q, K, V, SV, s0, n_d, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH: tl.constexpr,
                 DH: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr, FULL: tl.constexpr,
                 PAIR: tl.constexpr, k_scale, v_scale, KV16, r16):
    """The sum of the outputs of all rows of one DOM and head (``_flash_dom``'s online loops): its query blocks
    one after another (``PAIR``: two at a time while two are left), each by ``_flash_query_rows``."""
    pooled_acc = tl.zeros([DH], dtype=tl.float32)
    start = 0
    if PAIR:
        start = n_d - n_d % (2 * BL)
        for qs in range(0, start, 2 * BL):
            pooled_acc += _flash_query_rows(Q, K, V, SV, s0, n_d, qs, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h,
                                            qk_scale, NH, DH, BL, 2 * BL, PREC, SAVE, FULL, k_scale, v_scale,
                                            KV16, r16)
    for qs in range(start, n_d, BL):
        pooled_acc += _flash_query_rows(Q, K, V, SV, s0, n_d, qs, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale,
                                        NH, DH, BL, BL, PREC, SAVE, FULL, k_scale, v_scale, KV16, r16)
    return pooled_acc


@triton.jit
def _fixed_pool(Q, K, V, SV, s0, n_d, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH: tl.constexpr,
                DH: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr, PAIR: tl.constexpr,
                FIXED: tl.constexpr):
    """``_online_pool`` by ``_fixed_query_rows`` (v24): (the sum of the rows' outputs, how many values failed the
    check)."""
    pooled_acc = tl.zeros([DH], dtype=tl.float32)
    bad = tl.full([], 0, tl.int32)
    start = 0
    if PAIR:
        start = n_d - n_d % (2 * BL)
        for qs in range(0, start, 2 * BL):
            pooled, b = _fixed_query_rows(Q, K, V, SV, s0, n_d, qs, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale,
                                          NH, DH, BL, 2 * BL, PREC, SAVE, FIXED)
            pooled_acc += pooled
            bad += b
    for qs in range(start, n_d, BL):
        pooled, b = _fixed_query_rows(Q, K, V, SV, s0, n_d, qs, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH,
                                      DH, BL, BL, PREC, SAVE, FIXED)
        pooled_acc += pooled
        bad += b
    return pooled_acc, bad


@triton.jit
def _split_dom(K, V, KV16, s0, r16, n_d, h, sk_n, sk_h, sv_n, sv_h, k_scale, v_scale, NH: tl.constexpr,
               DH: tl.constexpr, BL: tl.constexpr):
    """Write the ``_split16`` halves of the DOM's k and v rows (s0 .. s0+n_d, head h), scaled by ``k_scale`` /
    ``v_scale``, to rows r16 .. r16+n_d of ``KV16`` ((rows, NH, 4, DH) fp16: k_hi, k_lo, v_hi, v_lo per row and
    head; the program's own slot, which nothing else writes), between two waits for the program's threads: before,
    so that none still reads the slot's previous DOM; after, because the flash loops read the halves back
    (``_kv16_block``) in other threads' layouts."""
    tl.debug_barrier()
    for ks in range(0, n_d, BL):
        km, kb, vb = _kv_block(K, V, s0, ks, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL)
        k_hi, k_lo = _split16(kb * k_scale)
        v_hi, v_lo = _split16(vb * v_scale)
        offs = _kv16_offsets(r16, ks, h, NH, DH, BL)
        tl.store(KV16 + offs, k_hi, mask=km[:, None])
        tl.store(KV16 + DH + offs, k_lo, mask=km[:, None])
        tl.store(KV16 + 2 * DH + offs, v_hi, mask=km[:, None])
        tl.store(KV16 + 3 * DH + offs, v_lo, mask=km[:, None])
    tl.debug_barrier()


@triton.jit
def _flash_dom(Q, K, V, OUT, SV, CU, d, n_d, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
               NH: tl.constexpr, DH: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr,
               FULL: tl.constexpr = False, PAIR: tl.constexpr = False, KV16=None, r16=0, FIXED: tl.constexpr = 0.0):
    """DOM ``d`` (n_d pulses), head ``h``, by a flash loop: its query blocks one after another, each an online
    softmax over the DOM's key blocks (``_flash_rows``), the rows' outputs summed into the mean pool, which is
    stored to ``OUT[d, h]``. ``SAVE`` (a training step's forward): the rows' outputs O and log-sum-exp also go
    to ``SV`` (``_saved_rows``), for the backward's pass 1. ``PAIR``: query blocks two at a time (2 BL rows against
    each key block of BL rows while at least two blocks are left, then one at a time): each key block is loaded
    once for both, and the two blocks' softmax chains are independent, so one issues while the other waits.
    ``PREC`` "f16x3" (fp32 inputs): a first sweep over the DOM's key blocks finds max |k| and max |v|, whose
    ``_pow2_scale`` brings the DOM's k and v into fp16's range for the loops' ``_split16`` (any magnitude of input
    works; the sweep reads k and v once more, against the ceil(n_d / BL) times the loops read them). ``KV16`` given
    (f16x3; a (rows, NH, 4, DH) fp16 scratch, this DOM's halves from its row ``r16`` on): the scaled halves of k and
    v are written there once per DOM (``_split_dom``) and the loops read them (v20), instead of scaling and
    splitting every key block again for every query block; fp16 operands from memory also let Triton use
    Hopper's wgmma (``HGMMA``). ``FIXED`` > 0 (v24; not with f16x3): the loops of ``_fixed_rows`` (no running max)
    with ``FIXED`` the limit of their check; if any row fails it, the DOM is done again by the online loops."""
    dcol = tl.arange(0, DH)
    s0 = tl.load(CU + d).to(tl.int64)
    k_scale = tl.full([], 1.0, tl.float32)
    v_scale = tl.full([], 1.0, tl.float32)
    if PREC == "f16x3" and K.dtype.element_ty == tl.float32:
        k_max = tl.zeros([BL, DH], tl.float32)  # elementwise over the blocks, reduced once after them
        v_max = tl.zeros([BL, DH], tl.float32)
        for ks in range(0, n_d, BL):
            _, kb, vb = _kv_block(K, V, s0, ks, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL)
            k_max = tl.maximum(k_max, tl.abs(kb))
            v_max = tl.maximum(v_max, tl.abs(vb))
        k_scale = _pow2_scale(tl.max(tl.max(k_max, axis=1), axis=0))
        v_scale = _pow2_scale(tl.max(tl.max(v_max, axis=1), axis=0))
        if KV16 is not None:  # (F16 only: the loops read KV16 only then)
            _split_dom(K, V, KV16, s0, r16, n_d, h, sk_n, sk_h, sv_n, sv_h, k_scale, v_scale, NH, DH, BL)
    if FIXED > 0:
        pooled_acc, bad = _fixed_pool(Q, K, V, SV, s0, n_d, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH, DH, BL,
                                      PREC, SAVE, PAIR, FIXED)
        if bad > 0:  # a row failed the check: the DOM again by the online loops
            pooled_acc = _online_pool(Q, K, V, SV, s0, n_d, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH, DH,
                                      BL, PREC, SAVE, FULL, PAIR, k_scale, v_scale, KV16, r16)
    else:
        pooled_acc = _online_pool(Q, K, V, SV, s0, n_d, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, qk_scale, NH, DH, BL,
                                  PREC, SAVE, FULL, PAIR, k_scale, v_scale, KV16, r16)
    tl.store(OUT + d.to(tl.int64) * so_d + h * so_h + dcol,
             (pooled_acc / n_d.to(tl.float32)).to(OUT.dtype.element_ty))
