"""dom_fused: sparsity-aware DOM attention + mean pooling in Triton, forward and backward, zero prep.

How it works
------------
The batch is cut into row windows of ``T`` pulses; program ``(t, h)`` owns every DOM whose *first*
row lies in window ``[t*T, (t+1)*T)`` (so each DOM has exactly one owner) and does head ``h`` of it.
It finds that work itself from ``pulse_to_dom_idx`` and ``cu_seqlens``: no per-batch preparation,
no host synchronisation (``_default_config``: tile levels per dtype). Forward: one or two launches;
backward: one or two for the tiles plus two for the large DOMs. Launches go through
``triton_launch.FastLaunch`` (Triton's own launch less its host overhead), and independent ones run side
by side on two streams in an inference forward from ``CONCURRENT_ABOVE_PULSES`` pulses
(``triton_launch.run_concurrently``), so the few long programs of a launch do not leave the GPU idle. A training
step below 400k pulses, and an inference forward below 200k (one head; several: 64k), replay their launches from CUDA graphs that serve any
batch of a pulse bucket (``dom_graphs``, config ``graphs``): the kernels then read their tensors and N from
an argument buffer (``INDIRECT``).

* Small DOMs (``n <= T`` pulses; ~all of them on IceCube data) that start in the window end inside
  ``[t*T, t*T + 2T)``, so one masked ``2T x 2T`` tile holds all of them: scores ``Q K^T``, a
  block-diagonal "same DOM" mask, a row softmax, then the pooling is folded into one matrix
  product. With ``P`` the row-normalised attention,

      out[d] = (1/n_d) sum_{i in d} sum_j P_ij v_j = sum_{j in d} w_j v_j,   w_j = (1/n_d) sum_i P_ij,

  so ``out = A @ V`` with ``A[d, j] = w_j [dom(j) == d]`` (``T x 2T``). Per-pulse outputs never
  touch memory; a one-pulse DOM comes out as ``v`` exactly (P = 1, w = 1).
* Two tile levels (default 16 and 64 rows): DOMs of n <= 16 go to 32-row tiles, 16 < n <= 64 to
  128-row tiles, so the ~(2T)^2 masked work per window stays small for the many tiny DOMs.
* Narrow tiles (``narrow``): when a window's owned rows of its level span at most T rows (73 % of the
  16-row windows with work on IceCube-like data), the tile is T x T from the first owned row instead of
  2T x 2T from the window's start: a quarter of the scores and softmax (forward and backward).
* Several heads (``head_loop``, the default for n_heads > 1): a small-DOM program does every head of
  its window, so the index loads, masks and window bookkeeping are paid once, not once per head, and
  with a power-of-two head count (``head_batch``) all heads' tiles as one batch of 3-D dots;
  big-window programs stay one per head, so the long flash loops of large DOMs run in parallel.
* At most one large DOM (``n > T``) can start in a window (it is then the window's last DOM). Its
  owner runs a flash-style loop over ``BL``-row query and key blocks with an online softmax and sums
  the normalised rows into the pooled vector.

Backward (``g`` = dL/d out, per DOM): every pulse of DOM ``d`` gets ``dO_i = g_d / n_d``, hence
``dP_ij = u_j = g_d . v_j / n_d`` (a scalar per key), ``Di = sum_j P_ij u_j``,
``dS = P * (u_j - Di)``, ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV_j = w_j g_d``. In the
small tile each program owns its rows exclusively: no atomics, no zero-initialisation, every row of
dq/dk/dv written exactly once. Large DOMs (n > the top tile level) are not one program's work: in
``_bwd_large_kernel`` every window of ``BL`` rows takes its own rows of the (few) large DOMs it meets,
as query rows in pass 1 (log-sum-exp and O, hence ``Di = g.O/n``, then dQ by a sweep over the DOM's keys)
and as key rows in pass 2, the next launch (dK and dV, reading log-sum-exp and ``Di`` of the DOM's query
rows from an fp32 scratch). A 400-pulse DOM's backward is thus spread over 7 programs instead of one
serial loop of ~150 block steps. Log-sum-exp and O come from the training step's forward where it
flash-looped the DOM and kept them (``save_forward``, the fp32 default), else from an online-softmax
sweep over the DOM's keys in pass 1.

With several heads and many pulses (``split_flash``) the big windows' tiles and their large DOMs' flash
loops are two launches, so that each compiles to its own register budget. There (``size_classes``,
``large_list``) ``dom_classes`` replaces the row windows: the DOMs are first listed by size class (one-pulse
DOMs copied on the way); those up to T_small are packed into tiles of one class each, so a tile's scores are
nearly all real pairs, and the larger ones are flash-looped one (DOM, head) per work item, the largest first.

Precision: accumulation is fp32; bf16/fp16 feed the tensor cores directly. fp32 must not use plain
tf32 (it would miss the 1e-5 tolerance): the fp32 default is ``"tf32x3_mask"`` (three tf32 passes with
the operand split done by bit masks in the kernel, ``_mm``; errors at the fp32 rounding of the output,
5.7e-8 measured), ``"tf32x3"`` is Triton's own split (slower on sm_90), ``"ieee"`` the FMA units. Grid:
``(n_windows * H,)``, heads of one window adjacent; only axis 0 grows with the batch.
Measurements, versions and what is left: docs/dom_fused_notes.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from iceaggr_lib.backends import BackendSpec, UnsupportedError
from iceaggr_lib.backends import dom_graphs
from iceaggr_lib.backends.dom_classes import (check_fixed_max, class_attend, class_buffers, large_attend, list_large,
                                              presplit_buffer)
from iceaggr_lib.backends.triton_launch import HAVE_TRITON, FastLaunch, run_concurrently, tl, triton


LOG2E = 1.4426950408889634


def _default_config(dtype: torch.dtype, head_dim: int, n_heads: int = 1) -> dict:
    """Launch plan (one launch each way). ``levels`` = (T_small, T_big) or (T,): DOMs of n <= T_small go to
    packed tiles of 2*T_small rows, T_small < n <= T_big to tiles of 2*T_big rows, n > T_big to the flash
    loop of ``block``-row blocks. ``bwd_levels`` the same for the backward (its tiles hold more live
    arrays, so it prefers small tiles and the flash loop above them). ``precision``: fp32 dots.
    ``head_loop``: small-DOM programs (and a single-level plan's) loop over all heads of their window,
    sharing its index loads and masks, instead of one program per (window, head). ``merged``: both tile
    levels in one launch (less host dispatch) or two (less GPU time); "auto" merges below
    ``merge_below_pulses`` pulses, where a stream of calls is bound by host dispatch. ``large_num_warps``,
    ``bwd_block``: the backward's large-DOM passes; ``*num_stages``: Triton's software pipelining (None =
    its default). ``head_batch``: with ``head_loop``, the small-DOM tile of all heads as batched 3-D dots
    instead of a loop over the heads (forward); "auto" = wherever it applies (head_loop, power-of-two heads).
    ``split_flash`` (forward, two levels, not merged): the big windows' tiles and their large DOMs' flash loops
    as two launches, each compiled to its own register budget (three launches in all); "auto" = with several
    heads. ``flash_block`` / ``flash_num_stages`` / ``flash_num_warps``: that flash launch's block rows (None =
    ``block``), pipelining and warps (None = ``num_warps``). ``big_num_warps``: the warps of the forward's launches
    of big windows (their tiles; the merged or single-level launch; None = ``num_warps``). ``precision`` (fp32 dots): "tf32x3_mask"
    (the fp32 default, see ``_mm``), "tf32x3", "ieee", or "tf32" (one pass: misses the fp32 tolerance, for
    experiments only).
    ``narrow`` (forward and backward): a window whose owned rows span at most T rows is done as a T x T tile
    from its first owned row instead of the 2T x 2T one (``_narrow_start``).
    ``size_classes`` (forward, two levels): 0 (off), T_small or T_big: the DOMs of n <= that many pulses are
    done by ``dom_classes`` (grouped by size, packed into tiles of one size class each) instead of the row-window
    tiles. "auto" (the default) = T_small wherever ``split_flash`` is on (several heads, from
    ``merge_below_pulses``), else 0. ``class_num_warps``: the warps of its attend launch.
    ``large_list`` (forward, with ``size_classes``): the DOMs above ``size_classes`` listed by size class too
    (``dom_classes.list_large``) and done by one persistent flash launch that takes (DOM, head) items the
    largest first, instead of the big windows' tiles and the flash launch of one program per (T_big-row window,
    head), most of which find no large DOM; "auto" (the default) = wherever ``split_flash`` and ``size_classes``
    are on. ``flash_full_blocks``: in that launch, key blocks wholly inside a DOM skip the end-of-DOM mask
    (``tile_math._flash_rows``); ``flash_max_registers``: its register cap per thread (None: ptxas' choice).
    ``class_max_registers``: the class launch's register cap per thread (None: ptxas' choice).
    ``flash_query_pairs``: the listed flash launch takes a DOM's query blocks two at a time (``tile_math._flash_dom``).
    ``flash_precision`` (forward): the fp32 dots of the flash loops (the DOMs above the tiles): "f16x3" (the fp32
    default since v19) = three fp16 tensor-core passes on operands split into two fp16 halves, scaled per DOM and
    query block by powers of two (``tile_math._mm16``): the same 22 bits as tf32x3 at half the mma instructions
    and registers; or one of ``precision``'s values (bf16's default, None, = its ``precision``; "f16x3" with 16-bit
    inputs is their ``precision`` too).
    ``flash_presplit`` (the listed flash launch, f16x3): each (large DOM, head) writes the scaled fp16 halves of its
    k and v rows once to its program's slot of an fp16 scratch (``dom_classes.presplit_buffer``: 512 rows per
    program, 132 MiB on an H100 at H x Dh = 128) and its loops read them (``tile_math._split_dom``), instead of
    scaling and splitting every key block again for each query block (v20; a DOM above 512 pulses keeps v19's
    loop); "auto" (the default) = wherever the listed launch runs f16x3 loops.
    ``flash_fixed_max`` (the listed flash launch; not with f16x3 loops): its loops without a running max, each query
    row's max over its DOM's first key block the subtrahend throughout, the DOM done again by the online loops if a
    row's sum reaches 2^64 (``tile_math._fixed_rows``, v24; bf16 since v25); "auto" (the default) = several heads.
    Call-time keys, not part of the plan: ``concurrent`` / ``bwd_concurrent``
    (see ``CONCURRENT_ABOVE_PULSES``); ``save_forward``: whether a training step's forward keeps O and the
    log-sum-exp of the large DOMs' rows, an fp32 (N, H, Dh + 2) buffer, for the backward's pass 1
    (``_bwd_large_kernel``), True, False or "auto" (the default: fp32 only, see ``DomFusedAttention``); ``graphs``:
    whether a training step and an inference forward replay their launches from CUDA graphs that serve any batch
    (``dom_graphs``), True, False or "auto" (the default: wherever they apply, below ``TRAINING_GRAPHS_BELOW_PULSES``
    / ``INFERENCE_GRAPHS_BELOW_PULSES``)."""
    # Each default is a configuration measured on the H100 (docs/dom_fused_notes.md, run 6 for head_loop).
    multi = n_heads > 1  # 8x16: 4,096 events bf16 fwd 1.97 -> 1.40 ms with head_loop and (16, 32) tiles
    # head_batch "auto" (run 15): 8x16 4,096 events forward bf16 1.53 -> 1.10 ms, fp32 4.48 -> 2.95
    # split_flash "auto" (runs 25, 27; 4,096 events, do_bench fwd): 8x16 bf16 1.08 -> 0.86 ms, fp32 2.64 -> 2.15
    # (with 64-row flash blocks); 1x128 slower (bf16 0.33 -> 0.36, fp32 1.30 -> 1.49), so only with several heads.
    # v13, several heads (run 50, profiler µs per launch at 4,096 events): programs of 2 warps, where a program's
    # work is one 16-dim head of a few DOMs, keep more of them per SM. Forward flash launch (32-row blocks, 2
    # warps, 3 stages): fp32 1,248 -> 827, bf16 400 -> 313; backward large-DOM passes (2 warps, 32-row blocks):
    # fp32 2,220 + 2,923 -> 1,715 + 1,791, bf16 907 + 1,222 -> 665 + 793; backward tiles (2 warps): fp32 2,407
    # -> 1,758, bf16 881 -> 612. With one 128-dim head 2 warps lose (1,024 bf16 pass 1 81 -> 188 µs).
    # Run 53: the big windows' tiles (2 warps) bf16 202 -> 110, fp32 294 -> 241 µs; the one merged launch below
    # 400k pulses (1,024 events) bf16 238 -> 204, fp32 466 -> 353; the small windows' tiles lose (bf16 244 -> 282).
    multi_warps = dict(flash_block=32, flash_num_warps=2, flash_num_stages=3, bwd_num_warps=2, large_num_warps=2,
                       bwd_block=32, big_num_warps=2)
    # v14 size_classes "auto" (run 62, do_bench fwd at 4,096 events, 8x16, off / on in one call): bf16 0.610 -> 0.474
    # ms, fp32 1.447 -> 1.088; class_num_warps (run 59): bf16 2 (4: +3 %), fp32 4 (2: +6 %). With one head (not on
    # by default) bf16 0.290 -> 0.280 and fp32 1.223 -> 1.100 (size_classes 16, 2 warps, run 59), but at 1,024
    # events bf16 1x128 0.073 -> 0.152 (host-bound: two more launches and two buffers per call).
    # v15 (run 67, do_bench fwd at 4,096 events 8x16, one call): size_classes T_small with large_list, the listed
    # flash launch capped at 96 (bf16) / 128 (fp32) registers: bf16 0.471 -> 0.431 ms, fp32 1.076 -> 0.983. The
    # cap: ptxas gives the persistent loop 141 / 227 registers, which starves the class launch beside it (run 66:
    # large_list at T_big uncapped 0.516 / 1.105). v14's classes of 17-32 pulses (206-register 32-row tiles of 8
    # heads) go to the flash launch as one-block items: classes 159 -> 82 µs, flash 264 -> 322 (bf16, profiler).
    # v17 flash_query_pairs (runs 77-78, do_bench forward, bf16 8x16, the grid's four batches of 4,096 events, whose
    # large-DOM work differs 1.9x): query blocks two at a time, capped at 128 registers (96 spills 132 B):
    # batch 0 0.428 -> 0.430 ms, 1 0.628 -> 0.590, 2 0.545 -> 0.529, 3 0.649 -> 0.599.
    # v18 (runs 80-81, the same four batches, fp32 8x16): tile_math's tf32 split by masking and the fp32 P @ V in
    # the mma's key order (_pv_order) take the flash loop from 485 to 357 SASS instructions per 32 x 32 block:
    # batch 0 0.954 -> 0.836 ms (run 72's v16 number), 1 1.455 -> 1.288, 3 1.515 -> 1.341. Pairs in fp32 spill
    # inside the loop at 128 registers; at 168 (6 programs per SM) only outside it: 0.852, 1.241, 1.082 (single
    # blocks 1.107), 1.270; 152, 192 and 232 registers 1.335, 1.341, 1.305 on batch 1. Pipeline stages of the fp32
    # flash launch (run 83, batches 2 / 1): 3 1.081 / 1.237, 2 1.035 / 1.182, 4 1.116 / 1.280; class launch capped
    # at 112 (no spills) instead of 96 (68 B): 1.089 / 1.244.
    # v24 flash_fixed_max (the listed flash launch's loops without a running max, tile_math._fixed_rows; run 127,
    # do_bench forward, 4,096 events 8x16, the grid's batch 1, on / off in one call): fp32 1.161 / 1.182 ms (-1.8 %),
    # bf16 0.590 / 0.590 (no change: its row sums were a P @ ones dot then). v25 (run 128, the same batch, one
    # process): bf16's row sums by tl.sum, 0.595 -> 0.581 ms; so on with several heads (one fp32 head: f16x3 loops,
    # whose fp16 P cannot take the fixed subtrahend).
    flash_regs = 128 if multi else None  # bf16's (v15: 96, a single query block); fp32's below
    # class_max_registers (runs 71-72, 4,096 events 8x16): fp32's class launch (4 warps) takes 168 registers, 3
    # programs per SM; capped at 96 (ptxas spills 160 B; 68 B after v18) its tiles take 142 instead of 171 µs
    # (profiler, one stream) and the forward 0.954 instead of 0.984 ms (do_bench, two streams; 112: 0.960).
    # bf16's (2 warps, 128 registers): 96 or 112 change nothing (0.423 / 0.429 / 0.425 ms), so it stays uncapped.
    # v19, one 128-dim head in fp32 (runs 88-92, do_bench forward at 4,096 events, batches 1 / 0 of the grid): from
    # 400k pulses (merged "auto"), size classes of <= 16 pulses (2 warps) and the listed flash launch for the rest
    # (largest first; without flash_full_blocks, whose two loop bodies spill at DH = 128), its dots as f16x3
    # (tile_math._mm16): 1.769 / 1.203 -> 1.369 / 0.923 ms (tf32x3 in that launch: 1.401 / 0.933; size classes of
    # <= 32: 1.430 / 0.988). A training forward keeps the merged launch (_forward: size classes there were slower,
    # v14). The flash loops alone (large DOMs of batch 0 sorted largest first, one program each): tf32x3 0.645 ms,
    # f16x3 0.563 (window order: 0.900 / 0.767). With 16-dim heads f16x3 gains nothing measurable (1.169 vs 1.184
    # ms, one call; 1.250 vs 1.184 in another), so 8x16 keeps tf32x3_mask, whose grid part was measured.
    # v20 flash_presplit (runs 96-100, do_bench forward, fp32 1x128, 4,096 events, batches 1 / 0): the listed launch's
    # (DOM, head) items write k's and v's scaled fp16 halves once and the loops read them: 1.362 / 0.923 -> 1.319 /
    # 0.877 ms; with query-block pairs (64 query rows per 32-row key block, which Triton 3.6 compiles to wgmma) and 2
    # pipeline stages 1.119 / 0.790 (pairs with 3 stages 1.295 / 0.923; 64-row blocks, 1 stage, 1.230 / 0.865). ncu
    # (run 100): the launch is DRAM-bound, 2.3-2.4 TB/s at a 29-34 % L2 hit rate (a DOM's k and v are read again for
    # each query block); pairs read them half as often: 637 -> 523 µs, 1.52 -> 1.18 GB. The halves in a slot of 512
    # rows per program instead of a row per input row (run 103): 1.105 / 0.778 ms, 132 MiB of scratch instead of 630.
    if dtype == torch.float32:  # tf32x3: three tensor-core passes, fp32-class error (<= 4.4e-7, grid), 2.1-2.9x faster than "ieee"
        # tf32x3_mask (run 27): 4,096 events 1x128 1.354 -> 1.295 ms, 8x16 2.93 -> 2.64; 1,024 1x128 0.462 -> 0.383
        cfg = dict(levels=(16, 32), bwd_levels=(16, 16), num_warps=4, bwd_num_warps=4, large_num_warps=4,
                   block=32, bwd_block=32, num_stages=None, bwd_num_stages=None, large_num_stages=None,
                   head_batch="auto", precision="tf32x3_mask", merged="auto",
                   merge_below_pulses=400_000, head_loop=multi,
                   split_flash="auto", flash_block=None, flash_num_stages=None, flash_num_warps=None, big_num_warps=None,
                   narrow=True, size_classes="auto", class_num_warps=4 if multi else 2, large_list="auto",
                   flash_full_blocks=multi, flash_max_registers=168 if multi else None,
                   class_max_registers=96 if multi else None, flash_query_pairs=True,
                   flash_precision="f16x3" if head_dim >= 64 else None, flash_presplit="auto",
                   flash_fixed_max="auto")
        return dict(cfg, **dict(multi_warps, flash_num_stages=2)) if multi else dict(cfg, flash_num_stages=2)
    # merged "auto" (scripts/merge_threshold.py, run 7, grid timing): 1x128 one launch wins at 26k pulses
    # (0.059 vs 0.109 ms), two win at 118k (0.108 vs 0.126); 8x16 one wins up to 298k (0.888 vs 1.045),
    # two win at 565k (1.857 vs 2.300).
    # large_num_stages=2 with one head (run 50): the backward's large-DOM pass 1 at 1,024 events 81.5 -> 71.6 µs,
    # at 4,096 391 -> 357.
    cfg = dict(levels=(16, 32) if multi else (16, 64), bwd_levels=(16,), num_warps=4, bwd_num_warps=4,
               large_num_warps=4, block=64, bwd_block=64, num_stages=1 if multi else None, bwd_num_stages=None,
               large_num_stages=None if multi else 2, head_batch="auto",
               precision="ieee", merged="auto",
               merge_below_pulses=400_000 if multi else 64_000, head_loop=multi,
               split_flash="auto", flash_block=None, flash_num_stages=None, flash_num_warps=None, big_num_warps=None,
               narrow=True, size_classes="auto", class_num_warps=2, large_list="auto",
               flash_full_blocks=True, flash_max_registers=flash_regs,
               class_max_registers=None, flash_query_pairs=multi, flash_precision=None, flash_presplit="auto",
               flash_fixed_max="auto", graphs="auto")
    return dict(cfg, **multi_warps) if multi else cfg


class Plan(NamedTuple):
    """A call's launch plan (``_resolve``). ``warps``: ((num_warps, num_stages) of the tiles, (the same) of
    the large-DOM kernel)."""
    t_small: int  # 0 for a single-level plan
    t_big: int
    warps: tuple
    block: int
    precision: str
    merged: bool
    head_loop: bool
    head_batch: bool
    split_flash: bool = False
    flash_block: int = 64  # a split_flash plan's flash launch: block rows,
    flash_stages: int | None = None  # and num_stages
    flash_warps: int | None = None  # and num_warps (None: the tiles' num_warps)
    big_warps: int | None = None  # num_warps of the forward's big-window tiles and merged launch (None: the tiles')
    narrow: bool = True  # tiles: T x T from the first owned row where the owned rows fit
    size_classes: int | str = 0  # forward: DOMs of n <= this by dom_classes instead of tiles (0: off; "auto")
    class_warps: int = 4  # dom_classes: num_warps of its attend launch
    large_list: bool | str = False  # forward: the large DOMs by dom_classes' listed flash launch ("auto")
    full_blocks: bool = True  # that launch: key blocks inside a DOM skip the end-of-DOM mask
    flash_regs: int | None = None  # and its register cap per thread (None: ptxas' choice)
    class_regs: int | None = None  # the class launch's register cap per thread
    query_pairs: bool = False  # the listed flash launch: query blocks two at a time
    flash_precision: str = "ieee"  # the forward's flash loops' dots (resolved: never None)
    presplit: bool = False  # the listed flash launch: k, v halves written once per DOM (resolved: a bool)
    fixed_max: bool = False  # the listed flash launch: loops without a running max (v24)


def _resolve(dtype, head_dim, n_heads, n_pulses, backward=False, **config) -> Plan:
    """The plan of a forward or backward call on ``n_pulses`` pulses ("auto" settings resolved)."""
    items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items())) if config else ()
    merge_below = _plan(dtype, head_dim, n_heads, backward, items)[1]
    return _resolved(dtype, head_dim, n_heads, backward, items, n_pulses < merge_below)


@functools.lru_cache(maxsize=256)  # the host time of a call matters (see triton_launch.py): resolve once
def _resolved(dtype, head_dim, n_heads, backward, items, below_merge) -> Plan:
    plan = _plan(dtype, head_dim, n_heads, backward, items)[0]
    if plan.split_flash is True:  # three launches: the tiles are not merged
        if plan.merged is True:
            raise ValueError("dom_fused: split_flash=True needs merged False or 'auto'")
        plan = plan._replace(merged=False)
    if plan.merged == "auto":
        plan = plan._replace(merged=below_merge)
    if plan.split_flash == "auto":  # several heads, two launches of tiles (not merged), a forward
        plan = plan._replace(split_flash=n_heads > 1 and bool(plan.t_small) and not plan.merged and not backward)
    # where the flash loops are a launch of their own (several heads), or one fp32 head's tiles are not merged
    # (from merge_below_pulses): the DOMs <= T_small in size classes, the rest listed for one flash launch (v19)
    classes = plan.split_flash or (n_heads == 1 and dtype == torch.float32 and not plan.merged and not backward)
    if plan.size_classes == "auto":
        plan = plan._replace(size_classes=plan.t_small if classes else 0)
    if plan.large_list == "auto":
        plan = plan._replace(large_list=classes and bool(plan.size_classes))
    elif plan.large_list and not plan.size_classes:
        raise ValueError("dom_fused: large_list=True needs size_classes (the DOMs above it are the listed ones), "
                         "got size_classes 0 (resolved)")
    presplit_ok = bool(plan.large_list) and plan.flash_precision == "f16x3"  # (f16x3 is resolved for fp32 only)
    if plan.presplit is True and not presplit_ok and not backward:  # (the backward has no listed launch)
        raise ValueError("dom_fused: flash_presplit=True needs the listed flash launch (large_list) with "
                         f"flash_precision 'f16x3' and fp32 inputs, got large_list {plan.large_list}, flash_precision "
                         f"{plan.flash_precision!r} ({dtype})")
    return plan._replace(presplit=presplit_ok and plan.presplit in ("auto", True))


@functools.lru_cache(maxsize=256)  # a call's host time matters (see triton_launch.py): plan once per shape
def _plan(dtype, head_dim, n_heads, backward, config_items):
    cfg = _default_config(dtype, head_dim, n_heads)
    config = dict(config_items)
    unknown = set(config) - set(cfg) - {"tile"}
    if unknown:
        raise TypeError(f"dom_fused: unknown config keys {sorted(unknown)}")
    cfg.update({k: v for k, v in config.items() if v is not None})
    if cfg.get("tile"):  # one level of tile T, both ways
        cfg["levels"] = cfg["bwd_levels"] = (cfg["tile"],)
    levels = tuple(cfg["bwd_levels"] if backward else cfg["levels"])
    warps = ((cfg["bwd_num_warps"] if backward else cfg["num_warps"],
              cfg["bwd_num_stages"] if backward else cfg["num_stages"]),
             (cfg["large_num_warps"], cfg["large_num_stages"]))
    if not 1 <= len(levels) <= 2 or any(t < 8 or t & (t - 1) for t in levels) or levels[0] > levels[-1]:
        raise ValueError(f"dom_fused: levels must be one or two non-decreasing powers of two >= 8, got {levels}")
    block = cfg["bwd_block"] if backward else cfg["block"]
    if block < 16 or block & (block - 1):
        raise ValueError(f"dom_fused: block must be a power of two >= 16, got {block}")
    t_small = levels[0] if len(levels) == 2 else 0
    merged = cfg["merged"]
    if merged != "auto" and not isinstance(merged, bool):
        raise ValueError(f"dom_fused: merged must be True, False or 'auto', got {merged!r}")
    batchable = cfg["head_loop"] and n_heads > 1 and n_heads & (n_heads - 1) == 0 and head_dim >= 16
    head_batch = batchable if cfg["head_batch"] == "auto" else bool(cfg["head_batch"])
    if head_batch and not batchable:
        raise ValueError("dom_fused: head_batch needs head_loop and a power-of-two n_heads > 1")
    split_flash = cfg["split_flash"]
    if split_flash not in ("auto", True, False):
        raise ValueError(f"dom_fused: split_flash must be True, False or 'auto', got {split_flash!r}")
    if backward:
        split_flash = False  # the backward's large DOMs have launches of their own already
    elif split_flash is True and not t_small:
        raise ValueError("dom_fused: split_flash needs two tile levels")
    if cfg["precision"] not in ("tf32x3_mask", "tf32x3", "tf32", "ieee"):
        raise ValueError(f"dom_fused: precision must be 'tf32x3_mask', 'tf32x3', 'tf32' or 'ieee', got {cfg['precision']!r}")
    flash_precision = cfg["flash_precision"] or cfg["precision"]
    if flash_precision not in ("f16x3", "tf32x3_mask", "tf32x3", "tf32", "ieee"):
        raise ValueError("dom_fused: flash_precision must be None, 'f16x3', 'tf32x3_mask', 'tf32x3', 'tf32' or 'ieee', "
                         f"got {cfg['flash_precision']!r}")
    if flash_precision == "f16x3" and dtype != torch.float32:  # 16-bit inputs go to the tensor cores as they are
        flash_precision = cfg["precision"]
    for key in ("flash_num_warps", "big_num_warps"):
        if cfg[key] is not None and cfg[key] not in (1, 2, 4, 8, 16):
            raise ValueError(f"dom_fused: {key} must be None or a power of two <= 16, got {cfg[key]!r}")
    flash_block = cfg["flash_block"] or block
    if flash_block < 16 or flash_block & (flash_block - 1):
        raise ValueError(f"dom_fused: flash_block must be a power of two >= 16, got {flash_block}")
    if not isinstance(cfg["narrow"], bool):
        raise ValueError(f"dom_fused: narrow must be True or False, got {cfg['narrow']!r}")
    size_classes = cfg["size_classes"] or 0
    if backward:  # (the backward keeps its tiles)
        size_classes = 0
    elif size_classes == "auto":  # resolved with split_flash (_resolved)
        size_classes = "auto" if t_small and n_heads & (n_heads - 1) == 0 else 0
    elif size_classes and (not t_small or size_classes not in (t_small, levels[-1]) or n_heads & (n_heads - 1)):
        raise ValueError(f"dom_fused: size_classes must be 0 or one of the two tile levels {levels} (and n_heads a "
                         f"power of two), got {cfg['size_classes']!r} with {n_heads} heads")
    if cfg["class_num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"dom_fused: class_num_warps must be a power of two <= 16, got {cfg['class_num_warps']!r}")
    large_list = False if backward else cfg["large_list"]  # (the backward has its own large-DOM launches)
    if large_list not in ("auto", True, False):
        raise ValueError(f"dom_fused: large_list must be True, False or 'auto', got {large_list!r}")
    if not isinstance(cfg["flash_query_pairs"], bool):
        raise ValueError(f"dom_fused: flash_query_pairs must be True or False, got {cfg['flash_query_pairs']!r}")
    if cfg["flash_presplit"] not in ("auto", True, False):
        raise ValueError(f"dom_fused: flash_presplit must be True, False or 'auto', got {cfg['flash_presplit']!r}")
    if not isinstance(cfg["flash_full_blocks"], bool):
        raise ValueError(f"dom_fused: flash_full_blocks must be True or False, got {cfg['flash_full_blocks']!r}")
    fixed_max = cfg["flash_fixed_max"]
    if not (isinstance(fixed_max, bool) or fixed_max == "auto"):
        raise ValueError(f"dom_fused: flash_fixed_max must be True, False or 'auto', got {fixed_max!r}")
    if fixed_max is True:
        check_fixed_max(flash_precision, name="flash_fixed_max")
    if fixed_max == "auto":  # (fp32 with several heads gains 1.8 %, run 127; bf16 2.4 %, v25, run 128)
        fixed_max = n_heads > 1 and flash_precision != "f16x3"
    for key in ("flash_max_registers", "class_max_registers"):
        regs = cfg[key]
        if regs is not None and (isinstance(regs, bool) or not isinstance(regs, int) or not 24 <= regs <= 255):
            raise ValueError(f"dom_fused: {key} must be None or 24 .. 255, got {regs!r}")
    plan = Plan(t_small, levels[-1], warps, block, cfg["precision"], merged, bool(cfg["head_loop"]), head_batch,
                split_flash, flash_block, cfg["flash_num_stages"], cfg["flash_num_warps"], cfg["big_num_warps"],
                cfg["narrow"], size_classes, cfg["class_num_warps"], large_list, cfg["flash_full_blocks"],
                cfg["flash_max_registers"], cfg["class_max_registers"], cfg["flash_query_pairs"], flash_precision,
                cfg["flash_presplit"], fixed_max)
    return plan, cfg["merge_below_pulses"]


def _launches(n, t_small, t_big, n_heads, merged, snhl, split_flash=False):
    """[(role, grid)] in launch order; n_win_big (the merged kernel's split point) is cdiv(n, t_big).
    Big-role programs do one head each; small-role programs (and a single-level plan's) ``snhl`` heads.
    ``split_flash`` (forward, two levels): small tiles, big tiles (``snhl`` heads per program, like the small
    ones) and flash loops (one head per program) as three launches."""
    spw = n_heads // snhl
    n_small, n_big = (-(-n // t_small) if t_small else 0), -(-n // t_big)  # cdiv (triton.cdiv costs µs)
    if not t_small:
        return [(0, (n_big * spw,))]
    if split_flash:
        return [(2, (n_small * spw,)), (4, (n_big * spw,)), (3, (n_big * n_heads,))]
    if merged:
        return [(0, (n_big * n_heads + n_small * spw,))]
    return [(2, (n_small * spw,)), (1, (n_big * n_heads,))]


def _class_roles(roles, plan, n, n_heads, snhl):
    """The launches left beside ``dom_classes`` (``size_classes``): with every tile DOM in classes only the flash
    loops (role 3); with the small ones, the big windows' launch(es), their tiles and flash loops."""
    n_big = -(-n // plan.t_big)
    if plan.size_classes == plan.t_big:
        return [(3, (n_big * n_heads,))]
    if plan.split_flash:
        return [(role, grid) for role, grid in roles if role != 2]
    return [(1, (n_big * n_heads,))]


def forward_roles(plan, n, n_heads):
    """[(role, grid)] of a forward's ``_fwd_kernel`` launches on ``n`` pulses under ``plan`` (``_resolve``), in
    launch order; with ``plan.size_classes`` dom_classes' two launches come first, besides these.
    ``scripts/profile_roles.py`` names the launches it times from this."""
    snhl = n_heads if plan.head_loop else 1
    roles = _launches(n, plan.t_small, plan.t_big, n_heads, plan.merged, snhl, plan.split_flash)
    if plan.size_classes:  # dom_classes takes the tiles' DOMs up to size_classes; the big windows keep the rest
        roles = _class_roles(roles, plan, n, n_heads, snhl)
    if plan.large_list:  # and with large_list the large DOMs too: no _fwd_kernel launch is left
        roles = []
    return roles


def window_spans(dom_counts, lo: int, t: int) -> dict:
    """How the windows of one tile level see a batch (numpy, host only; ``scripts/window_spans.py`` prints it):
    windows of ``t`` rows, each owning the DOMs of lo < n <= t pulses whose first row it holds. Returns the
    number of ``windows``, those ``with_work`` (an owned multi-pulse DOM; for lo > 0 any owned DOM of the level),
    those among them whose owned DOMs of the level span at most t rows (``fit_narrow``: a narrow T x T tile,
    ``_narrow_start``), and those whose multi-pulse DOMs alone do (``multi_fit_narrow``)."""
    counts = np.asarray(dom_counts, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ends = starts + counts
    n_windows = -(-int(counts.sum()) // t)
    win = starts // t
    level = (counts > lo) & (counts <= t)
    multi = level & (counts > 1)
    work = np.bincount(win[multi if lo == 0 else level], minlength=n_windows) > 0

    def span(mask):
        first = np.full(n_windows, np.iinfo(np.int64).max)
        last = np.zeros(n_windows, dtype=np.int64)
        np.minimum.at(first, win[mask], starts[mask])
        np.maximum.at(last, win[mask], ends[mask])
        return last - first

    return {"windows": n_windows, "with_work": int(work.sum()),
            "fit_narrow": int((work & (span(level) <= t)).sum()),
            "multi_fit_narrow": int((work & (span(multi) <= t)).sum())}


if HAVE_TRITON:
    from iceaggr_lib.backends.tile_math import (_flash_dom, _flash_rows, _kv_block, _masked_softmax, _mm, _same_dom,
                                                 _saved_rows)

    @triton.jit
    def _window(DOM, CU, N, win, T: tl.constexpr):
        """The owned DOM range [d_lo, d_hi) of window ``win`` (rows win*T ..): DOMs whose first row is in it."""
        w0 = win * T
        w1 = tl.minimum(w0 + T, N)
        # (a graph replay's grid is its bucket's: windows past this call's N own nothing, d_lo = d_hi)
        d_a = tl.load(DOM + tl.minimum(w0, N - 1)).to(tl.int32)
        start_a = tl.load(CU + d_a)
        d_lo = tl.where((start_a < w0) | (w0 >= N), d_a + 1, d_a)
        d_hi = tl.load(DOM + w1 - 1).to(tl.int32) + 1
        d_hi = tl.where(w0 >= N, d_lo, d_hi)
        return w0, d_lo, d_hi

    @triton.jit
    def _arg_ptr(ARGS, i: tl.constexpr, like):
        """Tensor argument ``i`` of a graph replay (``dom_graphs``): its address from the int64 argument buffer,
        as ``like``'s pointer type, with the 16-byte alignment Triton assumes of tensor arguments (``dom_graphs``
        checks it on the host)."""
        return tl.multiple_of(tl.load(ARGS + i).to(like.dtype), 16)

    @triton.jit
    def _tile_rows(DOM, CNT, N, w0, d_lo, d_hi, LO: tl.constexpr, T: tl.constexpr, R: tl.constexpr = 0):
        """The R rows (default 2T) of a window's tile from row ``w0``: (rows, DOM id, DOM size, owned: the row's
        DOM starts in the window and has LO < n <= T pulses, i.e. belongs to this tile level)."""
        rows = w0 + tl.arange(0, 2 * T if R == 0 else R)
        in_n = rows < N
        dom_r = tl.load(DOM + rows, mask=in_n, other=-1).to(tl.int32)
        cnt_r = tl.load(CNT + dom_r, mask=in_n, other=0).to(tl.int32)
        own = in_n & (dom_r >= d_lo) & (dom_r < d_hi) & (cnt_r > LO) & (cnt_r <= T)
        return rows, dom_r, cnt_r, own

    @triton.jit
    def _narrow_start(rows, own, T: tl.constexpr):
        """Row where a T-row tile holding every owned row of the window starts, or -1 when the owned rows span
        more than T rows (then the 2T-row tile from the window's start is needed). On IceCube-like batches 73 %
        of the 16-row windows with work fit (4,096 sample events), at a quarter of the 2T x 2T tile's scores."""
        BIG: tl.constexpr = 2147483647
        first = tl.min(tl.where(own, rows, BIG), axis=0)
        last = tl.max(tl.where(own, rows, -1), axis=0)
        return tl.where(last - first < T, first, -1)

    @triton.jit
    def _tile_softmax(q, k, own, dom_r, qk_scale, PREC: tl.constexpr):
        """Row softmax of the packed tile's scores (R x R), restricted to pairs of owned rows of the same DOM
        (``_masked_softmax``)."""
        return _masked_softmax(_mm(q, tl.trans(k), PREC), _same_dom(own, dom_r, q.shape[0]), qk_scale, 1)

    @triton.jit
    def _tile_qkv(Q, K, V, rows64, own, cnt_r, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, DH: tl.constexpr):
        """q, k, v (R x DH) of a tile's rows ``rows64``, head ``h``: zeros where a row is not owned, and q, k
        zeros for a one-pulse DOM too (its softmax is 1, so those bytes are not read)."""
        dcol = tl.arange(0, DH)
        multi = own & (cnt_r > 1)
        q = tl.load(Q + rows64[:, None] * sq_n + h * sq_h + dcol[None, :], mask=multi[:, None], other=0.0)
        k = tl.load(K + rows64[:, None] * sk_n + h * sk_h + dcol[None, :], mask=multi[:, None], other=0.0)
        v = tl.load(V + rows64[:, None] * sv_n + h * sv_h + dcol[None, :], mask=own[:, None], other=0.0)
        return q, k, v

    @triton.jit
    def _fwd_tile(Q, K, V, OUT, CNT, rows64, dom_r, cnt_r, own, out_d, d_hi, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h,
                  so_d, so_h, qk_scale, h0, LO: tl.constexpr, T: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr,
                  NHL: tl.constexpr, HB: tl.constexpr):
        """A window's packed tile (its rows ``rows64`` with their DOM ids / sizes / ownership; 2T or T of them)
        for heads h0 .. h0+NHL-1: scores, softmax, pooling, the owned DOMs' outputs stored."""
        dcol = tl.arange(0, DH)
        if HB:
            _fwd_tile_heads(Q, K, V, OUT, CNT, rows64, dom_r, cnt_r, own, out_d, d_hi, sq_n, sq_h, sk_n, sk_h,
                            sv_n, sv_h, so_d, so_h, qk_scale, h0, LO, T, DH, PREC, NHL)
        else:
            # The loop body keeps one head's order of operations (masks derived inside it): hoisting the
            # masks out of it made Triton 3.6's layout pass fail ('arith.andi' operand encodings).
            for hh in tl.static_range(NHL):
                h = h0 + hh
                q, k, v = _tile_qkv(Q, K, V, rows64, own, cnt_r, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, DH)
                p = _tile_softmax(q, k, own, dom_r, qk_scale, PREC)
                cntf = tl.where(own, cnt_r, 1).to(tl.float32)
                w = tl.sum(p, axis=0) / cntf  # pooling weight of each key row
                sel = (dom_r[None, :] == out_d[:, None]) & own[None, :]
                pool_mat = tl.where(sel, w[None, :], 0.0).to(v.dtype)
                pooled = _mm(pool_mat, v, PREC)  # (T, DH)
                out_cnt = tl.load(CNT + out_d, mask=out_d < d_hi, other=0)
                st = (out_d < d_hi) & (out_cnt > LO) & (out_cnt <= T)
                tl.store(OUT + out_d.to(tl.int64)[:, None] * so_d + h * so_h + dcol[None, :],
                         pooled.to(OUT.dtype.element_ty), mask=st[:, None])

    @triton.jit
    def _fwd_level(Q, K, V, OUT, DOM, CU, CNT, N,
                   sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale, win, h0,
                   LO: tl.constexpr, T: tl.constexpr, HAS_LARGE: tl.constexpr, DH: tl.constexpr,
                   BL: tl.constexpr, PREC: tl.constexpr, NHL: tl.constexpr, HB: tl.constexpr = False,
                   HAS_TILE: tl.constexpr = True, NARROW: tl.constexpr = False, SV=None, NH: tl.constexpr = 1,
                   SAVE: tl.constexpr = False, FPREC: tl.constexpr = None):
        """Window ``win``, heads ``h0 .. h0+NHL-1``: the index loads and masks are shared by the heads.
        ``HB``: the heads as the batch axis of 3-D dots (``_fwd_tile_heads``) instead of a loop over them.
        ``HAS_TILE`` / ``HAS_LARGE``: whether this program does its window's tile / its large DOM. ``NARROW``: a
        window whose owned rows span at most T rows gets a T x T tile from its first owned row (``_narrow_start``).
        ``SAVE`` (a training step's forward): the large DOM's per-row outputs O and log-sum-exp go to ``SV``
        (``_saved_rows``: (N, NH, DH + 2) fp32), for the backward's pass 1. ``FPREC``: the flash loop's dots
        (the plan's ``flash_precision``)."""
        w0, d_lo, d_hi = _window(DOM, CU, N, win, T)

        # ---- small DOMs: one masked tile, T rows from the first owned row when they fit, else 2T from w0 -------
        if HAS_TILE:
            rows, dom_r, cnt_r, own = _tile_rows(DOM, CNT, N, w0, d_lo, d_hi, LO, T)
            if tl.max(own.to(tl.int32), axis=0) > 0:  # windows with nothing of this level exit here
                out_d = d_lo + tl.arange(0, T)
                r0 = -1
                if NARROW and T >= 16:  # (a constexpr test: a T x T tile's dots need T >= 16, Triton's smallest)
                    r0 = _narrow_start(rows, own, T)
                    if r0 >= 0:
                        rows_n, dom_n, cnt_n, own_n = _tile_rows(DOM, CNT, N, r0, d_lo, d_hi, LO, T, T)
                        _fwd_tile(Q, K, V, OUT, CNT, rows_n.to(tl.int64), dom_n, cnt_n, own_n, out_d, d_hi, sq_n,
                                  sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale, h0, LO, T, DH, PREC, NHL, HB)
                if r0 < 0:
                    _fwd_tile(Q, K, V, OUT, CNT, rows.to(tl.int64), dom_r, cnt_r, own, out_d, d_hi, sq_n, sq_h,
                              sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale, h0, LO, T, DH, PREC, NHL, HB)

        # ---- the (at most one) large DOM starting in this window: flash loop --------------------
        if HAS_LARGE:
            d_big = d_hi - 1
            n_big = tl.load(CNT + d_big).to(tl.int32)
            if (d_hi > d_lo) & (n_big > T):
                for hh in range(NHL):  # heads one after another (NHL > 1 only for single-level plans)
                    _flash_dom(Q, K, V, OUT, SV, CU, d_big, n_big, h0 + hh, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d,
                               so_h, qk_scale, NH, DH, BL, FPREC, SAVE)

    @triton.jit
    def _bwd_tile(Q, K, V, G, DQ, DK, DV, rows64, dom_r, cnt_r, own, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sg_d, sg_h,
                  sd_n, sd_h, qk_scale, sm_scale, h0, DH: tl.constexpr, PREC: tl.constexpr, NHL: tl.constexpr):
        """dq, dk, dv of a window's packed tile (its rows ``rows64``, 2T or T of them), heads h0 .. h0+NHL-1."""
        dcol = tl.arange(0, DH)
        for hh in tl.static_range(NHL):  # one head's order of operations, as in the forward
            h = h0 + hh
            q, k, v = _tile_qkv(Q, K, V, rows64, own, cnt_r, h, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, DH)
            g = tl.load(G + dom_r.to(tl.int64)[:, None] * sg_d + h * sg_h + dcol[None, :], mask=own[:, None],
                        other=0.0).to(tl.float32)
            p = _tile_softmax(q, k, own, dom_r, qk_scale, PREC)
            cntf = tl.where(own, cnt_r, 1).to(tl.float32)
            u = tl.sum(v.to(tl.float32) * g, axis=1) / cntf  # dP_ij = u_j inside a DOM
            di = tl.sum(p * u[None, :], axis=1)
            ds = p * (u[None, :] - di[:, None])
            dq = _mm(ds.to(q.dtype), k, PREC) * sm_scale
            dk = _mm(tl.trans(ds).to(q.dtype), q, PREC) * sm_scale
            w = tl.sum(p, axis=0) / cntf
            dv = w[:, None] * g
            offs = rows64[:, None] * sd_n + h * sd_h + dcol[None, :]
            tl.store(DQ + offs, dq.to(DQ.dtype.element_ty), mask=own[:, None])
            tl.store(DK + offs, dk.to(DK.dtype.element_ty), mask=own[:, None])
            tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=own[:, None])

    @triton.jit
    def _bwd_level(Q, K, V, G, DQ, DK, DV, DOM, CU, CNT, N,
                   sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale, win, h0,
                   LO: tl.constexpr, T: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr, NHL: tl.constexpr,
                   NARROW: tl.constexpr = False):
        """dq, dk, dv (N, H, DH) all with strides (sd_n, sd_h, 1). Window ``win``, heads ``h0 .. h0+NHL-1`` (index
        loads and masks shared by the heads); ``NARROW`` as in the forward (``_narrow_start``)."""
        w0, d_lo, d_hi = _window(DOM, CU, N, win, T)
        rows, dom_r, cnt_r, own = _tile_rows(DOM, CNT, N, w0, d_lo, d_hi, LO, T)
        if tl.max(own.to(tl.int32), axis=0) > 0:  # windows with nothing of this level exit here
            r0 = -1
            if NARROW and T >= 16:  # (constexpr, as in the forward)
                r0 = _narrow_start(rows, own, T)
                if r0 >= 0:
                    rows_n, dom_n, cnt_n, own_n = _tile_rows(DOM, CNT, N, r0, d_lo, d_hi, LO, T, T)
                    _bwd_tile(Q, K, V, G, DQ, DK, DV, rows_n.to(tl.int64), dom_n, cnt_n, own_n, sq_n, sq_h, sk_n,
                              sk_h, sv_n, sv_h, sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale, h0, DH, PREC, NHL)
            if r0 < 0:
                _bwd_tile(Q, K, V, G, DQ, DK, DV, rows.to(tl.int64), dom_r, cnt_r, own, sq_n, sq_h, sk_n, sk_h,
                          sv_n, sv_h, sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale, h0, DH, PREC, NHL)

    @triton.jit
    def _fwd_tile_heads(Q, K, V, OUT, CNT, rows64, dom_r, cnt_r, own, out_d, d_hi, sq_n, sq_h, sk_n, sk_h,
                        sv_n, sv_h, so_d, so_h, qk_scale, h0,
                        LO: tl.constexpr, T: tl.constexpr, DH: tl.constexpr, PREC: tl.constexpr, NHL: tl.constexpr):
        """The small-DOM tile of one window for heads h0 .. h0+NHL-1 at once: (NHL, R, DH) blocks (R = 2T rows, or
        T for a narrow tile), scores and pooling as batched 3-D dots, the softmax over (NHL, R, R). Same
        arithmetic as the per-head loop."""
        dcol = tl.arange(0, DH)
        hcol = (h0 + tl.arange(0, NHL)).to(tl.int64)
        multi = own & (cnt_r > 1)
        q = tl.load(Q + hcol[:, None, None] * sq_h + rows64[None, :, None] * sq_n + dcol[None, None, :],
                    mask=multi[None, :, None], other=0.0)  # (NHL, 2T, DH)
        k = tl.load(K + hcol[:, None, None] * sk_h + rows64[None, :, None] * sk_n + dcol[None, None, :],
                    mask=multi[None, :, None], other=0.0)
        v = tl.load(V + hcol[:, None, None] * sv_h + rows64[None, :, None] * sv_n + dcol[None, None, :],
                    mask=own[None, :, None], other=0.0)
        s = _mm(q, tl.permute(k, (0, 2, 1)), PREC)  # (NHL, R, R)
        p = _masked_softmax(s, _same_dom(own, dom_r, rows64.shape[0])[None, :, :], qk_scale, 2)
        cntf = tl.where(own, cnt_r, 1).to(tl.float32)
        w = tl.sum(p, axis=1) * (1.0 / cntf)[None, :]  # (NHL, 2T): pooling weight of each key row, per head
        sel = ((dom_r[None, :] == out_d[:, None]) & own[None, :])[None, :, :]  # (1, T, 2T)
        pool_mat = tl.where(sel, w[:, None, :], 0.0).to(v.dtype)  # (NHL, T, 2T)
        pooled = _mm(pool_mat, v, PREC)  # (NHL, T, DH)
        out_cnt = tl.load(CNT + out_d, mask=out_d < d_hi, other=0)
        st = (out_d < d_hi) & (out_cnt > LO) & (out_cnt <= T)
        tl.store(OUT + hcol[:, None, None] * so_h + out_d.to(tl.int64)[None, :, None] * so_d + dcol[None, None, :],
                 pooled.to(OUT.dtype.element_ty), mask=st[None, :, None])

    @triton.jit
    def _lse_di(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale, gv, inv_n, saved, mine,
                W: tl.constexpr, DH: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr):
        """Log2-sum-exp and Di = g.O/n of the query rows ``qb`` of a large DOM by an online-softmax sweep over its
        keys (what a saved forward would have left); the log-sum-exp also goes to ``saved`` for pass 2."""
        m_i, l_i, acc = _flash_rows(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale, DH, BL, PREC)
        lse = m_i + tl.log2(l_i)
        tl.store(saved + (W - 2), lse, mask=mine)
        return lse, tl.sum((acc / l_i[:, None]) * gv[None, :], axis=1) * inv_n

    @triton.jit
    def _bwd_large_kernel(Q, K, V, G, DQ, DK, DV, SV, DOM, CU, CNT, N,
                          sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale, t_fwd, ARGS,
                          T: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr, BL: tl.constexpr,
                          PREC: tl.constexpr, PASS: tl.constexpr, W: tl.constexpr, INDIRECT: tl.constexpr = False):
        """The backward of the large DOMs (n > T), spread over programs so that no DOM is one program's
        serial work. Program (window, head) takes the rows [window*BL, +BL) that belong to large DOMs (at
        most a few DOMs per window), one DOM at a time. PASS 1 treats them as query rows: log-sum-exp and
        Di = g.O/n, then dQ (a sweep over the DOM's keys); log-sum-exp and Di go to ``SV`` (``_saved_rows``,
        W per row and head). Where the training step's forward flash-looped the DOM (n > ``t_fwd``) it left
        O and log-sum-exp there (W = DH + 2), so pass 1 reads them; otherwise (and without a saved forward:
        ``t_fwd`` = 2^31 - 1, W = 2) an online-softmax sweep over the DOM's keys recomputes them first, two
        more block products per key block. PASS 2 (the next launch, so every Di is written) treats the rows
        as key rows: a sweep over the DOM's query blocks gives dK = scale dS^T Q and the column sums of P,
        hence dV. ``INDIRECT``: as in ``_fwd_kernel`` (rows past this call's N are masked off)."""
        if INDIRECT:
            Q, K, V, G = _arg_ptr(ARGS, 0, Q), _arg_ptr(ARGS, 1, K), _arg_ptr(ARGS, 2, V), _arg_ptr(ARGS, 9, G)
            DQ, DK, DV = _arg_ptr(ARGS, 10, DQ), _arg_ptr(ARGS, 11, DK), _arg_ptr(ARGS, 12, DV)
            SV, DOM, CU, CNT = _arg_ptr(ARGS, 4, SV), _arg_ptr(ARGS, 5, DOM), _arg_ptr(ARGS, 6, CU), _arg_ptr(ARGS, 7, CNT)
            N = tl.load(ARGS + 8).to(tl.int32)
        pid = tl.program_id(0)
        win = pid // NH
        h = pid % NH
        bl = tl.arange(0, BL)
        dcol = tl.arange(0, DH)
        rows = win * BL + bl
        in_n = rows < N
        dom_r = tl.load(DOM + rows, mask=in_n, other=-1).to(tl.int32)
        cnt_r = tl.load(CNT + dom_r, mask=in_n, other=0).to(tl.int32)
        large = in_n & (cnt_r > T)
        NONE: tl.constexpr = 2147483647
        d = tl.min(tl.where(large, dom_r, NONE), axis=0)
        rows64 = rows.to(tl.int64)
        saved = _saved_rows(SV, rows64, h, NH, W)
        while d < NONE:  # the large DOMs of this window, in order (windows without any exit at once)
            mine = large & (dom_r == d)
            n_d = tl.load(CNT + d).to(tl.int32)
            s0 = tl.load(CU + d).to(tl.int64)
            inv_n = 1.0 / n_d.to(tl.float32)
            gv = tl.load(G + d.to(tl.int64) * sg_d + h * sg_h + dcol).to(tl.float32)
            if PASS == 1:
                qb = tl.load(Q + rows64[:, None] * sq_n + h * sq_h + dcol[None, :], mask=mine[:, None], other=0.0)
                if W > 2:  # (constexpr: without a saved forward the kernel is compiled without this branch)
                    if n_d > t_fwd:  # the forward's O and log-sum-exp of these rows
                        lse = tl.load(saved + (W - 2), mask=mine, other=0.0)
                        o = tl.load(saved[:, None] + dcol[None, :], mask=mine[:, None], other=0.0)
                        di = tl.sum(o * gv[None, :], axis=1) * inv_n
                    else:
                        lse, di = _lse_di(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale, gv, inv_n, saved,
                                          mine, W, DH, BL, PREC)
                else:
                    lse, di = _lse_di(qb, K, V, s0, n_d, h, sk_n, sk_h, sv_n, sv_h, qk_scale, gv, inv_n, saved, mine,
                                      W, DH, BL, PREC)
                dq_acc = tl.zeros([BL, DH], dtype=tl.float32)
                for ks in range(0, n_d, BL):
                    km, kb, vb = _kv_block(K, V, s0, ks, n_d, h, sk_n, sk_h, sv_n, sv_h, DH, BL)
                    ub = tl.sum(vb.to(tl.float32) * gv[None, :], axis=1) * inv_n
                    sb = _mm(qb, tl.trans(kb), PREC)
                    pb = tl.where(km[None, :], tl.exp2(sb * qk_scale - lse[:, None]), 0.0)
                    dsb = pb * (ub[None, :] - di[:, None])
                    dq_acc += _mm(dsb.to(kb.dtype), kb, PREC)
                tl.store(DQ + rows64[:, None] * sd_n + h * sd_h + dcol[None, :],
                         (dq_acc * sm_scale).to(DQ.dtype.element_ty), mask=mine[:, None])
                tl.store(saved + (W - 1), di, mask=mine)
            else:
                kb = tl.load(K + rows64[:, None] * sk_n + h * sk_h + dcol[None, :], mask=mine[:, None], other=0.0)
                vb = tl.load(V + rows64[:, None] * sv_n + h * sv_h + dcol[None, :], mask=mine[:, None], other=0.0)
                ub = tl.sum(vb.to(tl.float32) * gv[None, :], axis=1) * inv_n
                dk_acc = tl.zeros([BL, DH], dtype=tl.float32)
                colp = tl.zeros([BL], dtype=tl.float32)
                for qs in range(0, n_d, BL):
                    qm = (qs + bl) < n_d
                    qr = s0 + qs + bl
                    sq = _saved_rows(SV, qr, h, NH, W)
                    qb = tl.load(Q + qr[:, None] * sq_n + h * sq_h + dcol[None, :], mask=qm[:, None], other=0.0)
                    lse = tl.load(sq + (W - 2), mask=qm, other=0.0)
                    di = tl.load(sq + (W - 1), mask=qm, other=0.0)
                    sb = _mm(qb, tl.trans(kb), PREC)
                    pb = tl.where(qm[:, None] & mine[None, :], tl.exp2(sb * qk_scale - lse[:, None]), 0.0)
                    dsb = pb * (ub[None, :] - di[:, None])
                    dk_acc += _mm(tl.trans(dsb).to(qb.dtype), qb, PREC)
                    colp += tl.sum(pb, axis=0)
                tl.store(DK + rows64[:, None] * sd_n + h * sd_h + dcol[None, :],
                         (dk_acc * sm_scale).to(DK.dtype.element_ty), mask=mine[:, None])
                tl.store(DV + rows64[:, None] * sd_n + h * sd_h + dcol[None, :],
                         ((colp * inv_n)[:, None] * gv[None, :]).to(DV.dtype.element_ty), mask=mine[:, None])
            d = tl.min(tl.where(large & (dom_r > d), dom_r, NONE), axis=0)

    @triton.jit
    def _program(pid, n_win_big, NH: tl.constexpr, SNHL: tl.constexpr, ROLE: tl.constexpr):
        """(is_big_role, window, first head) of program ``pid``. Big-role programs do one head each (their
        flash loops are the long ones: heads in parallel shorten the critical path); small-role programs do
        SNHL heads each (1 or all), sharing the window's index loads and masks. A window's head-programs
        are neighbours in the grid, so they share its rows in L2."""
        SPW: tl.constexpr = NH // SNHL  # small-role programs per window
        if ROLE == 1:
            return True, pid // NH, pid % NH
        elif ROLE == 2:
            return False, pid // SPW, (pid % SPW) * SNHL
        else:  # merged: big windows first (programs [0, n_win_big * NH)), then small windows
            nb = n_win_big * NH
            if pid < nb:
                return True, pid // NH, pid % NH
            return False, (pid - nb) // SPW, ((pid - nb) % SPW) * SNHL

    @triton.jit
    def _fwd_kernel(Q, K, V, OUT, SV, DOM, CU, CNT, N,
                    sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale, n_win_big, ARGS,
                    T_SMALL: tl.constexpr, T_BIG: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr,
                    BL: tl.constexpr, PREC: tl.constexpr, ROLE: tl.constexpr, SNHL: tl.constexpr,
                    HB: tl.constexpr, NARROW: tl.constexpr, SAVE: tl.constexpr = False, FPREC: tl.constexpr = None,
                    INDIRECT: tl.constexpr = False):
        """Two roles: windows of T_BIG rows (DOMs of T_SMALL < n <= T_BIG in tiles, larger ones
        flash-looped) and windows of T_SMALL rows (DOMs of n <= T_SMALL). ROLE 0 runs both in one
        launch, big windows first, so the long large-DOM programs overlap the small ones; but the kernel
        then takes the register budget of the big role for all programs. ROLE 2 / ROLE 1 run only the
        small / only the big role, one launch each. With T_SMALL == 0 there is one role (tiles of T_BIG
        and the flash loop), one head per program unless SNHL says otherwise. ``split_flash`` plans launch
        the big windows' two jobs apart: ROLE 4 their tiles (SNHL heads per program, like the small role) and
        ROLE 3 their large DOMs' flash loops (one head per program), so each compiles to its own register
        and shared-memory budget instead of the larger of the two. ``NARROW``: see ``_narrow_start``. ``SAVE``:
        the flash loops leave O and log-sum-exp of the large DOMs' rows in ``SV`` (``_fwd_level``). ``FPREC``: the
        flash loops' dots. ``INDIRECT`` (a CUDA-graph replay, ``dom_graphs``): the tensors and N are this call's, read
        from ``ARGS`` (``dom_graphs.ARG_SLOTS``); the grid and n_win_big are the graph's bucket's."""
        if INDIRECT:
            Q, K, V, OUT = _arg_ptr(ARGS, 0, Q), _arg_ptr(ARGS, 1, K), _arg_ptr(ARGS, 2, V), _arg_ptr(ARGS, 3, OUT)
            SV, DOM, CU, CNT = _arg_ptr(ARGS, 4, SV), _arg_ptr(ARGS, 5, DOM), _arg_ptr(ARGS, 6, CU), _arg_ptr(ARGS, 7, CNT)
            N = tl.load(ARGS + 8).to(tl.int32)
        if T_SMALL == 0:
            _fwd_level(Q, K, V, OUT, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
                       tl.program_id(0) // (NH // SNHL), (tl.program_id(0) % (NH // SNHL)) * SNHL,
                       0, T_BIG, True, DH, BL, PREC, SNHL, HB, True, NARROW, SV=SV, NH=NH, SAVE=SAVE, FPREC=FPREC)
        elif ROLE == 3:
            _fwd_level(Q, K, V, OUT, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
                       tl.program_id(0) // NH, tl.program_id(0) % NH, T_SMALL, T_BIG, True, DH, BL, PREC, 1,
                       False, False, SV=SV, NH=NH, SAVE=SAVE, FPREC=FPREC)
        elif ROLE == 4:
            _fwd_level(Q, K, V, OUT, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
                       tl.program_id(0) // (NH // SNHL), (tl.program_id(0) % (NH // SNHL)) * SNHL,
                       T_SMALL, T_BIG, False, DH, BL, PREC, SNHL, False, True, NARROW)
        else:
            big, win, h = _program(tl.program_id(0), n_win_big, NH, SNHL, ROLE)
            if big:
                _fwd_level(Q, K, V, OUT, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
                           win, h, T_SMALL, T_BIG, True, DH, BL, PREC, 1, False, True, NARROW, SV=SV, NH=NH,
                           SAVE=SAVE, FPREC=FPREC)
            else:
                _fwd_level(Q, K, V, OUT, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, so_d, so_h, qk_scale,
                           win, h, 0, T_SMALL, False, DH, BL, PREC, SNHL, HB, True, NARROW)

    @triton.jit
    def _bwd_kernel(Q, K, V, G, DQ, DK, DV, DOM, CU, CNT, N,
                    sq_n, sq_h, sk_n, sk_h, sv_n, sv_h, sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale, n_win_big, ARGS,
                    T_SMALL: tl.constexpr, T_BIG: tl.constexpr, NH: tl.constexpr, DH: tl.constexpr,
                    PREC: tl.constexpr, ROLE: tl.constexpr, SNHL: tl.constexpr, NARROW: tl.constexpr,
                    INDIRECT: tl.constexpr = False):
        """The backward of the DOMs of n <= T_BIG, with the same roles and program layout as the forward
        (the large ones: ``_bwd_large_kernel``). ``INDIRECT``: as in ``_fwd_kernel``."""
        if INDIRECT:
            Q, K, V, G = _arg_ptr(ARGS, 0, Q), _arg_ptr(ARGS, 1, K), _arg_ptr(ARGS, 2, V), _arg_ptr(ARGS, 9, G)
            DQ, DK, DV = _arg_ptr(ARGS, 10, DQ), _arg_ptr(ARGS, 11, DK), _arg_ptr(ARGS, 12, DV)
            DOM, CU, CNT = _arg_ptr(ARGS, 5, DOM), _arg_ptr(ARGS, 6, CU), _arg_ptr(ARGS, 7, CNT)
            N = tl.load(ARGS + 8).to(tl.int32)
        if T_SMALL == 0:
            _bwd_level(Q, K, V, G, DQ, DK, DV, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h,
                       sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale,
                       tl.program_id(0) // (NH // SNHL), (tl.program_id(0) % (NH // SNHL)) * SNHL,
                       0, T_BIG, DH, PREC, SNHL, NARROW)
        else:
            big, win, h = _program(tl.program_id(0), n_win_big, NH, SNHL, ROLE)
            if big:
                _bwd_level(Q, K, V, G, DQ, DK, DV, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h,
                           sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale, win, h, T_SMALL, T_BIG, DH, PREC, 1, NARROW)
            else:
                _bwd_level(Q, K, V, G, DQ, DK, DV, DOM, CU, CNT, N, sq_n, sq_h, sk_n, sk_h, sv_n, sv_h,
                           sg_d, sg_h, sd_n, sd_h, qk_scale, sm_scale, win, h, 0, T_SMALL, DH, PREC, SNHL, NARROW)


    # kernel[grid](...) less its host overhead
    _FWD, _BWD, _BWD_LARGE = (FastLaunch(k, "dom_fused") for k in (_fwd_kernel, _bwd_kernel, _bwd_large_kernel))


def _check_inputs(q, k, v, cu_seqlens, pulse_to_dom, dom_counts):
    if not HAVE_TRITON:
        raise UnsupportedError("backend 'dom_fused' needs triton, which is not installed here")
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"dom_fused: q, k, v must be (N, H, Dh) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    dh = q.shape[2]
    if dh < 16 or dh & (dh - 1):
        raise UnsupportedError(f"backend 'dom_fused' needs a power-of-two head_dim >= 16, got {dh}")
    if pulse_to_dom.shape[0] != q.shape[0] or dom_counts.shape[0] + 1 != cu_seqlens.shape[0]:
        raise ValueError("dom_fused: pulse_to_dom_idx / dom_pulse_counts / cu_seqlens do not match q")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"dom_fused: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # the kernels take raw pointers: Triton's launcher would reject a CPU tensor without naming the backend, and
    # would let a tensor of another GPU through
    devices = [t.device for t in (q, k, v, cu_seqlens, pulse_to_dom, dom_counts)]
    if any(d != devices[0] for d in devices):
        names = ("q", "k", "v", "cu_seqlens", "pulse_to_dom_idx", "dom_pulse_counts")
        raise ValueError("dom_fused: every tensor must be on one device, got "
                         + ", ".join(f"{n} on {d}" for n, d in zip(names, devices)))


# Launches side by side on two streams (triton_launch.run_concurrently), under "auto": only in a forward that
# builds no autograd graph, from this many pulses. Below it a stream of calls is bound by host dispatch, which
# the fork and join lengthen (run 11: 16 events bf16 fwd+bwd 0.214 -> 0.264 ms with them); above it the tail of
# the large-DOM programs is hidden (1,024 events bf16 1x128 forward 0.106 -> 0.081 ms, 4,096 0.386 -> 0.358).
# In a training step (autograd's forward, and the backward) they cost more host time than they save, at every
# size measured (1,024 events bf16 1x128 forward + backward, one stream / two: run 11 do_bench 0.332 / 0.472 ms;
# runs 15-16, the grid's own step: 0.48 / 0.91 and 0.64 / 0.94 ms; 4,096 events: 1.36 / 1.32 ms, run 11).
CONCURRENT_ABOVE_PULSES = 64_000


# Under graphs="auto" a call replays its launches from CUDA graphs (dom_graphs) below these pulse counts, where a
# stream of calls is bound by host dispatch; above them the graphed launches cost more GPU time than the replay saves
# on the host (~5 % at 4,096 events; likely the bucket's extra programs, the fetch launch and the kernels'
# arguments read from a buffer, not timed apart). Measured on the grid's step (bench._make_step, bench.time_calls
# medians, bf16 1x128, eager / graphed ms):
# - inference forward (runs 118 and 121-122): 8-256 events (721-29k pulses) 0.057-0.089 / 0.028-0.053 (run 121),
#   16 events 0.0183 / 0.0118 (run 118); 1,024 events (141k) 0.085 / 0.087 (run 122; do_bench 0.0732 / 0.0735, run
#   118), 2,048 (315k) 0.181 / 0.191, 4,096 (646k) 0.383 / 0.400 (run 122); 8x16 at 1,024 events do_bench 0.203 /
#   0.210 (run 118). v22 set the inference threshold at 64k (CONCURRENT_ABOVE_PULSES). v23 raises it to 200k for
#   one head, so that its 1,024-event forward (118k-180k pulses per batch) is graphed too: the eager launches
#   cost the host ~0.1 ms per call there (run 123, series_spread: host_ms 0.110 with the flush and two events,
#   0.0863 ms of GPU time), so a stream of eager calls without the grid's L2 flush between them is bound by the
#   host, and its readings follow the host's state (run 121: 0.086-0.168 ms across consecutive series, graphed
#   0.087 twice); a replay leaves the host ~18 us (run 112). The graphed launches cost 2.5 % more GPU time there
#   (run 123: 0.0886 against 0.0863 ms, 80 series each). Several heads keep 64k: their 1,024-event forward takes
#   ~0.24 ms of GPU time, well above the host's, and graphs cost it 3-9 % (bf16 8x16: do_bench 0.203 / 0.210 on
#   one machine, run 118; 0.254-0.265 graphed in run 124's grid against 0.242 eager in run 126's, two machines).
# - training step, forward + backward (run 122): 1,024 events 0.352 / 0.334, 2,048 (315k) 0.814 / 0.801, 3,072
#   (474k) 1.082 / 1.107, 4,096 (646k) 1.645 / 1.710; on slower hosts the graphs gain far more at 1,024 events
#   (eager 0.59-0.75 against graphed 0.34-0.53, one series 0.84, runs 112 and 121). (Several heads have size
#   classes from 400k pulses anyway.)
# graphs=True replays at every size.
TRAINING_GRAPHS_BELOW_PULSES = 400_000
INFERENCE_GRAPHS_BELOW_PULSES = 200_000  # one head
INFERENCE_GRAPHS_BELOW_PULSES_MULTI_HEAD = CONCURRENT_ABOVE_PULSES


def _concurrency(setting, n_pulses: int, autograd: bool) -> bool:
    """``concurrent`` / ``bwd_concurrent`` = True, False or "auto" (see CONCURRENT_ABOVE_PULSES): whether a
    call runs its independent launches on two streams (CUDA only: see ``_side_stream``)."""
    if setting == "auto":
        return not autograd and n_pulses >= CONCURRENT_ABOVE_PULSES
    if not isinstance(setting, bool):
        raise ValueError(f"dom_fused: concurrent / bwd_concurrent must be True, False or 'auto', got {setting!r}")
    return setting


def _side_stream(setting, q, autograd: bool) -> bool:
    return _concurrency(setting, q.shape[0], autograd) and q.is_cuda


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, autograd=False, **config):
    """(N, H, Dh) x3 -> (D, H, Dh) attention within each DOM + mean pool: one to three Triton launches.
    ``autograd``: called as the forward of a training step (two streams are then off under "auto")."""
    return _forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, autograd, False, config)[0]


NOT_SAVED = 2**31 - 1  # ``t_fwd`` of a backward without a saved forward: no DOM is above it
CALL_KEYS = ("save_forward", "graphs")  # config keys read by DomFusedAttention / dom_fused_attention, not plan keys


def _launch_config(config: dict) -> dict:
    """A copy of a call's config without ``CALL_KEYS``: what the launches and the plan read."""
    return {key: val for key, val in config.items() if key not in CALL_KEYS}


def _forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, autograd, save, config, out=None, saved=None,
             indirect=None):
    """``fused_forward``; with ``save`` also (saved, t_fwd): the fp32 (N, H, Dh + 2) buffer in which the flash
    loops left O and log-sum-exp of the rows of the DOMs of n > t_fwd (the plan's top tile level; with
    ``large_list`` its ``size_classes``), which ``fused_backward`` reads instead of recomputing them
    (``_bwd_large_kernel``, pass 1). ``out``, ``saved``: given by ``dom_graphs`` (allocated per call).
    ``indirect``: (the int64 argument buffer, the bucket's pulse count): the launches of a CUDA-graph capture
    (``dom_graphs``), their grids the bucket's, their tensors and N read from the buffer."""
    config = _launch_config(config)
    _check_inputs(q, k, v, cu_seqlens, pulse_to_dom, dom_counts)
    if autograd:
        _training_defaults(q, config)
    concurrent, _ = (_side_stream(config.pop(key, "auto"), q, autograd) for key in ("concurrent", "bwd_concurrent"))
    q, k, v = _rowmajor(q), _rowmajor(k), _rowmajor(v)
    n, n_heads, dh = q.shape
    if indirect is not None:  # a graph's launches: grids (and the plan) for its bucket of pulses
        args_buf, n = indirect
    plan = _resolve(q.dtype, dh, n_heads, n, **config)
    (warps, stages), _ = plan.warps
    if indirect is not None and plan.size_classes:
        raise ValueError("dom_fused: a CUDA-graph forward needs a plan without size_classes (see _graph_config)")
    snhl = n_heads if plan.head_loop else 1
    if out is None:
        out = torch.empty((dom_counts.shape[0], n_heads, dh), device=q.device, dtype=q.dtype)
    if saved is None:
        saved = torch.empty((q.shape[0], n_heads, dh + 2), device=q.device, dtype=torch.float32) if save else out
    n_win_big = -(-n // plan.t_big)
    args = (q, k, v, out, saved, pulse_to_dom, cu_seqlens, dom_counts, n, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), scale * LOG2E, n_win_big,
            cu_seqlens if indirect is None else args_buf)
    spec = _FWD.specialize(args)
    constexprs = dict(T_SMALL=plan.t_small, T_BIG=plan.t_big, NH=n_heads, DH=dh, BL=plan.block, PREC=plan.precision,
                      SNHL=snhl, HB=plan.head_batch, NARROW=plan.narrow, SAVE=save, FPREC=plan.flash_precision,
                      INDIRECT=indirect is not None)
    flash = dict(BL=plan.flash_block)  # split_flash's flash launch: its own block rows and pipelining
    role_warps = {0: plan.big_warps or warps, 1: plan.big_warps or warps, 3: plan.flash_warps or warps,
                  4: plan.big_warps or warps}  # role 0: merged or single-level; 2, the small windows: num_warps
    launch = [lambda role=role, grid=grid: _FWD(grid, args, dict(constexprs, ROLE=role, **(flash if role == 3 else {})),
                                                role_warps.get(role, warps), spec,
                                                plan.flash_stages if role == 3 else stages)
              for role, grid in forward_roles(plan, n, n_heads)]
    if plan.size_classes:  # (buffers allocated on this stream)
        buffers = class_buffers(dom_counts.shape[0], plan.size_classes, q.device, n if plan.large_list else 0)
        launch.insert(0, lambda: class_attend(q, k, v, out, cu_seqlens, dom_counts, scale * LOG2E, plan.size_classes,
                                              buffers, plan.precision, plan.class_warps, plan.class_regs))
    if plan.large_list:  # listed here, before the fork: the flash launch reads the lists
        list_large(dom_counts, n, plan.size_classes, buffers)
        kv16 = presplit_buffer(k) if plan.presplit else None
        launch.insert(0, lambda: large_attend(q, k, v, out, saved, cu_seqlens, dom_counts, scale * LOG2E,
                                              plan.size_classes, buffers, plan.flash_precision, plan.flash_block,
                                              plan.flash_warps or warps, plan.flash_stages, save, plan.full_blocks,
                                              plan.flash_regs, plan.query_pairs, kv16, plan.fixed_max))
    if len(launch) == 2 and plan.large_list and concurrent:  # the flash loops beside the class tiles
        run_concurrently(q.device, launch[0], launch[1])
    elif len(launch) == 3 and concurrent:  # the flash loops' tail overlaps the tiles
        run_concurrently(q.device, lambda: (launch[0](), launch[1]()), launch[2])
    elif len(launch) == 2 and concurrent:  # the big windows' large-DOM tail overlaps the small ones
        run_concurrently(q.device, launch[1], launch[0])
    else:
        for fn in launch:
            fn()
    # the flash loops saved the rows of every DOM above their threshold
    return out, saved, plan.size_classes if plan.large_list else plan.t_big


def fused_backward(grad_out, q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, saved=None, t_fwd=NOT_SAVED,
                   grads=None, scratch=None, indirect=None, **config):
    """dq, dk, dv (N, H, Dh) for the output gradient (D, H, Dh): one or two launches for the tiles, two passes
    for the large DOMs, softmax recomputed.
    ``saved``, ``t_fwd``: what ``_forward(save=True)`` left (the large DOMs' O and log-sum-exp); without them
    the large DOMs' pass 1 recomputes those by an online-softmax sweep, into an fp32 (N, H, 2) ``scratch``.
    ``grads`` (dq, dk, dv), ``scratch``, ``indirect``: given by ``dom_graphs`` (see ``_forward``)."""
    config = _launch_config(config)
    _, concurrent = (_side_stream(config.pop(key, "auto"), q, True) for key in ("concurrent", "bwd_concurrent"))
    q, k, v, g = _rowmajor(q), _rowmajor(k), _rowmajor(v), grad_out.contiguous()
    n_rows, n_heads, dh = q.shape
    n = n_rows if indirect is None else indirect[1]  # the launches' pulse count: a graph's is its bucket's
    plan = _resolve(q.dtype, dh, n_heads, n, backward=True, **config)
    t_small, t_big, block, precision = plan.t_small, plan.t_big, plan.block, plan.precision
    (warps, stages), (large_warps, large_stages) = plan.warps
    snhl = n_heads if plan.head_loop else 1
    if grads is None:
        dq = torch.empty((n_rows, n_heads, dh), device=q.device, dtype=q.dtype)
        grads = dq, torch.empty_like(dq), torch.empty_like(dq)
    dq, dk, dv = grads
    n_win_big = -(-n // t_big)
    args_buf = cu_seqlens if indirect is None else indirect[0]
    args = (q, k, v, g, dq, dk, dv, pulse_to_dom, cu_seqlens, dom_counts, n, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), g.stride(0), g.stride(1), dq.stride(0), dq.stride(1),
            scale * LOG2E, scale, n_win_big, args_buf)
    spec = _BWD.specialize(args)

    def tiles():  # DOMs of n <= t_big: packed tiles
        for role, grid in _launches(n, t_small, t_big, n_heads, plan.merged, snhl):
            _BWD(grid, args, dict(T_SMALL=t_small, T_BIG=t_big, NH=n_heads, DH=dh, PREC=precision, ROLE=role,
                                  SNHL=snhl, NARROW=plan.narrow, INDIRECT=indirect is not None), warps, spec, stages)

    # DOMs of n > t_big: two passes (query rows, then key rows), windows of `block` rows in parallel
    if saved is None:  # log-sum-exp and Di of those rows
        saved = torch.empty((n_rows, n_heads, 2), device=q.device, dtype=torch.float32) if scratch is None else scratch
        t_fwd = NOT_SAVED
    elif saved.shape != (n_rows, n_heads, dh + 2) or saved.dtype != torch.float32 or not saved.is_contiguous():
        raise ValueError(f"dom_fused: saved must be the forward's contiguous fp32 {(n_rows, n_heads, dh + 2)}, got "
                         f"{saved.dtype} {tuple(saved.shape)}")
    large_args = (q, k, v, g, dq, dk, dv, saved, pulse_to_dom, cu_seqlens, dom_counts, n,
                  q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
                  g.stride(1), dq.stride(0), dq.stride(1), scale * LOG2E, scale, t_fwd, args_buf)
    large_spec = _BWD_LARGE.specialize(large_args)

    def large():
        for pass_ in (1, 2):
            _BWD_LARGE((-(-n // block) * n_heads,), large_args, dict(T=t_big, NH=n_heads, DH=dh, BL=block,
                                                                     PREC=precision, PASS=pass_,
                                                                     W=saved.shape[2], INDIRECT=indirect is not None),
                       large_warps, large_spec, large_stages)

    if concurrent:  # the two write disjoint rows: run them side by side
        run_concurrently(q.device, large, tiles)
    else:
        tiles()
        large()
    return dq, dk, dv


class DomFusedAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v and, with ``save_forward``, the forward's O and log-sum-exp of the
    large DOMs' rows (the backward recomputes the rest of the softmax).

    ``save_forward`` "auto" = fp32 only. Measured (H100, 4,096 events, profiler µs per launch, saved / not):
    fp32 8x16 the backward's pass 1 3,244 -> 2,206 and the forward's flash launch 1,233 -> 1,305, step 10.76 ->
    9.79 ms; fp32 1x128 pass 1 1,939 -> 1,664, forward 1,259 -> 1,314, step 5.25 -> 5.04 ms. In bf16 it
    loses: the forward's flash loop spills and writes fp32 O (1x128 big-window launch 198 -> 268 µs) for a
    pass 1 that only drops 388 -> 373 µs, whose time goes to the 17-64-pulse DOMs the forward did in tiles
    (8x16: step 3.83 -> 4.14 ms). docs/dom_fused_notes.md, runs 39-41."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, config):
        save = config.get("save_forward", "auto")
        if save == "auto":
            save = q.dtype == torch.float32  # measured above
        if not isinstance(save, bool):
            raise ValueError(f"dom_fused: save_forward must be True, False or 'auto', got {save!r}")
        result = dom_graphs.forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, save, config) \
            if _use_graphs(config, q, True) else None
        ctx.graphed = result is not None  # (then the backward replays a graph too, where it can)
        if result is None:
            result = _forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, True, save, config)
        out, saved, t_fwd = result
        if not save:
            saved, t_fwd = None, NOT_SAVED
        ctx.save_for_backward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, saved)
        ctx.scale, ctx.config, ctx.t_fwd = scale, config, t_fwd
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, cu_seqlens, pulse_to_dom, dom_counts, saved = ctx.saved_tensors
        grads = None
        if ctx.graphed:
            grads = dom_graphs.backward(grad_out, q, k, v, cu_seqlens, pulse_to_dom, dom_counts, ctx.scale, saved,
                                        ctx.t_fwd, ctx.config)
        if grads is None:
            grads = fused_backward(grad_out, q, k, v, cu_seqlens, pulse_to_dom, dom_counts, ctx.scale, saved,
                                   ctx.t_fwd, **ctx.config)
        return (*grads, None, None, None, None, None)


def _training_defaults(q, config: dict) -> None:
    """What a training step's forward plans differently (in place): one fp32 head keeps the merged launch, since
    v14 measured size classes slower there in a training step (v19 note)."""
    if q.dtype == torch.float32 and q.shape[1] == 1:
        config.setdefault("merged", True)


def _use_graphs(config, q, autograd: bool) -> bool:
    """Whether a training step (``autograd``) or an inference forward tries CUDA-graph replays (``dom_graphs``, which
    still launches eagerly where no graph applies): ``graphs`` True, or "auto" below ``TRAINING_GRAPHS_BELOW_PULSES``
    / ``INFERENCE_GRAPHS_BELOW_PULSES`` (one head) / ``INFERENCE_GRAPHS_BELOW_PULSES_MULTI_HEAD``."""
    setting = _graphs_setting(config, q)
    if setting == "auto":
        return q.shape[0] < _graphs_below_pulses(q.shape[1], autograd)
    return setting


def _graphs_below_pulses(n_heads: int, autograd: bool) -> int:
    """The pulse count from which "auto" launches eagerly (see TRAINING_GRAPHS_BELOW_PULSES)."""
    if autograd:
        return TRAINING_GRAPHS_BELOW_PULSES
    return INFERENCE_GRAPHS_BELOW_PULSES if n_heads == 1 else INFERENCE_GRAPHS_BELOW_PULSES_MULTI_HEAD


def _graphs_setting(config, q):
    """``graphs``: "auto" (the default) or True replay a training step (under "auto" below
    ``TRAINING_GRAPHS_BELOW_PULSES``) and an inference forward (``dom_fused_attention`` without autograd; under
    "auto" below ``INFERENCE_GRAPHS_BELOW_PULSES``) from CUDA graphs where ``dom_graphs`` can; False launches eagerly.
    True raises a ValueError for CPU tensors and for plans with size classes (``_graph_config``); misaligned
    tensors launch eagerly under either. (``fused_forward`` always launches eagerly.)"""
    setting = config.get("graphs", "auto")
    if setting not in ("auto", True, False):
        raise ValueError(f"dom_fused: graphs must be True, False or 'auto', got {setting!r}")
    if setting is True and not q.is_cuda:
        raise ValueError(f"dom_fused: graphs=True needs CUDA tensors, got q on {q.device}")
    return setting


def _graph_config(q, config, bucket, autograd=True):
    """The config of a training step's (``autograd``) or an inference forward's launches inside CUDA graphs
    (``dom_graphs``), or None where the call launches eagerly: a plan with size classes at the bucket's pulse count
    (their lists and scratch are not read through the argument buffer). Inside graphs the independent launches run
    on two streams (free at replay) unless the config says otherwise."""
    graph_config = _launch_config(config)
    for key in ("concurrent", "bwd_concurrent"):
        if graph_config.get(key, "auto") == "auto":
            graph_config[key] = True
    if autograd:
        _training_defaults(q, graph_config)
    plan = _resolve(q.dtype, q.shape[2], q.shape[1], bucket,
                    **{key: val for key, val in graph_config.items() if key not in ("concurrent", "bwd_concurrent")})
    if plan.size_classes:
        if config.get("graphs") is True:
            raise ValueError("dom_fused: graphs=True, but this plan has size classes (several heads from "
                             "merge_below_pulses), which CUDA graphs do not replay; use 'auto' or False")
        return None
    return graph_config


def dom_fused_attention(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale=None, **config):
    """Functional entry point on raw tensors (the CUDA-graph wrapper and benchmarks use it)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # nothing to differentiate: skip autograd.Function's host overhead (~10-15 µs a call), and replay the
        # launches from a graph where one applies and pays (INFERENCE_GRAPHS_BELOW_PULSES)
        if _use_graphs(config, q, False):
            result = dom_graphs.forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, float(scale), False, config,
                                        autograd=False)
            if result is not None:
                return result[0]
        return fused_forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, float(scale), **config)
    # fused_forward (in DomFusedAttention.forward) checks the inputs
    return DomFusedAttention.apply(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, float(scale), config)


def _attend(q, k, v, batch, prep, scale):
    return dom_fused_attention(q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts, scale)


SPEC = BackendSpec(
    name="dom_fused",
    description="Triton: small DOMs packed into masked 2T-row tiles, large DOMs flash-looped, attention fused "
                "with the mean pool, forward and backward, no per-batch prep",
    devices=frozenset({"cuda"}),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    modes=frozenset({"forward", "forward_backward"}),
    attend=_attend,
)
