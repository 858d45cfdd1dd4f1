"""How far one host-bound grid point moves between timing series, and what moves with it (a GPU script).

    PYTHONPATH=$PWD python3 scripts/series_spread.py --data-dir data/sample --out $OUT [--rounds 30]

The grid reads each point from one series of 20 calls (``bench.time_calls_and_host``: L2 flushed, CUDA
events, no host synchronisation inside the series). At host-bound points the same step read up to 2x apart
between consecutive series of one process (docs/dom_fused_notes.md, run 121). This script repeats such series
in rounds and logs, beside each series' median, what could explain it:

* ``host_ms``: the host's time per call while issuing the series (where it nears the median, the host bounds it);
* ``cpu_probe_ms``: a fixed pure-Python loop timed just before the series (the host's speed, free of CUDA);
* ``flush_ms``: the GPU time of the harness's 256 MB L2 flush (the GPU's memory speed);
* ``sm_mhz``: the SM clock read through NVML before the series;
* ``b0_ms`` .. ``b3_ms``: the series' median per rotated batch (at 1,024 events batch 1 holds 180k pulses, the
  others 118-136k: run 119 saw one batch read 0.14 ms where the others read 0.075-0.089).

Variants, each on the grid's own step (``bench._make_step`` over the grid's four rotated batches of consecutive
events of the embedded sample, bf16 1x128): the 1,024-event forward launched eagerly (the v22 default at
141k pulses) and replayed from ``dom_graphs``' graphs (the v23 default); the 16-event forward both ways; the
1,024-event forward + backward (graphed, the default). Each round first runs a heavy row (``padded``'s 1,024-event
forward, as the grid runs before dom_fused). Before timing, each variant's first call (batch 0) is checked
against the float64 reference (``bench._reference``; bf16 tolerance of ``iceaggr_lib.testing``); a variant over it
stops the script, named. Writes to ``--out``: ``environment.json`` (device, versions, numeric settings, this script's arguments),
``checks.csv`` (each variant's rel err) and ``series.csv``, a row per series appended as it is measured; then prints
per-variant quantiles and the correlation of each variant's medians with the host columns.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from iceaggr_lib import bench, envinfo
from iceaggr_lib.backends import dom_fused, get_backend
from iceaggr_lib.testing import TOLERANCE, rel_err


def cpu_probe_ms() -> float:
    """A fixed amount of pure-Python work (no CUDA), best of 3: the host's speed right now."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        acc = 0
        for i in range(20_000):
            acc += i & 7
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def flush_ms(device) -> float:
    """The GPU time of one L2 flush of the harness (``bench.l2_flush_buffer``)."""
    flush = bench.l2_flush_buffer(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    flush.zero_()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end)


def sm_mhz(device) -> float:
    try:
        return float(torch.cuda.clock_rate(device))
    except Exception:  # noqa: BLE001 - NVML missing: the column stays empty
        return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="data/sample")
    ap.add_argument("--out", default=".")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20, help="calls per series (the grid's repeats)")
    args = ap.parse_args(argv)
    if args.calls % 4:
        ap.error("--calls must be a multiple of 4 (the four rotated batches; b0_ms .. b3_ms)")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (dom_fused is a Triton backend): run it on the H100 through the device tool")

    device = torch.device("cuda")
    bench.apply_settings()
    out_dir = Path(args.out)
    envinfo.write(out_dir / "environment.json", envinfo.collect(device, measure_bandwidth=False, extra=dict(
        script="scripts/series_spread.py", data_dir=str(args.data_dir), rounds=args.rounds, calls=args.calls)))
    source = bench.open_dataset(args.data_dir)
    dtype, n_heads, head_dim = torch.bfloat16, 1, 128
    scale = head_dim ** -0.5
    spec, padded = get_backend("dom_fused"), get_backend("padded")
    inputs = {}
    for events in (16, 1024):
        batches = [b.to(device) for b in bench.consecutive_batches(source, events, 4)]
        inputs[events] = bench._make_inputs(batches, n_heads, head_dim, dtype, device, seed=events)

    default_threshold = dom_fused.INFERENCE_GRAPHS_BELOW_PULSES
    variants = [  # name, events, mode, inference graphs below this many pulses
        ("fwd1024_eager", 1024, "forward", 0),
        ("fwd1024_graphed", 1024, "forward", 1 << 40),
        ("fwd16_eager", 16, "forward", 0),
        ("fwd16_graphed", 16, "forward", default_threshold),
        ("fb1024_default", 1024, "forward_backward", default_threshold),
    ]
    steps = {name: bench._make_step(spec, inputs[ev], mode, scale, dtype) for name, ev, mode, _ in variants}
    heavy = bench._make_step(padded, inputs[1024], "forward", scale, dtype)

    def with_threshold(name, threshold, fn):
        dom_fused.INFERENCE_GRAPHS_BELOW_PULSES = threshold
        try:
            return fn()
        finally:
            dom_fused.INFERENCE_GRAPHS_BELOW_PULSES = default_threshold

    # correct first: each variant's first call (batch 0) against the float64 reference, then 7 warm-up calls
    # (compile, capture every bucket's graphs), so that every series starts at batch 0 (b0_ms .. b3_ms)
    checks = []
    for name, events, mode, threshold in variants:
        result = with_threshold(name, threshold, steps[name])
        ref = bench._reference(inputs[events], mode, scale)
        err = float("nan") if isinstance(ref, str) else max(rel_err(o, r) for o, r in zip(result, ref))
        checks.append(dict(variant=name, rel_err=err, tolerance=TOLERANCE[dtype],
                           ok=bool(err <= TOLERANCE[dtype]), message=ref if isinstance(ref, str) else ""))
        for _ in range(7):
            with_threshold(name, threshold, steps[name])
    torch.cuda.synchronize(device)
    pd.DataFrame(checks).to_csv(out_dir / "checks.csv", index=False)
    print(pd.DataFrame(checks).to_string(index=False))
    wrong = [c["variant"] for c in checks if not c["ok"]]
    if wrong:
        raise SystemExit(f"series_spread: {', '.join(wrong)} disagree with the float64 reference "
                         f"(see {out_dir / 'checks.csv'}); nothing timed")

    columns = ["round", "t_s", "variant", "events", "mode", "median_ms", "p20_ms", "p80_ms", "host_ms",
               "cpu_probe_ms", "flush_ms", "sm_mhz", "b0_ms", "b1_ms", "b2_ms", "b3_ms"]
    fh = open(out_dir / "series.csv", "w", newline="")
    writer = csv.DictWriter(fh, fieldnames=columns)
    writer.writeheader()
    rows = []
    t_start = time.perf_counter()
    for r in range(args.rounds):
        for _ in range(3):
            heavy()
        torch.cuda.synchronize(device)
        for name, events, mode, threshold in variants:
            probe, fl, mhz = cpu_probe_ms(), flush_ms(device), sm_mhz(device)
            times, host_ms = with_threshold(name, threshold, lambda: bench.time_calls_and_host(
                steps[name], device, args.calls, 0.1, 1.0))
            rows.append(dict(round=r, t_s=time.perf_counter() - t_start, variant=name, events=events, mode=mode,
                             median_ms=float(np.median(times)), p20_ms=float(np.quantile(times, 0.2)),
                             p80_ms=float(np.quantile(times, 0.8)), host_ms=host_ms, cpu_probe_ms=probe,
                             flush_ms=fl, sm_mhz=mhz,
                             **{f"b{i}_ms": float(np.median(times[i::4])) for i in range(4)}))
            writer.writerow(rows[-1])  # as measured: a crash or a call's time limit loses nothing before it
            fh.flush()
    fh.close()
    df = pd.DataFrame(rows)

    pd.set_option("display.width", 200)
    print(f"device {torch.cuda.get_device_name(device)}; torch {torch.__version__}; {args.rounds} rounds of "
          f"{args.calls}-call series; pulses per batch: "
          + ", ".join(f"{ev} events {np.mean([b.n_pulses for b in inputs[ev].batches]):.0f}" for ev in inputs))
    q = df.groupby("variant")[["median_ms", "host_ms", "cpu_probe_ms", "flush_ms", "sm_mhz"]].quantile(
        [0.0, 0.5, 1.0]).unstack()
    print(q.round(4).to_string())
    print("correlation of each series' median with (NaN: the column did not vary, e.g. a steady SM clock):")
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = {name: {col: g["median_ms"].corr(g[col]) for col in ("host_ms", "cpu_probe_ms", "flush_ms", "sm_mhz")}
                for name, g in df.groupby("variant")}
    print(pd.DataFrame(corr).T.round(2).to_string())
    print("medians per round (ms):")
    print(df.pivot(index="round", columns="variant", values="median_ms").round(4).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
