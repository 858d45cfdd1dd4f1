"""How much of a dom_fused call is host dispatch? Host time per call, layer by layer, on a GPU.

    PYTHONPATH=$PWD python3 scripts/host_dispatch.py [--grid-csv DIR]

1. For a 4-event and a 1,024-event batch of the sample generator (bf16, 1x128 and 8x16) it times, with a
   host clock over 300 back-to-back calls and one synchronisation at the end, (a) the registry call the
   benchmark grid makes (``dom_attention``), (b) ``dom_fused_attention``, (c) ``fused_forward`` (the
   launches) through ``FastLaunch`` and (d) the same with ``triton_launch.ENABLED = False`` (Triton's own
   ``kernel[grid](...)``), each under ``torch.no_grad``; (e) the GPU time of the kernels alone, from
   ``torch.profiler`` (CUPTI kernel durations, which no host delay inflates), and (f) do_bench's median.
   When the host time per call exceeds the GPU time, a stream of such calls is host-bound.
2. ``--grid-csv DIR``: the workbook's own harness (``iceaggr_lib.bench.run_grid``, timed as the grid is)
   on the embedded sample for dom_fused, bf16 1x128, both modes: launches on two streams or one, and
   Triton's own launch path (``grid_ab``), one CSV per variant in DIR.
3. ``--launch-times``: the GPU time of each launch of one training step (``launch_times``); ``--points`` and
   ``--configs`` choose the batches and the dom_fused configs (default: a fixed list, each point with
   ``save_forward`` on and off).
4. ``--step-profile DIR``: where the grid's time of one forward + backward step goes (``step_profile``): for
   the grid's own step (``bench._make_step``) at 1,024 events, bf16 1x128, the host time per step, the GPU
   kernel time per step (profiler), the grid's median (``bench.time_calls``, L2 flushed) and, in DIR, the
   profiler's table of host ops by self CPU time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


POINT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_points(spec: str) -> list:
    """``--points`` of this script, ``profile_roles.py`` and ``bench_dom_fused.py``: "events:dtype:heads,..."
    (dtype bf16 or fp32, heads dividing the model width 128) -> [(events, dtype name, torch dtype, heads)];
    "" -> []. A malformed item raises ValueError naming it."""
    points = []
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        if (len(parts) != 3 or not parts[0].isdigit() or parts[1] not in POINT_DTYPES or not parts[2].isdigit()
                or int(parts[2]) == 0 or 128 % int(parts[2])):
            raise ValueError(f"--points: {item!r} is not events:dtype:heads (dtype bf16 or fp32, heads dividing "
                             f"128), in {spec!r}")
        points.append((int(parts[0]), parts[1], POINT_DTYPES[parts[1]], int(parts[2])))
    return points


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def kernel_us(fn, n=30):
    """Mean summed CUDA-kernel time per call (µs), from the profiler's device-side records."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    total = sum(e.device_time_total for e in prof.key_averages() if e.key.startswith(("_fwd_kernel", "_bwd_")))
    return total / n


def dispatch_table():
    import triton.testing

    from iceaggr_lib.backends import dom_attention, triton_launch
    from iceaggr_lib.backends.dom_fused import dom_fused_attention, fused_forward
    from iceaggr_lib.data.sample import generate_table
    from iceaggr_lib.testing import random_qkv

    table = generate_table(1024, seed=0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print(f"{'batch':>6} {'heads':>6} {'registry':>9} {'autograd':>9} {'fast':>7} {'plain':>7} {'kernels':>8} "
          f"{'do_bench':>9}  [µs per call, forward, bf16]")
    for events in (4, 1024):
        b = table.batch(0, events).to("cuda")
        for h in (1, 8):
            dh = 128 // h
            q, k, v = random_qkv(b.n_pulses, h, dh, dtype=torch.bfloat16, device="cuda")
            cu, dom, cnt = b.cu_seqlens, b.pulse_to_dom_idx, b.dom_pulse_counts
            launches = lambda: fused_forward(q, k, v, cu, dom, cnt, dh ** -0.5)
            calls = {
                "registry": lambda: dom_attention(q, k, v, b, backend="dom_fused"),
                "autograd": lambda: dom_fused_attention(q, k, v, cu, dom, cnt, dh ** -0.5),
                "fast": launches,
            }
            with torch.no_grad():
                res = {name: host_us(fn) for name, fn in calls.items()}
                triton_launch.ENABLED = False
                res["plain"] = host_us(launches)
                triton_launch.ENABLED = True
                res["kernels"] = kernel_us(launches)
                res["do_bench"] = triton.testing.do_bench(launches, warmup=25, rep=100, return_mode="median") * 1e3
            print(f"{events:>6} {h:>6} " + " ".join(f"{res[c]:>{w}.1f}" for c, w in (
                ("registry", 9), ("autograd", 9), ("fast", 7), ("plain", 7), ("kernels", 8), ("do_bench", 9))),
                flush=True)


DOM_FUSED_KERNELS = ("_fwd_kernel", "_bwd_", "_class", "_list_large", "_large_attend")  # dom_classes' included


def per_launch_us(call, n_calls=5, prefixes=DOM_FUSED_KERNELS):
    """(names, times): the GPU µs of each kernel launch of ``call()`` whose name starts with one of
    ``prefixes`` (default: every dom_fused kernel, dom_classes' included), as an (n_calls, launches per
    call) array, from the profiler's CUDA kernel records (CUPTI durations, which no host delay inflates); warm
    L2, the same inputs each call. ``scripts/profile_roles.py`` uses it too."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_calls):
            call()
        torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.elapsed_us()) for e in prof.events()
               if e.name.startswith(prefixes) and e.device_type.name == "CUDA"]
    if not kernels or len(kernels) % n_calls:
        raise RuntimeError(f"per_launch_us: {len(kernels)} kernel records for {n_calls} calls (prefixes {prefixes})")
    per_call = len(kernels) // n_calls
    names = [n for n, _ in kernels[:per_call]]
    return names, np.array([t for _, t in kernels]).reshape(n_calls, per_call)


def launch_times(configs=(), points_given=None):
    """GPU time of each launch of one call (forward, then forward + backward), in launch order, from the
    profiler's kernel records: shows which launch (small tiles, big tiles, large-DOM passes) bounds a call.
    ``configs``: dom_fused configs to run at every point besides the default; ``points_given``: ``parse_points``'s
    list of --points (default: the list below, each also with the other ``save_forward``)."""

    from iceaggr_lib.backends.dom_fused import dom_fused_attention
    from iceaggr_lib.data.sample import generate_table
    from iceaggr_lib.testing import batch_from_dom_sizes, random_qkv

    table = generate_table(4096, seed=0)
    points = [(4, torch.bfloat16, 1, {}), (1024, torch.bfloat16, 1, {}), (4096, torch.bfloat16, 1, {}),
              (1024, torch.float32, 1, {}), (1024, torch.bfloat16, 8, {}), (-1024, torch.bfloat16, 1, {}),
              (4096, torch.float32, 1, {}), (4096, torch.bfloat16, 8, {}), (4096, torch.float32, 8, {}),
              # fp32 runs its two tile roles in one launch by default: split them to see which costs
              (4096, torch.float32, 1, dict(merged=False, concurrent=False)),
              (4096, torch.float32, 8, dict(merged=False, concurrent=False))]
    if points_given is not None:
        points = [(events, dtype, h, {}) for events, _, dtype, h in points_given]
    if configs:
        points = [point[:3] + (dict(c),) for point in points for c in [{}] + list(configs)]
    else:  # each also with the other save_forward (the backward's pass 1 reads the forward's O / log-sum-exp or not)
        points = [p for point in points for p in (point, point[:3] + (dict(point[3], save_forward=point[1] != torch.float32),))]
    for events, dtype, h, config in points:
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        b = table.batch(0, abs(events))
        if events < 0:  # the same pulses with every DOM above 64 pulses cut into DOMs of <= 64: no large DOMs
            sizes = np.concatenate([[64] * (n // 64) + ([n % 64] if n % 64 else []) if n > 64 else [n]
                                    for n in b.dom_pulse_counts.tolist()]).astype(np.int64)
            b = batch_from_dom_sizes(sizes, seed=0)
        b = b.to("cuda")
        dh = 128 // h
        q, k, v = random_qkv(b.n_pulses, h, dh, dtype=dtype, device="cuda", requires_grad=True)
        g = torch.randn(b.n_doms, h, dh, device="cuda").to(dtype)
        call = lambda: torch.autograd.grad(dom_fused_attention(q, k, v, b.cu_seqlens, b.pulse_to_dom_idx,
                                                               b.dom_pulse_counts, **config), (q, k, v), g)
        try:
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            names, times = per_launch_us(call)
        except Exception as e:  # a config that does not compile or run: say so, go on with the next
            print(f"{events:>5} ev {str(dtype).split('.')[-1]:<8} {h}x{dh:<4} {config}: FAILED {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}", flush=True)
            continue
        names = [n.split("_kernel")[0].lstrip("_") for n in names]
        print(f"{events:>5} ev {str(dtype).split('.')[-1]:<8} {h}x{dh:<4} max DOM {b.max_dom_pulses:>3}{config or ''}: "
              + ", ".join(f"{n} {t:.1f}" for n, t in zip(names, np.median(times, axis=0)))
              + f"  (µs, median of 5; sum {np.median(times.sum(axis=1)):.1f})", flush=True)


def grid_ab(out_dir: Path):
    """The workbook's harness (timed as the grid is) on the embedded sample, bf16 1x128, dom_fused with its
    independent launches on two streams ("auto", the default), or all on one (``concurrent=False``), or only
    the backward's on one; then with Triton's own launch path instead of FastLaunch."""
    import functools

    from iceaggr_lib import bench
    from iceaggr_lib.backends import dom_fused, triton_launch
    from iceaggr_lib.report import ensure_sample

    dataset = bench.open_dataset(ensure_sample())
    cfg = bench.BenchConfig(backends=["dom_fused"], dtypes=["bfloat16"], batch_sizes=[16, 256, 1024, 4096],
                            n_heads=[1], repeats=40)
    out_dir.mkdir(parents=True, exist_ok=True)
    original = dom_fused.dom_fused_attention
    variants = {"default": {}, "one_stream": dict(concurrent=False, bwd_concurrent=False),
                "bwd_one_stream": dict(bwd_concurrent=False), "plain_launch": {}}
    for name, config in variants.items():
        dom_fused.dom_fused_attention = functools.partial(original, **config)
        triton_launch.ENABLED = name != "plain_launch"
        rows = bench.run_grid(dataset, cfg, out_dir / f"{name}.csv", progress=False)
        piv = rows.pivot_table(index=["batch_size"], columns="mode", values="median_ms")
        print(f"--- grid timing, {name} {config} (median ms)\n{piv.round(4).to_string()}", flush=True)
    dom_fused.dom_fused_attention = original
    triton_launch.ENABLED = True


class _NullAttention(torch.autograd.Function):
    """The harness's own floor: an autograd op with dom_fused's inputs and outputs that allocates its results
    (one forward output, three gradients, like dom_fused) and launches no kernel. Its step's host time is what
    the grid's step costs around any backend on this machine (autograd engine, allocation, the harness)."""

    @staticmethod
    def forward(ctx, q, k, v, n_doms):
        ctx.save_for_backward(q, k, v)
        return q.new_empty((n_doms, q.shape[1], q.shape[2]))

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _null_spec():
    import dataclasses

    from iceaggr_lib.backends import get_backend
    return dataclasses.replace(get_backend("dom_fused"), name="null",
                               attend=lambda q, k, v, b, prep, scale: _NullAttention.apply(q, k, v, b.n_doms))


def step_profile(out_dir: Path, events: int = 1024, configs=(), rounds: int = 1):
    """Grid step (forward + backward and forward) of dom_fused (default and ``configs``) and flex_block: host
    µs per step (enqueue loop, one sync at the end), GPU µs per step (profiler kernel sum, the L2 flush left
    out), the grid's median and its 20-80 % spread; when host > GPU, the grid measures the host. ``rounds``:
    the whole list again, to see how far repeats of one variant differ."""
    import functools

    from torch.profiler import ProfilerActivity, profile

    from iceaggr_lib import bench
    from iceaggr_lib.backends import dom_fused, get_backend
    from iceaggr_lib.report import ensure_sample

    out_dir.mkdir(parents=True, exist_ok=True)
    bench.apply_settings()
    dev = torch.device("cuda")
    batches = [b.to(dev) for b in bench.consecutive_batches(bench.open_dataset(ensure_sample()), events, 3)]
    inputs = bench._make_inputs(batches, 1, 128, torch.bfloat16, dev, seed=1)
    original = dom_fused.dom_fused_attention
    configs = [{k: tuple(v) if isinstance(v, list) else v for k, v in c.items()} for c in configs]
    variants = [("dom_fused", {})] + [("dom_fused", c) for c in configs] + [("null", {}), ("flex_block", {})]
    print(f"{'backend':<60}{'mode':<18}{'host':>8}{'gpu':>8}{'grid':>8}{'p20-p80':>14}  "
          f"[µs per step, {events} events bf16 1x128]")
    for backend, config in variants * rounds:
        dom_fused.dom_fused_attention = functools.partial(original, **config)
        for mode in ("forward", "forward_backward"):
            spec = _null_spec() if backend == "null" else get_backend(backend)
            step = bench._make_step(spec, inputs, mode, 128 ** -0.5, torch.bfloat16)
            for _ in range(6):
                step()
            host = host_us(step, n=60)
            step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            gpu = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type.name == "CUDA") / 10
            times = bench.time_calls(step, dev, 60, 1.0, 5.0) * 1e3
            grid, p20, p80 = np.median(times), np.quantile(times, 0.2), np.quantile(times, 0.8)
            name = f"{backend}{config or ''}"
            print(f"{name:<60}{mode:<18}{host:8.1f}{gpu:8.1f}{grid:8.1f}{p20:7.0f}-{p80:<6.0f}", flush=True)
            if backend == "dom_fused" and not config:
                table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
                (out_dir / f"profile_{mode}.txt").write_text(table)
            if backend == "dom_fused" and not config:
                # where the host's wall time goes, Python and C calls alike (cProfile's clock is wall time)
                import cProfile
                import io
                import pstats
                torch.cuda.synchronize()
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(50):
                    step()
                pr.disable()
                torch.cuda.synchronize()
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(40)
                (out_dir / f"cprofile_{mode}.txt").write_text(buf.getvalue())
    dom_fused.dom_fused_attention = original


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid-csv", type=Path, help="also run the harness A/B (streams, launch path) into this folder")
    ap.add_argument("--launch-times", action="store_true", help="only the GPU time of each launch of a call")
    ap.add_argument("--step-profile", type=Path, help="only the grid step's host / GPU time, profile tables into this folder")
    ap.add_argument("--configs", type=json.loads, default=[],
                    help="--step-profile, --launch-times: dom_fused configs to compare (JSON list)")
    ap.add_argument("--points", help='--launch-times: "events:dtype:heads,..." (dtype bf16 or fp32)')
    ap.add_argument("--events", type=int, default=1024, help="--step-profile: batch size in events")
    ap.add_argument("--rounds", type=int, default=1, help="--step-profile: times through the list")
    args = ap.parse_args()
    points = None
    if args.points is not None:
        try:
            points = parse_points(args.points)
        except ValueError as e:
            ap.error(str(e))
    if args.step_profile:
        return step_profile(args.step_profile, args.events, args.configs, args.rounds)
    if args.launch_times:
        return launch_times(args.configs, points)
    dispatch_table()
    if args.grid_csv:
        grid_ab(args.grid_csv)


if __name__ == "__main__":
    main()
