"""Where the time of the 16-event layer forward replayed from a CUDA graph goes (issue 5's <= 25 µs target).

    PYTHONPATH=$PWD python3 scripts/profile_graph.py [--steps 1,4] [--configs '[{...}]'] [--events 16]

For each dtype (fp32, bf16), bucket spacing (``--steps``: ``GraphedDomForward``'s ``steps_per_octave``; 1 = powers
of two), projection (``--fused``: two cuBLAS GEMMs or ``fused_projection``'s one launch) and attention config (the
default first): the replay's time by ``triton.testing.do_bench`` (median, p10,
p90; each replay starts from a flushed L2, as in ``bench_dom_fused.py --graphs``), the wall time per replay in a
loop of 1,000 back-to-back replays, the rel error against the eager layer, and the GPU µs of each kernel of one
replay (the profiler's kernel records, warm L2, median of 20 replays), whose sum against the replay's time says
how much of it is gaps between the graph's kernels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch


def replay_times(graphed, staged, n_wall: int = 1000):
    """(ms, wall_ms) of ``graphed.replay(staged)``: every do_bench sample (each replay from a flushed L2), and the wall
    time per replay over ``n_wall`` back-to-back replays (host + device, as a user's loop sees it).
    ``bench_dom_fused.py --graphs`` times its graphs with this too."""
    import triton.testing
    ms = np.asarray(triton.testing.do_bench(lambda: graphed.replay(staged), warmup=50, rep=300, return_mode="all"))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_wall):
        graphed.replay(staged)
    torch.cuda.synchronize()
    return ms, (time.perf_counter() - t0) * 1e3 / n_wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="1,4", type=lambda x: [int(s) for s in x.split(",")])
    ap.add_argument("--configs", type=json.loads, default=[])
    ap.add_argument("--events", type=int, default=16)
    ap.add_argument("--fused", default="0,1", type=lambda x: [bool(int(f)) for f in x.split(",")],
                    help="GraphedDomForward's fused_projection values to run (0 = two cuBLAS GEMMs, 1 = one launch)")
    args = ap.parse_args()
    import triton.testing
    from host_dispatch import per_launch_us  # scripts/ is on sys.path when this runs as a script

    from iceaggr_lib.data.sample import generate_table
    from iceaggr_lib.graphs import GraphedDomForward
    from iceaggr_lib.model import DOMAggregator
    from iceaggr_lib.testing import rel_err

    batch = generate_table(args.events, seed=0).batch(0, args.events)
    print(f"{args.events} events: {batch!r}; torch {torch.__version__}, triton {triton.__version__}, "
          f"{torch.cuda.get_device_name()}, tf32 matmul {torch.backends.cuda.matmul.allow_tf32}", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = DOMAggregator(backend="dom_fused").to("cuda", dtype)
        with torch.no_grad():
            ref = model(batch.to("cuda"))
        for steps, fused, config in itertools.product(args.steps, args.fused, [{}] + args.configs):
            label = (f"{dtype} steps_per_octave={steps} fused_projection={fused} "
                     f"{json.dumps(config) if config else 'default'}")
            try:
                gf = GraphedDomForward(model, attention_config=config, steps_per_octave=steps,
                                       fused_projection=fused)
                staged = gf.stage(batch)
                with torch.no_grad():
                    err = rel_err(gf.replay(staged), ref)
                    ms, wall_ms = replay_times(gf, staged)
                    names, times = per_launch_us(lambda: gf.replay(staged), 20, ("",))
            except Exception as e:  # record, keep going
                print(f"{label}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            med = np.median(times, axis=0)
            kernels = ", ".join(f"{n[:40]} {t:.1f}" for n, t in zip(names, med))
            print(f"{label}: bucket {staged[0]} rows; replay {np.median(ms) * 1e3:.1f} us (p10 "
                  f"{np.percentile(ms, 10) * 1e3:.1f}, p90 {np.percentile(ms, 90) * 1e3:.1f}), wall {wall_ms * 1e3:.1f} "
                  f"us; rel err {err:.1e}; kernels (us, warm L2, median of 20; sum "
                  f"{np.median(times.sum(axis=1)):.1f}): {kernels}", flush=True)


if __name__ == "__main__":
    main()
