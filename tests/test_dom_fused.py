"""dom_fused (Triton) vs the float64 reference backend, forward and gradients.

Runs on CUDA; on a CPU machine it runs through Triton's interpreter when triton is installed and
TRITON_INTERPRET=1 is set (small sizes only), and is skipped otherwise (the CI venv has no triton).
Each case draws fresh random q, k, v and a random output gradient. The kernels write into
torch.empty buffers and every output / gradient row is compared, so an unwritten row fails.
"""

import numpy as np
import pytest
import torch

from iceaggr_lib.backends import UnsupportedError, dom_attention, get_backend
from iceaggr_lib.backends import dom_classes, dom_fused
from iceaggr_lib.testing import (TOLERANCE, batch_from_dom_sizes, icecube_like_sizes, random_qkv, reference_errors,
                                 rel_err, triton_kernel_device)

DEVICE = triton_kernel_device()

needs_kernel = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or triton with TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def check_against_reference(sizes, n_heads, head_dim, dtype, seed=0, scales=None, **config):
    """Forward and gradients of dom_fused (``config``) against the float64 reference on fresh random q, k, v,
    each multiplied by its factor in ``scales`` if given."""
    batch = batch_from_dom_sizes(sizes, seed=seed).to(DEVICE)
    q, k, v = random_qkv(batch.n_pulses, n_heads, head_dim, dtype=dtype, device=DEVICE, seed=seed,
                         requires_grad=scales is None)
    if scales is not None:
        q, k, v = ((t * s).requires_grad_(True) for t, s in zip((q, k, v), scales))
    scale = head_dim ** -0.5

    def attend(q, k, v):
        out = dom_fused.dom_fused_attention(q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx,
                                            batch.dom_pulse_counts, scale, **config)
        assert out.shape == (batch.n_doms, n_heads, head_dim) and out.dtype == dtype
        return out

    grad = torch.randn((batch.n_doms, n_heads, head_dim), generator=torch.Generator().manual_seed(seed + 1))
    errs = reference_errors(attend, batch, q, k, v, grad.to(DEVICE, dtype), scale)
    tol = TOLERANCE[dtype]
    assert max(errs) <= tol, f"rel errs out/dq/dk/dv = {errs} (tol {tol}) for {len(sizes)} DOMs, {dtype}"
    return errs


# Small tiles (T = 8, 16) make small test batches exercise every path: packed tiles of each level,
# windows with nothing to do, and the flash loop of DOMs above the last level.
@needs_kernel
@pytest.mark.parametrize("levels,merged", [((8,), False), ((8, 16), False), ((8, 16), True), ((8, 8), True)])
@pytest.mark.parametrize("sizes", [
    [1, 1, 2, 3, 1, 5, 1, 1, 4, 1, 2, 2, 7, 1, 8, 9],
    [3, 1, 20, 1, 1, 2, 37, 1, 1, 3, 16, 17, 1],
    [1] * 40,
    [50],
    [17, 1, 16, 33, 2, 8, 9],
], ids=["mixed", "with_large", "ones", "one50", "edges"])
def test_small_tiles_fp32(sizes, levels, merged):
    check_against_reference(sizes, 2, 16, torch.float32, levels=levels, bwd_levels=levels, block=16, merged=merged)


@needs_kernel
@pytest.mark.parametrize("head_batch", [False, True], ids=["loop", "batched"])
@pytest.mark.parametrize("levels,merged", [((8,), False), ((8, 16), False), ((8, 16), True)])
@pytest.mark.parametrize("sizes", [
    [1, 1, 2, 3, 1, 5, 1, 1, 4, 1, 2, 2, 7, 1, 8, 9],
    [3, 1, 20, 1, 1, 2, 37, 1, 1, 3, 16, 17, 1],
], ids=["mixed", "with_large"])
def test_head_loop_fp32(sizes, levels, merged, head_batch):
    """Small-DOM programs doing every head of their window write every head of every row (4 heads), with a
    loop over the heads or with the heads as the batch axis of 3-D dots (``head_batch``)."""
    check_against_reference(sizes, 4, 16, torch.float32, levels=levels, bwd_levels=levels, block=16, merged=merged,
                            head_loop=True, head_batch=head_batch)


@needs_kernel
@pytest.mark.parametrize("n_heads,extra", [(1, {}), (4, dict(head_batch=False)), (4, dict(head_batch=True))],
                         ids=["h1", "h4_loop", "h4_batched"])
@pytest.mark.parametrize("narrow", [True, False])
def test_narrow_tiles_fp32(n_heads, extra, narrow):
    """Windows whose owned rows fit in T rows take a T x T tile from their first owned row (forward and
    backward), the others the 2T x 2T tile: both kinds occur in this batch at both tile levels
    (``dom_fused.window_spans``), and either way every DOM matches the reference (so does the plan with
    narrow tiles off)."""
    sizes = list(np.random.default_rng(2).integers(1, 33, 60)) + [1, 15, 14, 1, 1, 40, 3, 30, 2, 16]
    for lo, t in ((0, 16), (16, 32)):
        spans = dom_fused.window_spans(sizes, lo, t)
        assert 0 < spans["fit_narrow"] < spans["with_work"], spans
    config = dict(head_loop=True, **extra) if n_heads > 1 else {}
    check_against_reference(sizes, n_heads, 16, torch.float32, levels=(16, 32), bwd_levels=(16,), merged=False,
                            narrow=narrow, **config)


@needs_kernel
@pytest.mark.parametrize("n_heads,extra", [(1, {}), (4, dict(head_loop=True)), (4, dict(head_loop=False)),
                                            (2, dict(flash_block=32, flash_num_stages=1, precision="tf32x3_mask"))],
                         ids=["h1", "h4_loop", "h4", "h2_flash_block"])
@pytest.mark.parametrize("sizes", [
    [3, 1, 20, 1, 1, 2, 37, 1, 1, 3, 16, 17, 1],
    [17, 1, 16, 33, 2, 8, 9, 1, 50],
], ids=["with_large", "edges"])
def test_split_flash_fp32(sizes, n_heads, extra):
    """``split_flash`` (without ``size_classes``, which "auto" turns on with it): small tiles, big tiles and the
    large DOMs' flash loops as three launches; every DOM of every level written once (a DOM missed or written by two roles fails the reference check)."""
    check_against_reference(sizes, n_heads, 16, torch.float32, levels=(8, 16), bwd_levels=(8, 16), block=16,
                            merged=False, split_flash=True, size_classes=0, **extra)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_cuda)])
@pytest.mark.parametrize("n_heads,extra", [(1, {}), (4, dict(head_loop=True, split_flash=True, large_list=False)),
                                            (2, dict(merged=True, class_num_warps=2)),
                                            (4, dict(class_max_registers=64))],
                         ids=["h1", "h4_split", "h2_merged", "h4_capped"])
@pytest.mark.parametrize("top", [8, 16])
def test_size_classes(top, n_heads, extra, dtype):
    """``size_classes``: the DOMs up to ``top`` pulses (every class 1, 2, 3-4, 5-8, 9-16 occurs, several work
    items of some) by dom_classes, the rest by the big windows' tiles (top 8) or only the flash loops (top 16);
    every DOM matches the reference in forward and gradients (the backward keeps its own tiles). bf16 on CUDA
    only: the interpreter's bf16 dots in the other launches are not exact enough to test against."""
    sizes = ([1] * 40 + [2] * 20 + list(np.random.default_rng(3).integers(1, 17, 50))
             + [16, 9, 8, 5, 4, 3, 17, 40, 1, 33, 2])
    check_against_reference(sizes, n_heads, 16, dtype, levels=(8, 16), bwd_levels=(8, 16), block=16,
                            size_classes=top, **extra)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_cuda)])
@pytest.mark.parametrize("n_heads,extra", [(1, {}), (4, dict(head_loop=True, split_flash=True)),
                                            (2, dict(flash_full_blocks=False)), (2, dict(size_classes=8)),
                                            pytest.param(2, dict(concurrent=True), marks=needs_cuda),
                                            (2, dict(flash_query_pairs=True)),
                                            (1, dict(flash_query_pairs=True, flash_full_blocks=False)),
                                            (2, dict(flash_query_pairs=True, flash_fixed_max=True)),
                                            (1, dict(flash_fixed_max=True))],
                         ids=["h1", "h4_split", "h2_masked_blocks", "h2_top8", "h2_two_streams", "h2_pairs",
                              "h1_pairs_masked", "h2_pairs_fixed", "h1_fixed"])
@pytest.mark.parametrize("large_classes", [8, 2])
@pytest.mark.parametrize("sizes", [[1] * 10 + [2, 5, 9, 16, 17, 32, 33, 48, 49, 64, 65, 100, 3, 1, 20],
                                   [17] * 28 + [33, 65, 1, 2]], ids=["mixed", "full_lists"])
def test_large_list(sizes, large_classes, n_heads, extra, dtype, monkeypatch):
    """``large_list``: the DOMs above ``size_classes`` (the top tile level 16; "h2_top8": 8, below the big tile
    level) listed by size class (17-32, 33-64, 65-128; with two large classes the second open-ended, 33-100 in one
    list) and flash-looped one (DOM, head) per work item, the largest class first. Sizes at multiples of the
    16-row block (32, 48, 64: no partial key block) and one past them; forward and gradients against the
    reference (fp32: the training forward saves the flash loops' rows for the backward). "full_lists": the 17-32
    list filled to 28 of its 36 slots (``dom_classes.large_capacity``), so that a list overrunning into the next
    one fails."""
    monkeypatch.setattr(dom_classes, "LARGE_CLASSES", large_classes)
    config = dict(levels=(8, 16), bwd_levels=(8, 16), block=16, size_classes=16, large_list=True)
    check_against_reference(sizes, n_heads, 16, dtype, seed=5, **dict(config, **extra))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=needs_cuda)])
@pytest.mark.parametrize("limit", [0.5, 2.0 ** 64], ids=["every_dom_again", "default_limit"])
@pytest.mark.parametrize("scales", [None, (1.0, 6.0, 1.0)], ids=["unit", "k_x6"])
def test_fixed_max_falls_back_to_the_online_loops(dtype, limit, scales, monkeypatch):
    """v24's flash loops without a running max (``flash_fixed_max``) check each row after the loop; a DOM with a
    row sum at or above ``dom_classes.FIXED_ROW_SUM_LIMIT`` is done again by the online loops. A limit of 0.5 sends
    every DOM back (a row sum is at least 1), so the result is the online loops' (a DOM summed twice would fail);
    k times 6 gives scores whose later key blocks exceed the first block's max (P above 1), which the default limit
    keeps. fp16 runs the 16-bit loops (P @ V as a 16-bit dot) in Triton's interpreter, which gets bf16 wrong.
    Forward only: the backward does not use these loops."""
    monkeypatch.setattr(dom_classes, "FIXED_ROW_SUM_LIMIT", limit)
    sizes = [1, 3, 40, 2, 70, 17, 33, 1, 5, 100, 16, 64, 65, 90]
    batch = batch_from_dom_sizes(sizes, seed=3).to(DEVICE)
    q, k, v = random_qkv(batch.n_pulses, 2, 16, dtype=dtype, device=DEVICE, seed=3)
    if scales is not None:
        q, k, v = (t * s for t, s in zip((q, k, v), scales))
    config = dict(levels=(8, 16), block=16, size_classes=16, large_list=True, flash_query_pairs=True,
                  flash_fixed_max=True, merged=False, split_flash=True)
    assert dom_fused._resolve(dtype, 16, 2, batch.n_pulses, **config).fixed_max
    out = dom_fused.dom_fused_attention(q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts,
                                        0.25, **config)
    expected = dom_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), batch.to("cpu"), "reference",
                             scale=0.25)
    assert rel_err(out.double().cpu(), expected) <= TOLERANCE[dtype]


def test_size_classes_plan():
    """size_classes takes one of the two tile levels, with power-of-two heads; the backward ignores it; "auto" is
    on exactly where split_flash is (several heads, from 400k pulses), at T_small and with large_list, with the
    measured warps and flash registers per dtype; large_list leaves no _fwd_kernel launch."""
    plan = dom_fused._resolve(torch.bfloat16, 16, 8, 500_000, size_classes=32)
    assert plan.size_classes == 32 and dom_fused._class_roles([], plan, 64, 8, 8) == [(3, (2 * 8,))]
    assert plan.large_list is True and dom_fused.forward_roles(plan, 500_000, 8) == []  # all in dom_classes
    plan = dom_fused._resolve(torch.bfloat16, 16, 8, 500_000, size_classes=32, large_list=False)
    assert dom_fused.forward_roles(plan, 500_000, 8) == [(3, (-(-500_000 // 32) * 8,))]  # the flash loops alone
    plan = dom_fused._resolve(torch.bfloat16, 16, 8, 500_000, size_classes=16, large_list=False)
    assert [r for r, _ in dom_fused.forward_roles(plan, 500_000, 8)] == [4, 3]  # big windows' tiles, flash loops
    assert dom_fused._resolve(torch.bfloat16, 16, 8, 100_000, size_classes=16).large_list is False  # merged: off
    assert dom_fused._resolve(torch.bfloat16, 16, 8, 500_000, backward=True, size_classes=32).size_classes == 0
    for dtype, flash_regs, stages, class_regs in ((torch.float32, 168, 2, 96), (torch.bfloat16, 128, 3, None)):
        plan = dom_fused._resolve(dtype, 16, 8, 500_000)  # "auto": where the flash loops launch apart
        assert (plan.size_classes, plan.large_list, plan.flash_regs, plan.flash_stages, plan.class_regs,
                plan.query_pairs) == (16, True, flash_regs, stages, class_regs, True)
        assert dom_fused.forward_roles(plan, 500_000, 8) == []
        assert dom_fused._resolve(dtype, 16, 8, 100_000).size_classes == 0  # merged below 400k pulses
        assert dom_fused._resolve(dtype, 16, 8, 100_000).large_list is False
        assert dom_fused._resolve(dtype, 128, 1, 500_000).flash_regs is None
        assert dom_fused._resolve(dtype, 16, 8, 500_000, backward=True).size_classes == 0
        assert dom_fused._resolve(dtype, 16, 8, 500_000).flash_precision == plan.precision  # 16-dim heads: tf32x3
    assert dom_fused._resolve(torch.bfloat16, 128, 1, 500_000).size_classes == 0
    # one fp32 head (v19): from 400k pulses size classes of <= 16 (2 warps) and the listed flash launch with one loop
    # body and f16x3 dots; merged below (and in a training forward, which _forward asks for merged=True); v20: that
    # launch with k, v split once per DOM, query-block pairs and 2 stages
    plan = dom_fused._resolve(torch.float32, 128, 1, 500_000)
    assert (plan.merged, plan.size_classes, plan.large_list, plan.class_warps, plan.full_blocks, plan.query_pairs,
            plan.flash_precision, plan.presplit, plan.flash_stages) == (False, 16, True, 2, False, True, "f16x3", True, 2)
    # the split halves are f16x3's only (bf16, 16-dim heads' tf32x3_mask: off; asked for there: an error)
    assert dom_fused._resolve(torch.float32, 128, 1, 500_000, flash_presplit=False).presplit is False
    assert dom_fused._resolve(torch.float32, 128, 1, 500_000, backward=True, flash_presplit=True).presplit is False
    for dtype, heads, dh in ((torch.bfloat16, 1, 128), (torch.float32, 8, 16), (torch.float32, 1, 128)):
        n = 100_000 if dh == 128 and dtype == torch.float32 else 500_000  # (the last: merged, no listed launch)
        assert dom_fused._resolve(dtype, dh, heads, n).presplit is False
        with pytest.raises(ValueError, match="flash_presplit=True needs"):
            dom_fused._resolve(dtype, dh, heads, n, flash_presplit=True)
    assert dom_fused.forward_roles(plan, 500_000, 1) == []
    for kw in (dict(n_pulses=100_000), dict(n_pulses=500_000, merged=True)):
        kw = dict(dict(dtype=torch.float32, head_dim=128, n_heads=1), **kw)
        assert (dom_fused._resolve(**kw).merged, dom_fused._resolve(**kw).size_classes) == (True, 0)
    assert dom_fused._resolve(torch.float32, 128, 1, 500_000, backward=True).size_classes == 0
    assert dom_fused._resolve(torch.float32, 128, 1, 500_000, flash_precision="tf32x3").flash_precision == "tf32x3"
    assert dom_fused._resolve(torch.bfloat16, 128, 1, 500_000, flash_precision="f16x3").flash_precision == "ieee"
    assert dom_fused._resolve(torch.bfloat16, 16, 8, 500_000).class_warps == 2
    assert dom_fused._resolve(torch.float32, 16, 8, 500_000).class_warps == 4
    for bad in (dict(size_classes=8), dict(size_classes=16, tile=16), dict(size_classes=16, class_num_warps=3),
                dict(size_classes=0, large_list=True), dict(large_list="yes"), dict(flash_full_blocks=1),
                dict(flash_max_registers=300), dict(class_max_registers=16), dict(class_max_registers=True),
                dict(flash_query_pairs=1), dict(flash_precision="fp16"), dict(flash_presplit="yes"),
                dict(flash_fixed_max=1), dict(flash_fixed_max=True, flash_precision="f16x3")):
        with pytest.raises(ValueError, match="dom_fused"):
            dom_fused._resolve(torch.float32, 16, 8, 1000, **bad)
    # v24's loops without a running max: not with f16x3 (P may exceed fp16's range); the default with several heads
    # (fp32 run 127, bf16 since v25, run 128), not with one head (fp32: f16x3 loops; bf16: no listed launch)
    with pytest.raises(ValueError, match="flash_fixed_max needs"):
        dom_fused._resolve(torch.float32, 128, 1, 500_000, flash_fixed_max=True)
    with pytest.raises(ValueError, match="fixed_max needs .* with kv16"):  # large_attend's check, the same rule
        dom_classes.check_fixed_max("tf32x3_mask", presplit=True)
    dom_classes.check_fixed_max("tf32x3_mask")
    assert dom_fused._resolve(torch.float32, 16, 8, 500_000).fixed_max is True
    assert dom_fused._resolve(torch.bfloat16, 16, 8, 500_000).fixed_max is True
    assert dom_fused._resolve(torch.bfloat16, 16, 8, 500_000, flash_fixed_max=False).fixed_max is False
    assert dom_fused._resolve(torch.bfloat16, 128, 1, 500_000).fixed_max is False
    assert dom_fused._resolve(torch.float32, 128, 1, 500_000).fixed_max is False
    assert dom_fused._resolve(torch.float32, 16, 8, 500_000, flash_precision="f16x3").fixed_max is False  # "auto"
    with pytest.raises(ValueError, match="power of two"):
        dom_fused._resolve(torch.float32, 16, 3, 1000, size_classes=16)


@needs_kernel
@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("extra,t_saved,n_saved", [({}, 16, 4), (dict(size_classes=8, large_list=True), 8, 5)],
                         ids=["tiles", "large_list"])
def test_training_forward_saves_the_large_doms_rows(n_heads, extra, t_saved, n_saved):
    """A training step's forward leaves O and the log2-sum-exp of every row of the DOMs above its top tile
    level (what the backward's pass 1 reads instead of recomputing), checked row by row against float64; with
    ``large_list`` above ``size_classes`` (8 here: the DOM of 16 pulses too)."""
    sizes = [3, 1, 20, 1, 40, 2, 17, 1, 33, 16]
    batch = batch_from_dom_sizes(sizes, seed=4).to(DEVICE)
    q, k, v = random_qkv(batch.n_pulses, n_heads, 16, dtype=torch.float32, device=DEVICE, seed=4)
    scale = 0.25
    _, saved, t_fwd = dom_fused._forward(q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts,
                                         scale, True, True, dict(levels=(8, 16), block=16, **extra))
    assert t_fwd == t_saved and saved.shape == (batch.n_pulses, n_heads, 16 + 2) and saved.dtype == torch.float32
    cu = batch.cu_seqlens.tolist()
    checked = 0
    for d, n in enumerate(sizes):
        if n > t_fwd:
            r = slice(cu[d], cu[d + 1])
            s = torch.einsum("ihc,jhc->hij", q[r].double(), k[r].double()) * scale
            o = torch.einsum("hij,jhc->ihc", s.softmax(-1), v[r].double())
            lse2 = torch.logsumexp(s, -1).T / np.log(2)  # (rows, heads), log base 2
            assert rel_err(saved[r, :, :16], o) <= 1e-5, f"O of DOM {d} (n = {n})"
            assert rel_err(saved[r, :, 16], lse2) <= 1e-5, f"log-sum-exp of DOM {d} (n = {n})"
            checked += 1
    assert checked == n_saved


@needs_kernel
@pytest.mark.parametrize("n_heads,extra", [(1, {}), (2, dict(split_flash=True, merged=False)),
                                            (2, dict(head_loop=True, merged=True))],
                         ids=["h1", "h2_split_flash", "h2_merged"])
def test_backward_with_and_without_the_saved_forward_fp32(n_heads, extra):
    """The backward's large DOMs (here n > 8) take O and log-sum-exp from the training forward where it
    flash-looped them (n > 16) and recompute them for the rest (8 < n <= 16): both kinds in one batch,
    gradients against the reference; and the backward without a saved forward gives the same gradients."""
    sizes = [3, 1, 20, 1, 1, 12, 37, 1, 9, 3, 16, 17, 1, 50]
    cfg = dict(levels=(8, 16), bwd_levels=(8,), block=16, **extra)
    check_against_reference(sizes, n_heads, 16, torch.float32, seed=11, **cfg)
    check_against_reference(sizes, n_heads, 16, torch.float32, seed=11, save_forward=False, **cfg)
    batch = batch_from_dom_sizes(sizes, seed=12).to(DEVICE)
    q, k, v = random_qkv(batch.n_pulses, n_heads, 16, dtype=torch.float32, device=DEVICE, seed=12)
    g = torch.randn((batch.n_doms, n_heads, 16), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    idx = (batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts)
    _, saved, t_fwd = dom_fused._forward(q, k, v, *idx, 0.25, True, True, cfg)
    with_saved = dom_fused.fused_backward(g, q, k, v, *idx, 0.25, saved, t_fwd, **cfg)
    without = dom_fused.fused_backward(g, q, k, v, *idx, 0.25, **cfg)
    for a, b in zip(with_saved, without):
        assert rel_err(a, b) <= 1e-5
    with pytest.raises(ValueError, match="saved"):
        dom_fused.fused_backward(g, q, k, v, *idx, 0.25, saved[:, :, :4], t_fwd, **cfg)
    with pytest.raises(ValueError, match="save_forward"):
        dom_fused.dom_fused_attention(q.requires_grad_(), k, v, *idx, save_forward="yes")


def test_split_flash_plan():
    assert dom_fused._launches(100, 8, 16, 2, False, 2, split_flash=True) == [(2, (13,)), (4, (7,)), (3, (14,))]
    assert dom_fused._launches(100, 8, 16, 2, False, 1, split_flash=True) == [(2, (26,)), (4, (14,)), (3, (14,))]
    # "auto": with several heads where the tiles are two launches (not merged), forward only
    for dtype in (torch.float32, torch.bfloat16):
        assert dom_fused._resolve(dtype, 16, 8, 500_000).split_flash
        assert not dom_fused._resolve(dtype, 16, 8, 100_000).split_flash  # merged below 400k pulses
        assert not dom_fused._resolve(dtype, 128, 1, 500_000).split_flash
        assert not dom_fused._resolve(dtype, 16, 8, 500_000, backward=True).split_flash
    with pytest.raises(ValueError, match="split_flash"):
        dom_fused._resolve(torch.float32, 16, 1, 1000, split_flash=True, tile=16)
    with pytest.raises(ValueError, match="split_flash"):
        dom_fused._resolve(torch.float32, 16, 1, 1000, split_flash=True, merged=True)
    with pytest.raises(ValueError, match="precision"):
        dom_fused._resolve(torch.float32, 16, 1, 1000, precision="tf64")


def test_warps_per_launch_plan():
    """Several 16-dim heads: the big windows' tiles, the flash loops and the backward run 2-warp programs (v13),
    the small windows' tiles 4; one 128-dim head keeps 4 everywhere; a bad warps value is refused by name."""
    many = dom_fused._resolve(torch.bfloat16, 16, 8, 500_000)
    assert (many.warps[0][0], many.big_warps, many.flash_warps, many.flash_block) == (4, 2, 2, 32)
    back = dom_fused._resolve(torch.float32, 16, 8, 500_000, backward=True)
    assert (back.warps[0][0], back.warps[1][0]) == (2, 2)
    one = dom_fused._resolve(torch.bfloat16, 128, 1, 500_000)
    assert (one.warps, one.big_warps, one.flash_warps) == (((4, None), (4, 2)), None, None)
    for key in ("flash_num_warps", "big_num_warps"):
        with pytest.raises(ValueError, match=key):
            dom_fused._resolve(torch.float32, 16, 8, 1000, **{key: 3})


@needs_kernel
def test_each_forward_launch_gets_its_roles_warps(monkeypatch):
    """The forward's launches are made with their role's warps and pipelining: small windows ``num_warps``, big
    windows' tiles ``big_num_warps``, flash loops ``flash_num_warps`` / ``flash_num_stages`` (recorded at the
    launch), and the result still matches the reference."""
    launches = []
    real = dom_fused._FWD

    class Recorder:  # FastLaunch's call, recorded
        specialize = staticmethod(real.specialize)

        def __call__(self, grid, args, constexprs, warps, spec, stages):
            launches.append((constexprs["ROLE"], warps, stages))
            return real(grid, args, constexprs, warps, spec, stages)

    monkeypatch.setattr(dom_fused, "_FWD", Recorder())
    check_against_reference([3, 1, 20, 1, 1, 2, 37, 1, 1, 3, 16, 17, 1], 4, 16, torch.float32, levels=(8, 16),
                            bwd_levels=(8, 16), block=16, merged=False, split_flash=True, head_loop=True,
                            num_warps=4, big_num_warps=2, flash_num_warps=1, flash_num_stages=2, size_classes=0)
    assert launches[:3] == [(2, 4, None), (4, 2, None), (3, 1, 2)], launches


def test_launch_that_does_not_fit_names_the_backend_and_settings():
    """A kernel that needs more shared memory than the GPU has (e.g. a user's flash_block=64 with fp32 and three
    stages) is reported naming dom_fused, the kernel and its settings, not only Triton's byte counts."""
    pytest.importorskip("triton")
    from triton.runtime.errors import OutOfResources

    from iceaggr_lib.backends.triton_launch import FastLaunch

    class TooBig:  # stands in for a JITFunction whose compile exceeds the shared memory
        __name__ = "_fwd_kernel"

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(262144, 232448, "shared memory")
            return launch

    with pytest.raises(RuntimeError, match=r"dom_fused: kernel _fwd_kernel with \{'BL': 64\}, num_warps=4, "
                                           r"num_stages=3 does not fit this GPU.*shared memory"):
        FastLaunch(TooBig(), "dom_fused")((1,), (), {"BL": 64}, 4, None, 3)


@needs_kernel
def test_empty_batch():
    """A batch with no pulses gives an empty output and empty gradients, not an error (no launch has work)."""
    q, k, v = (torch.randn(0, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    out = dom_fused.dom_fused_attention(q, k, v, cu, empty, empty)
    assert out.shape == (0, 2, 16)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(g.shape == (0, 2, 16) for g in grads)


def test_window_spans_counts_by_hand():
    """Windows of 4 rows: DOM sizes 1,2 | 3 (rows 3-5, spans past its window) | 1,1 ... counted by hand."""
    spans = dom_fused.window_spans([1, 2, 3, 1, 1, 4], 0, 4)  # rows: 0 | 1-2 | 3-5 | 6 | 7 | 8-11
    # window 0 owns DOMs at rows 0, 1-2, 3-5 (span 6 > 4); window 1 owns 6, 7 (singles only: no work);
    # window 2 owns 8-11 (span 4: fits)
    assert spans == {"windows": 3, "with_work": 2, "fit_narrow": 1, "multi_fit_narrow": 1}


def test_bad_inputs_name_the_backend():
    """Index tensors on another device and q, k, v of mixed dtypes are refused naming dom_fused (meta tensors
    stand in for a second device; the check runs before any kernel)."""
    pytest.importorskip("triton")
    batch = batch_from_dom_sizes([1, 2, 3])
    q, k, v = random_qkv(batch.n_pulses, 1, 16)
    idx = (batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts)
    with pytest.raises(ValueError, match="dom_fused: every tensor must be on one device.*cu_seqlens on meta"):
        dom_fused.fused_forward(q, k, v, idx[0].to("meta"), *idx[1:], 0.25)
    with pytest.raises(ValueError, match="dom_fused: q, k, v must share one dtype"):
        dom_fused.fused_forward(q, k.double(), v, *idx, 0.25)


def test_head_batch_needs_head_loop():
    with pytest.raises(ValueError, match="head_batch"):
        dom_fused._resolve(torch.bfloat16, 128, 1, 1000, head_batch=True)
    with pytest.raises(ValueError, match="head_batch"):
        dom_fused._resolve(torch.bfloat16, 16, 8, 1000, head_batch=True, head_loop=False)
    assert dom_fused._resolve(torch.bfloat16, 16, 8, 1000, head_batch=True).head_batch
    # "auto" (the default): on wherever it applies, off (no error) where it does not
    assert dom_fused._resolve(torch.bfloat16, 16, 8, 1000).head_batch
    assert not dom_fused._resolve(torch.bfloat16, 16, 8, 1000, head_loop=False).head_batch
    assert not dom_fused._resolve(torch.bfloat16, 16, 6, 1000).head_batch
    assert not dom_fused._resolve(torch.bfloat16, 128, 1, 1000).head_batch


@needs_kernel
@pytest.mark.parametrize("config", [{}, dict(levels=(16, 64), bwd_levels=(16,), merged=False, block=64),
                                    dict(precision="tf32x3_mask"), dict(precision="tf32x3")],
                         ids=["fp32_default", "bf16_default_plan", "tf32x3_mask", "tf32x3"])
def test_random_sizes_fp32(config):
    check_against_reference(icecube_like_sizes(300, seed=3, max_size=80), 1, 32, torch.float32, seed=3, **config)


# the listed flash launch (size classes of <= 16 pulses, the rest listed) on a small test batch, whatever its pulses
LISTED = dict(merged=False, size_classes=16, large_list=True)


@needs_kernel
@pytest.mark.parametrize("scales", [(1e5, 1e-5, 1e5), (1e-9, 1e9, 1e-9), (1e-3, 1e3, 6e4)],
                         ids=["large_q_v", "tiny_q_v", "mixed"])
@pytest.mark.parametrize("config", [dict(merged=True), LISTED, dict(LISTED, flash_presplit=False)],
                         ids=["merged", "listed", "listed_unsplit"])
def test_f16x3_flash_any_magnitude(scales, config):
    """The f16x3 flash loop (``tile_math._mm16``) scales q, k, v by powers of two into fp16's range (per query
    block, per DOM), so inputs far outside it (|x| up to 1e9, fp16's largest is 65504) or far below it (1e-9, below
    fp16's smallest subnormal) keep fp32's tolerance, forward and gradients; the flash loops (DOMs of 17-100 pulses)
    as the merged launch does them and as the listed launch does them (with k and v split once per DOM, v20's
    ``flash_presplit``, and without: the key blocks split in the loop). q and k are scaled inversely, so the scores
    stay O(1): scores of 1e4 and more make fp32 gradients ill-conditioned in any kernel (the backward recomputes
    exp2(s - lse) from two numbers of that size)."""
    check_against_reference([1, 3, 40, 2, 70, 17, 33, 1, 5, 100, 16, 64, 65], 2, 32, torch.float32, seed=4,
                            scales=scales, flash_precision="f16x3", levels=(8, 16), block=16, **config)


@needs_kernel
@pytest.mark.parametrize("n_heads,head_dim", [(2, 32), (1, 128)])
def test_presplit_slots(monkeypatch, n_heads, head_dim):
    """v20's split halves live in a slot per program of the listed flash launch (``dom_classes.PRESPLIT_ROWS`` rows),
    reused from DOM to DOM; a DOM larger than a slot takes v19's loop. With 32-row slots this batch has both kinds,
    and more DOMs than programs (each slot is overwritten by the program's next DOM)."""
    monkeypatch.setattr(dom_classes, "PRESPLIT_ROWS", 32)
    sizes = [1, 3, 40, 2, 70, 17, 33, 1, 5, 100, 16, 64, 65, 32, 20, 18, 31, 25] * 3
    config = dict(LISTED, flash_precision="f16x3", levels=(8, 16), block=16)
    plan = dom_fused._resolve(torch.float32, head_dim, n_heads, len(sizes), **config)
    assert plan.presplit and plan.large_list
    check_against_reference(sizes, n_heads, head_dim, torch.float32, seed=15, **config)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_heads,head_dim", [(1, 128), (8, 16)])
def test_icecube_like_cuda(dtype, n_heads, head_dim):
    sizes = icecube_like_sizes(4000, seed=5)
    sizes[1234] = 455  # the largest DOM seen in the data
    check_against_reference(sizes, n_heads, head_dim, dtype, seed=5)
    # the training step with the other save_forward (the default, "auto", saves in fp32 only)
    check_against_reference(sizes, n_heads, head_dim, dtype, seed=8, save_forward=dtype != torch.float32)
    if dtype == torch.float32:  # both fp32 precisions, whichever the default is (errors near 1e-5 would show here)
        for precision in ("tf32x3", "tf32x3_mask"):
            check_against_reference(sizes, n_heads, head_dim, dtype, seed=9, precision=precision)
        # the flash loops' other precision (f16x3 with one 128-dim head, tf32x3_mask with 16-dim heads)
        other = "tf32x3_mask" if dom_fused._resolve(dtype, head_dim, n_heads, 1).flash_precision == "f16x3" else "f16x3"
        check_against_reference(sizes, n_heads, head_dim, dtype, seed=11, flash_precision=other)
    if dtype == torch.float32 and n_heads == 1:  # the plan of >= 400k pulses (v19: size classes, listed large DOMs)
        check_against_reference(sizes, n_heads, head_dim, dtype, seed=12, merge_below_pulses=0)
        # ... without v20's halves split once per DOM, and with them but single query blocks
        check_against_reference(sizes, n_heads, head_dim, dtype, seed=13, merge_below_pulses=0, flash_presplit=False)
        check_against_reference(sizes, n_heads, head_dim, dtype, seed=14, merge_below_pulses=0,
                                flash_query_pairs=False)
    if n_heads > 1:  # the other head layout, whichever the default is
        default = dom_fused._default_config(dtype, head_dim, n_heads)["head_loop"]
        check_against_reference(sizes, n_heads, head_dim, dtype, seed=6, head_loop=not default)
        check_against_reference(sizes, n_heads, head_dim, dtype, seed=7, head_loop=True,
                                head_batch=not dom_fused._resolve(dtype, head_dim, n_heads, len(sizes)).head_batch)
        for save in (True, False):  # the plan of >= 400k pulses (size classes, listed large DOMs) on this batch
            check_against_reference(sizes, n_heads, head_dim, dtype, seed=10, merge_below_pulses=0, save_forward=save)


@needs_cuda
@pytest.mark.parametrize("sizes", [[1] * 70000, [455], [455, 1, 64, 65, 1, 128, 129, 2]], ids=["ones70k", "one455", "edges"])
def test_edge_cases_cuda(sizes):
    check_against_reference(sizes, 1, 128, torch.bfloat16, seed=7)
    check_against_reference(sizes, 8, 16, torch.float32, seed=8)


@needs_cuda
def test_registry_entry_cuda():
    batch = batch_from_dom_sizes(icecube_like_sizes(500, seed=9)).to("cuda")
    q, k, v = random_qkv(batch.n_pulses, 8, 16, device="cuda", seed=9)
    out = dom_attention(q, k, v, batch, backend="dom_fused", mode="forward_backward")
    ref = dom_attention(q, k, v, batch, backend="reference")
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]


@needs_cuda
def test_fast_launch_matches_plain_launch_cuda():
    """Repeated calls go through FastLaunch's direct path, with results equal to Triton's own launch, also
    when the specialisation changes (an odd pulse count, a misaligned view of q) between calls."""
    from iceaggr_lib.backends import triton_launch

    for sizes, offset in (([1, 3, 70, 1, 20] * 40, 0), ([1, 3, 70, 1, 20] * 40 + [1], 1)):
        batch = batch_from_dom_sizes(sizes, seed=3).to("cuda")
        n = batch.n_pulses
        base = torch.randn(n * 128 + offset, device="cuda").to(torch.bfloat16)
        q = base[offset:].view(n, 1, 128)  # offset 1: not 16-byte aligned, another specialisation
        k, v = (torch.randn(n, 1, 128, device="cuda").to(torch.bfloat16) for _ in range(2))
        args = (q, k, v, batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts, 128 ** -0.5)
        try:
            triton_launch.ENABLED = False
            plain = dom_fused.fused_forward(*args)
        finally:
            triton_launch.ENABLED = True
        before = dom_fused._FWD.fast_launches
        fast = [dom_fused.fused_forward(*args) for _ in range(3)]
        assert dom_fused._FWD.fast_launches > before
        for out in fast:
            assert torch.equal(out, plain)


@needs_cuda
def test_two_streams_match_one_cuda():
    """Launches side by side on two streams (``concurrent`` / ``bwd_concurrent``) give the one-stream results
    exactly, also when the caller runs on a stream of its own, which is its current stream again afterwards."""
    batch = batch_from_dom_sizes(np.append(icecube_like_sizes(3000, seed=4), 300), seed=4).to("cuda")
    q, k, v = random_qkv(batch.n_pulses, 1, 128, dtype=torch.bfloat16, device="cuda", seed=4)
    g = torch.randn(batch.n_doms, 1, 128, device="cuda").to(torch.bfloat16)
    idx = (batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts, 128 ** -0.5)
    one = dom_fused.fused_forward(q, k, v, *idx, concurrent=False)
    one_b = dom_fused.fused_backward(g, q, k, v, *idx, bwd_concurrent=False)
    mine = torch.cuda.Stream()
    mine.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(mine):
        for _ in range(2):  # the second call takes the cached stream objects
            two = dom_fused.fused_forward(q, k, v, *idx, concurrent=True)
            two_b = dom_fused.fused_backward(g, q, k, v, *idx, bwd_concurrent=True)
            assert torch.cuda.current_stream() == mine
    torch.cuda.current_stream().wait_stream(mine)
    torch.cuda.synchronize()
    assert torch.equal(two, one)
    for a, b in zip(two_b, one_b):
        assert torch.equal(a, b)


def test_launch_plan_merges_small_bf16_batches():
    """bf16 forward: one launch below merge_below_pulses (host-bound), two above; fp32 one below 400k pulses, and
    with one head above it too in a training step (v19)."""
    merged = lambda dtype, heads, n, **cfg: dom_fused._resolve(dtype, 128 // heads, heads, n, **cfg).merged
    assert merged(torch.bfloat16, 1, 10_000) and not merged(torch.bfloat16, 1, 200_000)
    assert merged(torch.bfloat16, 8, 300_000) and not merged(torch.bfloat16, 8, 600_000)
    assert merged(torch.float32, 1, 399_999) and not merged(torch.float32, 1, 10**6) and merged(torch.float32, 8, 10)
    assert not merged(torch.bfloat16, 1, 10, merged=False) and merged(torch.bfloat16, 1, 10**6, merged=True)
    with pytest.raises(ValueError, match="merged"):
        merged(torch.bfloat16, 1, 10, merged="sometimes")
    with pytest.raises(TypeError, match="unknown config"):
        merged(torch.bfloat16, 1, 10, tiles=3)


def test_side_stream_setting():
    """Launches go side by side on two streams only on CUDA and, under "auto", only in a forward that builds no
    autograd graph, from CONCURRENT_ABOVE_PULSES pulses; True / False force it; anything else is an error."""
    many = dom_fused.CONCURRENT_ABOVE_PULSES
    assert dom_fused._concurrency("auto", many, autograd=False)
    assert not dom_fused._concurrency("auto", many - 1, autograd=False)
    assert not dom_fused._concurrency("auto", 10 * many, autograd=True)
    assert dom_fused._concurrency(True, 10, autograd=True) and not dom_fused._concurrency(False, many, autograd=False)
    cpu = torch.empty(many, 1, 16)
    assert not dom_fused._side_stream("auto", cpu, False) and not dom_fused._side_stream(True, cpu, False)
    with pytest.raises(ValueError, match="concurrent"):
        dom_fused._concurrency("yes", 10, autograd=False)


def test_spec_refuses_cpu():
    spec = get_backend("dom_fused")
    with pytest.raises(UnsupportedError, match="dom_fused"):
        spec.check("cpu", torch.float32, "forward")
    with pytest.raises(UnsupportedError, match="dom_fused"):
        spec.check("cuda", torch.float64, "forward")


def test_auto_backend_matches_reference():
    """auto picks dom_fused on CUDA and padded on CPU; either way it must agree with the reference."""
    from iceaggr_lib.backends.auto import choose
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = batch_from_dom_sizes(icecube_like_sizes(200, seed=4, max_size=40)).to(device)
    q, k, v = random_qkv(batch.n_pulses, 8, 16, device=device, seed=4)
    out = dom_attention(q, k, v, batch, backend="auto", mode="forward_backward")
    ref = dom_attention(q, k, v, batch, backend="reference")
    assert rel_err(out, ref) <= TOLERANCE[torch.float32]
    expected = "dom_fused" if device == "cuda" and dom_fused.HAVE_TRITON else "padded"
    assert choose(device, torch.float32, 16) == expected
    assert choose("cuda", torch.float64, 16) == "padded"


def test_pad_to_bucket_keeps_the_batch_and_adds_one_pulse_doms():
    from iceaggr_lib.graphs import bucket_for, pad_to_bucket
    batch = batch_from_dom_sizes(icecube_like_sizes(300, seed=6, max_size=30), seed=6)
    n_bucket = bucket_for(batch.n_pulses)
    assert n_bucket >= batch.n_pulses and n_bucket & (n_bucket - 1) == 0
    feats, cu, dom, counts = pad_to_bucket(batch, n_bucket)
    n, d = batch.n_pulses, batch.n_doms
    assert torch.equal(feats[:n], batch.pulse_features) and not feats[n:].any()
    assert torch.equal(cu[:d + 1], batch.cu_seqlens) and int(cu[-1]) == n_bucket
    assert torch.equal(torch.diff(cu.long()), counts)  # cu_seqlens and counts agree everywhere
    assert torch.equal(dom, torch.repeat_interleave(torch.arange(n_bucket), counts))  # rows map to their DOMs
    assert (counts[d:d + n_bucket - n] == 1).all() and not counts[d + n_bucket - n:].any()
    with pytest.raises(ValueError, match="bucket"):
        pad_to_bucket(batch, n_bucket // 4)


def test_bucket_for_steps():
    from iceaggr_lib.graphs import bucket_for
    assert [bucket_for(n) for n in (1, 256, 257, 1030, 2049)] == [256, 256, 512, 2048, 4096]
    quarter = [bucket_for(n, 256, 4) for n in (1, 256, 257, 1024, 1025, 1030, 1281, 1792, 1793, 2049)]
    assert quarter == [256, 256, 320, 1024, 1280, 1280, 1536, 1792, 2048, 2560]
    for n in range(1, 5000, 7):  # never below n, never more than 1 / s of padding above the minimum
        for s in (1, 2, 4, 8):
            b = bucket_for(n, 64, s)
            assert max(n, 64) <= b <= max(n, 64) * (1 + 1 / s) + 1
    with pytest.raises(ValueError, match="steps_per_octave"):
        bucket_for(100, 256, 3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps,fused", [(1, False), (4, True)])
def test_graphed_forward_matches_eager(dtype, steps, fused):
    from iceaggr_lib.graphs import GraphedDomForward
    from iceaggr_lib.model import DOMAggregator
    torch.manual_seed(0)
    model = DOMAggregator(n_heads=8, backend="dom_fused").to("cuda", dtype)
    graphed = GraphedDomForward(model, steps_per_octave=steps, fused_projection=fused)
    assert graphed.fused_projection is fused
    for seed in (1, 2):  # two batches of one bucket: the second replays the captured graph
        batch = batch_from_dom_sizes(icecube_like_sizes(700, seed=seed, max_size=30), seed=seed)
        with torch.no_grad():
            out = graphed(batch).clone()
            ref = model(batch.to("cuda"))
        assert out.shape == ref.shape and rel_err(out, ref) <= TOLERANCE[dtype]
    assert graphed.captures == 1
