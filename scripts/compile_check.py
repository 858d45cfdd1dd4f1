"""Compile the dom_fused kernels for an H100 (sm_90) on a machine without a GPU, and report their resources.

    PYTHONPATH=$PWD python scripts/compile_check.py [--arch 90] [--out DIR]

Why: the GPU time of a session is scarce, and a Triton compile failure (a layout-pass error, a dot
below Triton's minimum size) costs a whole device call to discover. Triton compiles ahead of time
without a GPU: this script installs a stand-in driver that reports an sm_90 target, then runs the
real ``fused_forward`` / ``fused_backward`` of every launch plan (per dtype, 1x128 and 8x16, with and
without ``head_loop``) with ``warmup=True``, so each kernel is compiled with the same specialisation
the GPU would give it and never launched. Then the graphed training step's and inference forward's launches
(``dom_graphs``, the kernels with ``INDIRECT``) for bf16, fp16 and fp32 at 1x128, 2x64 and 8x16 (``--graphed-only``:
just those). For each compiled kernel it prints registers, spills and shared memory, read from ``ptxas -v`` on the
generated PTX (the ptxas bundled with Triton).

Needs triton (the version of the GPU image: 3.6) and a CPU torch. Exit status 1 if any plan fails.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch


def install_fake_driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class FakeCudaDriver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(FakeCudaDriver())


def force_warmup():
    """Make ``kernel[grid](...)`` compile only (JITFunction.run with warmup=True), and record what compiled."""
    from triton.runtime.jit import JITFunction

    compiled = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kwargs, kernel))
        return kernel

    JITFunction.run = run
    return compiled


def ptxas_resources(kernel, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return (f"regs {regs.group(1) if regs else '?'}, stack {stack.group(1) if stack else '?'} B, "
            f"spill st/ld {spill.group(1) + '/' + spill.group(2) if spill else '?'} B, "
            f"shared {kernel.metadata.shared} B")


def _report(name, way, compiled, args):
    for fn_name, kw, kernel in compiled:
        if fn_name.startswith(("_class", "_list_large", "_large")):  # dom_classes (size_classes): classify +
            # copy, the class tiles; with large_list the large DOMs' list and flash launch
            role, tiles = fn_name[1:].replace("_kernel", ""), f"classes={kw['NC']}"
        elif "PASS" in kw:  # _bwd_large_kernel: the DOMs above the tile levels, pass 1 or 2
            role, tiles = f"large{kw['PASS']}", f"n>{kw['T']},BL={kw['BL']}"
        elif "ROLE" in kw:
            role, tiles = {0: "merged", 1: "big", 2: "small", 3: "flash", 4: "big_tiles"}[kw["ROLE"]], f"T=({kw['T_SMALL']},{kw['T_BIG']})"
        else:  # dom_graphs' _fetch_args
            role, tiles = fn_name[1:], ""
        res = "" if args.no_ptxas else ptxas_resources(kernel, args.arch)
        print(f"{name} {way:<8} {role:<6} {tiles} warps {kw['num_warps']}: ok  {res}", flush=True)


def _failed(name, e) -> None:
    msg = str(e).strip().splitlines()
    print(f"{name} FAILED: {type(e).__name__}: {' | '.join(msg[:3])[:300]}", flush=True)


def graphed_plans(batch, compiled, args) -> int:
    """The launches of a graphed training step and inference forward (``dom_graphs``): the kernels with ``INDIRECT``
    (tensors and N read from the argument buffer) on the grids of a bucket of twice the batch's rows, for every dtype
    the backend takes and three head shapes, default plans (the concurrency, which needs streams, left out: same kernels). Returns
    the number of plans that failed."""
    from iceaggr_lib.backends import dom_fused, dom_graphs

    failures = 0  # (two buckets: the small one merges the forward's launches, the large one does not)
    idx = (batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts)
    n = batch.n_pulses
    for dtype, (heads, dh), bucket in itertools.product((torch.bfloat16, torch.float16, torch.float32),
                                                        ((1, 128), (2, 64), (8, 16)), (2 * n, 1 << 18)):
        name = f"{str(dtype).split('.')[-1]:<9}{heads}x{dh:<4} graphed bucket {bucket}"
        q = torch.randn(n, heads, dh).to(dtype)
        g = torch.randn(batch.n_doms, heads, dh).to(dtype)
        save = dtype == torch.float32  # (save_forward "auto")
        compiled.clear()
        try:
            cfg = dom_fused._graph_config(q, {}, bucket)
            if cfg is None:  # (size classes at this bucket: such steps launch eagerly)
                print(f"{name}: no graph (size classes), eager launches", flush=True)
                continue
            cfg = dict(cfg, concurrent=False, bwd_concurrent=False)
            buf = torch.zeros(dom_graphs.N_SLOTS, dtype=torch.int64)
            dom_graphs._FETCH((1,), (buf, buf, buf), dict(NS=dom_graphs.N_SLOTS, SEQ=dom_graphs.SEQ_SLOT), 1)
            out = torch.empty(batch.n_doms, heads, dh, dtype=dtype)
            saved = torch.empty(n, heads, dh + 2) if save else out
            t_fwd = dom_fused._forward(q, q, q, *idx, dh ** -0.5, True, save, cfg, out=out, saved=saved,
                                       indirect=(buf, bucket))[2]
            grads = torch.empty(3, n, heads, dh, dtype=dtype).unbind(0)
            dom_fused.fused_backward(g, q, q, q, *idx, dh ** -0.5, saved if save else None,
                                     t_fwd if save else dom_fused.NOT_SAVED, grads=grads,
                                     scratch=torch.empty(bucket, heads, 2), indirect=(buf, bucket), **cfg)
        except Exception as e:  # report and carry on with the other plans
            failures += 1
            _failed(f"{name} train", e)
            continue
        _report(name, "train", compiled, args)
        compiled.clear()
        try:  # the graphed inference forward: the inference plan at this bucket (graphs=True takes any size)
            cfg = dom_fused._graph_config(q, {}, bucket, autograd=False)
            if cfg is None:
                print(f"{name}: no inference graph (size classes), eager launches", flush=True)
                continue
            dom_fused._forward(q, q, q, *idx, dh ** -0.5, False, False, dict(cfg, concurrent=False), out=out,
                               saved=out, indirect=(buf, bucket))
        except Exception as e:
            failures += 1
            _failed(f"{name} infer", e)
            continue
        _report(name, "infer", compiled, args)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--no-ptxas", action="store_true", help="skip the register report")
    ap.add_argument("--graphed-only", action="store_true",
                    help="only the graphed training step's and inference forward's launches")
    args = ap.parse_args(argv)
    install_fake_driver(args.arch)
    compiled = force_warmup()
    from iceaggr_lib.backends import triton_launch
    triton_launch.ENABLED = False  # every launch through JITFunction.run (patched above to compile only)
    from iceaggr_lib.backends import dom_fused
    from iceaggr_lib.testing import batch_from_dom_sizes

    batch = batch_from_dom_sizes([1, 2, 3, 70, 1, 20], seed=0)
    failures = 0
    plans = []
    for dtype, (heads, dh), head_loop, merged, head_batch in itertools.product(
            (torch.bfloat16, torch.float32), ((1, 128), (8, 16)), (False, True), (False, True), (False, True)):
        if (head_loop and heads == 1) or (not merged and dtype == torch.float32 and heads == 1):  # fp32 1x128: merged
            continue
        if head_batch and not head_loop:  # the heads as a batch axis: a variant of the head loop
            continue
        name = (f"{str(dtype).split('.')[-1]:<9}{heads}x{dh:<4} head_loop={head_loop!s:<6}"
                f"{' head_batch' if head_batch else ''}{' merged' if merged else ''}")
        plans.append((name, dtype, heads, dh, dict(head_loop=head_loop, merged=merged, head_batch=head_batch)))
    for dtype, (heads, dh), level in itertools.product((torch.bfloat16, torch.float32), ((1, 128), (8, 16)), (0, 1)):
        # dom_classes: the default's "auto" takes T_big with several heads at >= 400k pulses, not reached here;
        # size_classes = T_big turns large_list on ("auto")
        levels = (16, 32) if heads > 1 or dtype == torch.float32 else (16, 64)
        top = levels[level]
        plans.append((f"{str(dtype).split('.')[-1]:<9}{heads}x{dh:<4} size_classes={top}", dtype, heads, dh,
                      dict(size_classes=top, levels=levels, merged=False)))
    # several heads' plan from 400k pulses (size classes of <= 16 pulses, the listed flash launch with query-block
    # pairs), with v24's loops without a running max and without (whichever the dtype's default is)
    for dtype, fixed in itertools.product((torch.bfloat16, torch.float32), (False, True)):
        plans.append((f"{str(dtype).split('.')[-1]:<9}8x16  listed flash_fixed_max={fixed}", dtype, 8, 16,
                      dict(size_classes=16, levels=(16, 32), merged=False, flash_fixed_max=fixed)))
    # the test suite's small tile levels (8 rows: below Triton's smallest dot for T x T tiles), every role
    small = dict(levels=(8, 16), bwd_levels=(8, 16), block=16)
    for extra in (dict(levels=(8,), bwd_levels=(8,), block=16), dict(small, merged=True), dict(small, merged=False),
                  dict(small, merged=False, split_flash=True, head_loop=True, head_batch=True)):
        plans.append((f"float32  4x16  tests' {extra}", torch.float32, 4, 16, extra))
    for name, dtype, heads, dh, cfg in plans if not args.graphed_only else ():
        q = torch.randn(batch.n_pulses, heads, dh).to(dtype)
        head_batch = cfg.get("head_batch", False)
        # "train": a training step's forward (it saves the large DOMs' O and log-sum-exp) and the backward that
        # reads them; "backward" alone recomputes them
        idx = (batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts)
        for way in ("forward", "train", "backward") if not head_batch else ("forward", "train"):
            compiled.clear()
            try:
                g = torch.randn(batch.n_doms, heads, dh).to(dtype)
                if way == "forward":
                    dom_fused.fused_forward(q, q, q, *idx, dh ** -0.5, **cfg)
                elif way == "train":
                    _, saved, t_fwd = dom_fused._forward(q, q, q, *idx, dh ** -0.5, True, True, cfg)
                    if not head_batch:  # (the backward has no batched-heads variant)
                        dom_fused.fused_backward(g, q, q, q, *idx, dh ** -0.5, saved, t_fwd, **cfg)
                else:
                    dom_fused.fused_backward(g, q, q, q, *idx, dh ** -0.5, **cfg)
            except Exception as e:  # report and carry on with the other plans
                failures += 1
                _failed(f"{name} {way:<8}", e)
                continue
            _report(name, way, compiled, args)
    failures += graphed_plans(batch, compiled, args)
    print(f"compile_check: {failures} plan(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
