"""dom_fused's DOMs by size class: small DOMs of one size class packed into tiles, large ones flash-looped
largest first; attention + mean pool.

Why: ``dom_fused``'s row-window tiles pack the small DOMs that start in a window into one masked T x T or
2T x 2T tile. On IceCube-like batches (4,096 sample events: 181k one-pulse DOMs, 41k of 2-16 pulses,
1.7k of 17-32) most of such a tile's scores are masked out (one-pulse rows, pairs of different DOMs),
and with 16-dim heads a tile's cost is its softmax over all of them, not its dots. Sorting the DOMs by
size first lets a tile hold only DOMs of one size class, each padded to the class's size:

* ``_classify_kernel`` (one launch, ``CLASSIFY_BLOCK`` DOMs per program) copies each one-pulse DOM's v row
  to its output (its softmax is 1) and appends every DOM of 2 <= n <= TOP pulses to the list of its class
  c, ``2^(c-1) < n <= 2^c``, reserving slots by one atomic add per class and program on ``COUNTER[c]``
  (zeroed by the caller). The order inside a list is whatever the atomics make it; it does not matter,
  since a DOM's result depends only on its own rows.
* ``_class_attend_kernel`` (one launch, ``PROGRAMS_PER_SM`` programs per SM taking work items from a
  ticket counter) makes each item one tile of T = max(16, 2^c) rows: the T / 2^c DOMs of list slots
  i0 .. of class c, DOM b in rows b * 2^c .. (padding rows masked). Every head at once: scores as a batch
  of T x T dots, a softmax inside each DOM (block-diagonal mask), and the pooling as one more dot,
  ``pooled[b] = sum_j [DOM(j) = b] w_j v_j`` with ``w_j = (1/n) sum_i P_ij``, the same arithmetic as
  ``dom_fused``'s tiles (``tile_math``). A class-2 tile is 8 DOMs of 2 pulses: 32 of its 256 scores per
  head are real pairs, where a row-window tile of the same DOMs also spans their one-pulse neighbours.

With ``large_list`` the DOMs above TOP are listed too, and done by flash loops (v15):

* ``_list_large_kernel`` (one launch, ``LIST_BLOCK`` DOMs per program, reading only ``dom_pulse_counts``) appends
  each DOM of n > TOP pulses to the list of its large class c (2^(c-1) < n <= 2^c, ``LARGE_CLASSES`` of them, the
  last open-ended); class c has room for ``(N >> (c-1)) + 1`` DOMs (each has more than 2^(c-1) of the N pulses).
* ``_large_attend_kernel`` (one persistent launch, ``LARGE_PROGRAMS_PER_SM`` programs per SM, a ticket counter)
  makes each item one (DOM, head), the largest class first, so the longest loops start first: the flash loop of
  ``tile_math._flash_dom`` (query blocks one after another, each an online softmax over the DOM's key blocks,
  summed into the mean pool). Where the window launches of ``dom_fused`` had one program per (window, head),
  most of them finding no large DOM, this launch has only work. With f16x3 flash loops (fp32, v20) each item first
  writes its DOM's k and v rows as scaled fp16 halves to its program's slot of a scratch (``presplit_buffer``), and
  its loops read them (with ``query_pairs``, the default there, two query blocks at a time).

The layout read is the packed one of ``DomBatch`` (the rows of DOM d are ``cu_seqlens[d] ..
cu_seqlens[d+1]``); q, k, v are (N, H, Dh) with any row and head strides, the output (D, H, Dh). Without
``large_list`` the DOMs of more than TOP pulses are left to the caller's other launches; zero-pulse DOM slots
are never written.
"""

from __future__ import annotations

import torch

from iceaggr_lib.backends.triton_launch import HAVE_TRITON, FastLaunch, tl, triton

CLASSIFY_BLOCK = 64  # DOMs per classify program (it copies the one-pulse DOMs' v rows too)
PROGRAMS_PER_SM = 8  # the class launch's programs (each loops over work items)
LARGE_PROGRAMS_PER_SM = 8  # the large-DOM launch's
LARGE_CLASSES = 8  # size classes of the DOMs above the top: 2^(c-1) < n <= 2^c, the last one open-ended
LIST_BLOCK = 1024  # DOMs per program of the large-DOM list launch (it only reads dom_pulse_counts)
# v20's split halves (``large_attend``'s kv16): a slot of the scratch per program, reused from DOM to DOM; a DOM of
# more pulses than a slot holds takes v19's loop (k and v split per key block). 2 programs per SM are what fit (255
# registers, 98 KB of shared memory at 4 warps and 2 stages, DH = 128), so more would only wait for them to finish.
PRESPLIT_PROGRAMS_PER_SM = 2
PRESPLIT_ROWS = 512  # rows per slot: every DOM of the IceCube data (at most 455 pulses)
# v24's flash loops without a running max (``large_attend``'s fixed_max): a DOM any of whose rows sums to this or
# more (a later score 64 or more above its first key block's max, in log2 units), or gives an output that is not
# finite, is done again by the online loops. P up to 2^64 is far inside fp32's and bf16's range (2^128).
FIXED_ROW_SUM_LIMIT = 2.0 ** 64


def check_fixed_max(precision, presplit: bool = False, name: str = "fixed_max") -> None:
    """The one rule of the loops without a running max (``large_attend``'s ``fixed_max``, dom_fused's
    ``flash_fixed_max``): not with f16x3 loops, split halves (``kv16``) or not, whose fp16 P would overflow where
    these loops let P exceed 1. Raises ValueError naming ``name``."""
    if presplit or precision == "f16x3":
        raise ValueError(f"dom_fused: {name} needs loops without f16x3 halves (their P may exceed fp16's range), got "
                         f"precision {precision!r}{' with kv16' if presplit else ''}")


def n_classes(top: int) -> int:
    """Classes of DOM sizes 1 .. top (a power of two): 1, 2, (3-4), (5-8), ... (top/2+1 .. top)."""
    if top < 1 or top & (top - 1):
        raise ValueError(f"dom_fused: the size classes' top must be a power of two, got {top}")
    return top.bit_length()


def large_capacity(n_pulses: int, top: int) -> int:
    """Slots of the large-DOM list: class c (DOMs of more than 2^(c-1) pulses) holds at most
    ``(n_pulses >> (c-1)) + 1`` of them (``_large_offset``)."""
    nc = n_classes(top)
    return sum((n_pulses >> (c - 1)) + 1 for c in range(nc, nc + LARGE_CLASSES))


if HAVE_TRITON:
    from iceaggr_lib.backends.tile_math import _flash_dom, _masked_softmax, _mm, _same_dom

    @triton.jit
    def _head_offsets(s_h, NH: tl.constexpr, DH: tl.constexpr):
        """(NH, DH) offsets of one row's heads."""
        return tl.arange(0, NH)[:, None] * s_h + tl.arange(0, DH)[None, :]

    @triton.jit
    def _append(LIST, COUNT, d, mine):
        """Append the DOM ids ``d`` where ``mine`` to the list at ``LIST``: one atomic add on its count reserves
        the program's slots, ``cumsum`` numbers them."""
        mine = mine.to(tl.int32)
        total = tl.sum(mine, axis=0)
        if total > 0:
            base = tl.atomic_add(COUNT, total)
            tl.store(LIST + base + tl.cumsum(mine, axis=0) - 1, d, mask=mine > 0)

    @triton.jit
    def _classify_kernel(V, OUT, CU, CNT, D, LIST, COUNTER, sv_n, sv_h, so_d, so_h,
                         NC: tl.constexpr, CB: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr):
        """DOMs pid*CB .. +CB: a one-pulse DOM's output is its v row (softmax 1), copied here; each DOM of
        2 <= n <= 2^(NC-1) pulses is appended to its class's list (``LIST[c * D + slot]``, slots reserved by an
        atomic add on ``COUNTER[c]``)."""
        d = tl.program_id(0) * CB + tl.arange(0, CB)
        n = tl.load(CNT + d, mask=d < D, other=0).to(tl.int32)
        one = n == 1
        s0 = tl.load(CU + d, mask=one, other=0).to(tl.int64)
        v = tl.load(V + s0[:, None, None] * sv_n + _head_offsets(sv_h, NH, DH)[None, :, :], mask=one[:, None, None])
        tl.store(OUT + d.to(tl.int64)[:, None, None] * so_d + _head_offsets(so_h, NH, DH)[None, :, :],
                 v.to(OUT.dtype.element_ty), mask=one[:, None, None])
        for c in tl.static_range(1, NC):
            _append(LIST + c * D, COUNTER + c, d, (n > ((1 << c) >> 1)) & (n <= (1 << c)))

    @triton.jit
    def _class_tile(Q, K, V, OUT, CU, CNT, LIST, count, i0, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h,
                    qk_scale, P: tl.constexpr, T: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr,
                    PREC: tl.constexpr):
        """One work item: the T // P DOMs ``LIST[i0 ..]`` (those below ``count``) of a class padded to P rows
        each, stacked into one T-row tile (row r is row r % P of the item's DOM r // P), every head at once:
        scores as a batch of (T x T) dots, softmax inside each DOM (block-diagonal mask), and the pooling as
        one more dot, ``pooled[o] = sum_j [DOM(j) = o] w_j v_j`` with ``w_j = (1/n) sum_i P_ij``."""
        B: tl.constexpr = T // P
        r = tl.arange(0, T)
        slot = i0 + r // P
        listed = slot < count
        dom_r = tl.load(LIST + slot, mask=listed, other=0)
        cnt_r = tl.load(CNT + dom_r, mask=listed, other=0).to(tl.int32)
        rows64 = tl.load(CU + dom_r, mask=listed, other=0).to(tl.int64) + r % P
        own = listed & (r % P < cnt_r)
        hcol = tl.arange(0, NH).to(tl.int64)
        dcol = tl.arange(0, DH)
        offs = hcol[:, None, None] * sq_h + rows64[None, :, None] * sq_n + dcol[None, None, :]
        q = tl.load(Q + offs, mask=own[None, :, None], other=0.0)  # (NH, T, DH)
        k = tl.load(K + hcol[:, None, None] * sk_h + rows64[None, :, None] * sk_n + dcol[None, None, :],
                    mask=own[None, :, None], other=0.0)
        v = tl.load(V + hcol[:, None, None] * sv_h + rows64[None, :, None] * sv_n + dcol[None, None, :],
                    mask=own[None, :, None], other=0.0)
        p = _masked_softmax(_mm(q, tl.permute(k, (0, 2, 1)), PREC), _same_dom(own, dom_r, T)[None, :, :], qk_scale, 2)
        w = tl.sum(p, axis=1) * (1.0 / tl.where(own, cnt_r, 1).to(tl.float32))[None, :]  # (NH, T) per key row
        o = tl.arange(0, T)  # output slot o: the item's DOM o (o < B)
        sel = ((r[None, :] // P) == o[:, None]) & own[None, :]
        pooled = _mm(tl.where(sel[None, :, :], w[:, None, :], 0.0).to(v.dtype), v, PREC)  # (NH, T, DH)
        out_ok = (o < B) & (i0 + o < count)
        out_d = tl.load(LIST + i0 + o, mask=out_ok, other=0).to(tl.int64)
        tl.store(OUT + hcol[:, None, None] * so_h + out_d[None, :, None] * so_d + dcol[None, None, :],
                 pooled.to(OUT.dtype.element_ty), mask=out_ok[None, :, None])

    @triton.jit
    def _class_slot(Q, K, V, OUT, CU, CNT, LIST, COUNTER, D, item, start, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d,
                    so_h, qk_scale, C: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
        """Class C's items are numbers start .. start + its item count: do ``item`` if it is one of them; returns
        where the next class's items start. Tiles of max(16, 2^C) rows (16: Triton's smallest dot)."""
        T: tl.constexpr = max(16, 1 << C)
        count = tl.load(COUNTER + C)
        items = tl.cdiv(count, T >> C)
        if (item >= start) & (item < start + items):
            _class_tile(Q, K, V, OUT, CU, CNT, LIST + C * D, count, (item - start) * (T >> C),
                        sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale, 1 << C, T, NH, DH, PREC)
        return start + items

    @triton.jit
    def _class_attend_kernel(Q, K, V, OUT, CU, CNT, LIST, COUNTER, D,
                             sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
                             NC: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr):
        """Work items of classes 1 .. NC-1, the largest DOMs first (the longest items start early). Each program
        takes its next item from a ticket counter (``COUNTER[0]``, zeroed by the caller) until none is left: a
        program that starts late (the SMs busy with a launch on another stream) just takes fewer, where a fixed
        share per program would leave the whole launch waiting for it."""
        total = 0
        for c in tl.static_range(1, NC):
            total += tl.cdiv(tl.load(COUNTER + c), max(16, 1 << c) >> c)
        item = tl.atomic_add(COUNTER, 1)
        while item < total:
            following = tl.atomic_add(COUNTER, 1)  # asked for before the work, so its round trip overlaps it
            start = 0
            for cc in tl.static_range(NC - 1):
                start = _class_slot(Q, K, V, OUT, CU, CNT, LIST, COUNTER, D, item, start, sq_n, sq_h, sk_n, sk_h,
                                    sv_n, sv_h, so_d, so_h, qk_scale, NC - 1 - cc, NH, DH, PREC)
            item = following

    @triton.jit
    def _large_offset(N, C: tl.constexpr, NC: tl.constexpr):
        """Where large class C's list starts: after classes NC .. C-1, each of ``(N >> (c-1)) + 1`` slots (a DOM of
        class c has more than 2^(c-1) of the N pulses)."""
        off = 0
        for c in tl.static_range(NC, C):
            off += (N >> (c - 1)) + 1
        return off

    @triton.jit
    def _list_large_kernel(CNT, D, N, LARGE, COUNTER, NC: tl.constexpr, NL: tl.constexpr, CB: tl.constexpr):
        """DOMs pid*CB .. +CB: each DOM of more than 2^(NC-1) pulses is appended to the list of its large class c
        (``2^(c-1) < n <= 2^c``, the last class NC+NL-1 open-ended), slots reserved by an atomic add on
        ``COUNTER[c]``."""
        d = tl.program_id(0) * CB + tl.arange(0, CB)
        n = tl.load(CNT + d, mask=d < D, other=0).to(tl.int32)
        for c in tl.static_range(NC, NC + NL):
            _append(LARGE + _large_offset(N, c, NC), COUNTER + c, d,
                    (n > ((1 << c) >> 1)) & ((n <= (1 << c)) | (c == NC + NL - 1)))

    @triton.jit
    def _large_attend_kernel(Q, K, V, OUT, SV, KV16, CU, CNT, LARGE, COUNTER, N, CAP,
                             sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
                             NC: tl.constexpr, NL: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr,
                             BL: tl.constexpr, PREC: tl.constexpr, SAVE: tl.constexpr, FULL: tl.constexpr,
                             PAIR: tl.constexpr, PRESPLIT: tl.constexpr, FIXED: tl.constexpr = 0.0):
        """Work items (large DOM, head), the largest class first, so that the longest flash loops start first
        and the short ones fill in behind them; each a flash loop (``_flash_dom``). Programs take items from a
        ticket counter (``COUNTER[NC + NL]``) as in ``_class_attend_kernel``. ``PRESPLIT`` (f16x3): each item of
        at most ``CAP`` pulses writes its k and v rows' scaled fp16 halves once to the program's slot of ``KV16``
        (rows pid * CAP .. +CAP of a (rows, NH, 4, DH) scratch) and its loops read them; a larger DOM takes the
        loop that splits every key block (v19's), one query block at a time. ``FIXED``: the loops without a
        running max (``tile_math._fixed_rows``, v24)."""
        TICKET: tl.constexpr = NC + NL
        total = 0
        for c in tl.static_range(NC, NC + NL):
            total += tl.load(COUNTER + c)
        total = total * NH
        item = tl.atomic_add(COUNTER + TICKET, 1)
        while item < total:
            following = tl.atomic_add(COUNTER + TICKET, 1)  # asked for before the work, as in the class launch
            start = 0
            d = tl.full([], 0, tl.int32)
            for cc in tl.static_range(NL):
                items = tl.load(COUNTER + NC + NL - 1 - cc) * NH
                if (item >= start) & (item < start + items):
                    d = tl.load(LARGE + _large_offset(N, NC + NL - 1 - cc, NC) + (item - start) // NH)
                start += items
            n_d = tl.load(CNT + d).to(tl.int32)
            # every class's items start at a multiple of NH, so the head is item % NH
            if PRESPLIT:
                if n_d <= CAP:
                    _flash_dom(Q, K, V, OUT, SV, CU, d, n_d, item % NH, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d,
                               so_h, qk_scale, NH, DH, BL, PREC, SAVE, False, PAIR, KV16,
                               tl.program_id(0).to(tl.int64) * CAP)
                else:
                    _flash_dom(Q, K, V, OUT, SV, CU, d, n_d, item % NH, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d,
                               so_h, qk_scale, NH, DH, BL, PREC, SAVE, False, False)
            else:
                _flash_dom(Q, K, V, OUT, SV, CU, d, n_d, item % NH, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h,
                           qk_scale, NH, DH, BL, PREC, SAVE, FULL, PAIR, FIXED=FIXED)
            item = following

    _CLASSIFY, _ATTEND = FastLaunch(_classify_kernel, "dom_fused"), FastLaunch(_class_attend_kernel, "dom_fused")
    _LIST_LARGE, _LARGE = FastLaunch(_list_large_kernel, "dom_fused"), FastLaunch(_large_attend_kernel, "dom_fused")


_SM_COUNT: dict = {}


def _programs(device: torch.device, per_sm: int) -> int:
    """Programs of a persistent launch: ``per_sm`` per SM (CPU / interpreter: a handful)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx] * per_sm


def class_buffers(n_doms: int, top: int, device, n_pulses: int = 0) -> tuple:
    """(LIST, COUNTER, LARGE) for one call: ``n_classes(top)`` lists of up to n_doms DOM ids, and with ``n_pulses``
    the lists of the large classes (``large_capacity``; else LARGE is None); COUNTER zeroed. Class 0 (one pulse)
    is copied, never listed: its list goes unused and ``COUNTER[0]`` is the class launch's ticket counter;
    ``COUNTER[NC .. NC + LARGE_CLASSES)`` count the large classes and the entry after them is the large-DOM
    launch's ticket counter."""
    nc = n_classes(top)
    large = (torch.empty(large_capacity(n_pulses, top), dtype=torch.int32, device=device) if n_pulses else None)
    return (torch.empty(nc * max(n_doms, 1), dtype=torch.int32, device=device),
            torch.zeros(nc + LARGE_CLASSES + 1, dtype=torch.int32, device=device), large)


def class_attend(q, k, v, out, cu_seqlens, dom_counts, qk_scale: float, top: int, buffers: tuple, precision: str,
                 num_warps: int = 4, max_registers=None) -> None:
    """Write ``out[d]`` (attention inside DOM d + mean pool) for every DOM of 1 <= n_d <= top pulses: two launches.
    ``qk_scale``: softmax scale times log2(e). ``buffers``: ``class_buffers(D, top, device)``, made before (so
    that a caller running this on a side stream allocates on its own). ``precision``: of fp32 dots, as
    ``dom_fused``'s. ``max_registers``: None or ptxas' cap on registers per thread of the attend launch."""
    n_doms = dom_counts.shape[0]
    if n_doms == 0:
        return
    nc = n_classes(top)
    lists, counter, _ = buffers
    n, n_heads, dh = q.shape
    _CLASSIFY((-(-n_doms // CLASSIFY_BLOCK),), (v, out, cu_seqlens, dom_counts, n_doms, lists, counter, v.stride(0),
                                                v.stride(1), out.stride(0), out.stride(1)),
              dict(NC=nc, CB=CLASSIFY_BLOCK, NH=n_heads, DH=dh), 4)
    if nc == 1:
        return
    # items <= sum over classes c >= 1 of (count_c * P_c / T_c + 1) < N / 8 + NC (a DOM of class c has more than
    # P_c / 2 pulses, and T_c >= 16)
    grid = min(_programs(q.device, PROGRAMS_PER_SM), -(-n // 8) + nc)
    args = (q, k, v, out, cu_seqlens, dom_counts, lists, counter, n_doms, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), qk_scale)
    _ATTEND((grid,), args, dict(NC=nc, NH=n_heads, DH=dh, PREC=precision), num_warps, False, None, max_registers)


def list_large(dom_counts, n_pulses: int, top: int, buffers: tuple) -> None:
    """One launch: the DOMs of more than ``top`` pulses into the large classes' lists (``class_buffers(...,
    n_pulses)``), for ``large_attend``."""
    n_doms = dom_counts.shape[0]
    _, counter, large = buffers
    if n_doms == 0 or large is None:
        return
    _LIST_LARGE((-(-n_doms // LIST_BLOCK),), (dom_counts, n_doms, n_pulses, large, counter),
                dict(NC=n_classes(top), NL=LARGE_CLASSES, CB=LIST_BLOCK), 4)


def large_attend(q, k, v, out, saved, cu_seqlens, dom_counts, qk_scale: float, top: int, buffers: tuple,
                 precision: str, block: int, num_warps: int, num_stages=None, save: bool = False,
                 full_blocks: bool = True, max_registers=None, query_pairs: bool = False, kv16=None,
                 fixed_max: bool = False) -> None:
    """Write ``out[d]`` for every DOM of more than ``top`` pulses, listed by ``list_large`` (issued before, on this
    stream): one persistent launch of flash loops (``_large_attend_kernel``), ``block``-row blocks. ``save``:
    the rows' O and log-sum-exp into ``saved`` ((N, H, Dh + 2) fp32, as dom_fused's flash loops leave them).
    ``full_blocks``: key blocks wholly inside a DOM skip the end-of-DOM mask (``tile_math._flash_rows``).
    ``max_registers``: None or ptxas' cap on registers per thread (the persistent loop lets ptxas keep more
    live than the one-item flash program did, which costs programs per SM). ``query_pairs``: query blocks two at a
    time (``tile_math._flash_dom``'s PAIR). ``kv16``: None, or with ``precision`` "f16x3" and fp32 inputs the fp16
    scratch of ``presplit_buffer``: a slot of ``PRESPLIT_ROWS`` rows per program (one program per slot) for the
    scaled fp16 halves of its current DOM's k and v rows, written once per (DOM, head) and read by its loops
    (``tile_math._split_dom``), which then take no ``full_blocks``. ``fixed_max`` (not with ``kv16``): the loops
    without a running max, each row's max over its DOM's first key block the subtrahend throughout
    (``tile_math._fixed_rows``, v24)."""
    n_doms = dom_counts.shape[0]
    _, counter, large = buffers
    if n_doms == 0:
        return
    n, n_heads, dh = q.shape
    presplit = kv16 is not None
    slots = kv16.shape[0] // PRESPLIT_ROWS if presplit else _programs(q.device, LARGE_PROGRAMS_PER_SM)
    if presplit and (precision != "f16x3" or q.dtype != torch.float32 or slots < 1
                     or kv16.shape != (slots * PRESPLIT_ROWS, n_heads, 4, dh) or kv16.dtype != torch.float16
                     or not kv16.is_contiguous()):
        raise ValueError(f"dom_fused: kv16 must be a contiguous (slots * {PRESPLIT_ROWS}, {n_heads}, 4, {dh}) fp16 "
                         f"scratch (presplit_buffer) and the flash precision 'f16x3' with fp32 inputs, got "
                         f"{tuple(kv16.shape)} {kv16.dtype}, {precision!r}, {q.dtype}")
    if fixed_max:
        check_fixed_max(precision, presplit)
    grid = min(slots, (n // (top + 1) + 1) * n_heads)  # items <= DOMs x heads; a presplit program: one slot each
    args = (q, k, v, out, saved, kv16 if presplit else out, cu_seqlens, dom_counts, large, counter, n, PRESPLIT_ROWS,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0),
            out.stride(1), qk_scale)
    _LARGE((grid,), args, dict(NC=n_classes(top), NL=LARGE_CLASSES, NH=n_heads, DH=dh, BL=block, PREC=precision,
                               SAVE=save, FULL=full_blocks, PAIR=query_pairs, PRESPLIT=presplit,
                               FIXED=FIXED_ROW_SUM_LIMIT if fixed_max else 0.0), num_warps, False,
           num_stages, max_registers)


def presplit_buffer(q) -> torch.Tensor:
    """The fp16 scratch of ``large_attend``'s ``kv16`` for inputs shaped like ``q`` (N, H, Dh): one slot of
    ``PRESPLIT_ROWS`` rows for each of the launch's programs (``PRESPLIT_PROGRAMS_PER_SM`` per SM), (slots *
    PRESPLIT_ROWS, H, 4, Dh), per row and head k_hi, k_lo, v_hi, v_lo. On an H100 (132 SMs) at H x Dh = 128:
    264 slots, 132 MiB, whatever the batch (made with ``torch.empty``, never zeroed)."""
    _, n_heads, dh = q.shape
    slots = _programs(q.device, PRESPLIT_PROGRAMS_PER_SM)
    return torch.empty((slots * PRESPLIT_ROWS, n_heads, 4, dh), dtype=torch.float16, device=q.device)
