"""How fast events become DomBatches: ``python -m iceaggr_lib.collate_bench [--data DIR] [--events N]``.

Three paths, each reported as pulses per second (median over ``--repeats`` passes, with min-max):

(a) ``table``: ``PulseTable.batch`` over a whole already-loaded, sorted batch file (its one-off
    ``precompute`` of features done before timing) - the collate proper, per batch size;
(b) ``parquet``: the whole path from files to batches: a fresh ``KaggleDataset`` (meta read), the batch
    file read with pyarrow, checked, sorted by (event, sensor, time), features precomputed, then every
    batch built; the load (read to precompute) alone is reported too;
(c) ``events``: the general ``collate_events`` on lists of event dicts (as a DataLoader would hand them
    over; building the dicts is not timed).

Without ``--data`` it writes the generated sample (``--events`` events, one file) to a temporary
directory first. Timings are wall clock (``time.perf_counter``) on the CPU, in one process.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from iceaggr_lib.collate import collate_events
from iceaggr_lib.data.kaggle import KaggleDataset
from iceaggr_lib.data.sample import write_dataset


def _rate(pulses: int, seconds: list[float]) -> dict:
    rates = [pulses / s for s in seconds]
    return {"pulses": pulses, "median": float(np.median(rates)), "min": float(min(rates)), "max": float(max(rates))}


def bench_table(ds: KaggleDataset, batch_size: int, repeats: int) -> dict:
    """(a) PulseTable.batch over the first file, already loaded (features precomputed, not timed here)."""
    table = ds.table(ds.batch_ids[0])
    table.precompute()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for e0 in range(0, table.n_events, batch_size):
            table.batch(e0, min(e0 + batch_size, table.n_events))
        times.append(time.perf_counter() - t0)
    return _rate(table.n_pulses, times)


def bench_parquet(data_dir: Path, batch_size: int, repeats: int) -> dict:
    """(b) files -> batches with a fresh reader each pass; also the load (read, check, sort, precompute) alone."""
    times, loads, pulses = [], [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        ds = KaggleDataset(data_dir, cache_files=1)
        pulses = 0
        for f, b in enumerate(ds.batch_ids):
            t1 = time.perf_counter()
            table = ds.table(b)
            table.precompute()
            loads.append(time.perf_counter() - t1)
            for e0 in range(0, table.n_events, batch_size):
                pulses += table.batch(e0, min(e0 + batch_size, table.n_events)).n_pulses
        times.append(time.perf_counter() - t0)
    out = _rate(pulses, times)
    out["load_median_s"] = float(np.median(loads))
    return out


def bench_events(ds: KaggleDataset, batch_size: int, repeats: int, max_events: int) -> dict:
    """(c) collate_events on lists of event dicts."""
    n = min(max_events, ds.n_events)
    events = [ds[i] for i in range(n)]
    pulses = sum(len(e["sensor_id"]) for e in events)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for e0 in range(0, n, batch_size):
            collate_events(events[e0:e0 + batch_size])
        times.append(time.perf_counter() - t0)
    return _rate(pulses, times)


def run(data_dir: Path, batch_sizes: list[int], repeats: int, event_dicts: int) -> list[dict]:
    ds = KaggleDataset(data_dir)
    rows = []
    for bs in batch_sizes:
        rows.append({"path": "table", "batch_events": bs, **bench_table(ds, bs, repeats)})
    for bs in batch_sizes:
        rows.append({"path": "parquet", "batch_events": bs, **bench_parquet(data_dir, bs, max(1, repeats // 2))})
    for bs in batch_sizes:
        rows.append({"path": "events", "batch_events": bs, **bench_events(ds, bs, repeats, event_dicts)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pulses/s of the collate and of the parquet -> DomBatch path")
    parser.add_argument("--data", type=Path, help="a Kaggle-layout directory (default: generate the sample)")
    parser.add_argument("--events", type=int, default=20_000, help="events of the generated sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 128, 1024, 4096], help="events per batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--event-dicts", type=int, default=4096, help="events used for the collate_events path")
    args = parser.parse_args(argv)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"numpy {np.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data
        if data_dir is None:
            t0 = time.perf_counter()
            data_dir = write_dataset(Path(tmp) / "sample", args.events, seed=args.seed, events_per_file=args.events)
            print(f"generated sample: {args.events} events, seed {args.seed}, in {time.perf_counter() - t0:.1f} s")
        rows = run(data_dir, args.batch_sizes, args.repeats, args.event_dicts)
    print(f"{'path':8s} {'events/batch':>12s} {'pulses':>10s} {'M pulses/s (median)':>20s} {'min-max':>14s}")
    for r in rows:
        extra = f"   (file load+sort {r['load_median_s']:.2f} s)" if "load_median_s" in r else ""
        print(f"{r['path']:8s} {r['batch_events']:12d} {r['pulses']:10d} {r['median'] / 1e6:20.1f} "
              f"{r['min'] / 1e6:6.1f}-{r['max'] / 1e6:<6.1f}{extra}")


if __name__ == "__main__":
    main()
