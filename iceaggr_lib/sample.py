"""Write the embedded sample in the Kaggle layout: ``python -m iceaggr_lib.sample --out DIR --events N --seed S``.

A thin command line over ``iceaggr_lib.data.sample.write_dataset`` (the generator and its calibration
are documented there). Prints the sample's statistics next to the real batch file's.
"""

from __future__ import annotations

import argparse
import time

from iceaggr_lib.data.kaggle import KaggleDataset
from iceaggr_lib.data.sample import sample_statistics, write_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the calibrated IceCube-like sample in the Kaggle layout.")
    parser.add_argument("--out", required=True, help="output directory (train_meta.parquet, train/, sensor_geometry.csv)")
    parser.add_argument("--events", type=int, default=20_000, help="number of events (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    parser.add_argument("--events-per-file", type=int, default=200_000, help="events per batch_<N>.parquet")
    parser.add_argument("--quiet", action="store_true", help="do not print the statistics")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    out = write_dataset(args.out, args.events, seed=args.seed, events_per_file=args.events_per_file)
    elapsed = time.perf_counter() - t0
    print(f"wrote {args.events} events (seed {args.seed}) to {out} in {elapsed:.1f} s")
    if not args.quiet:  # statistics of the first batch file (the whole sample at the default file size)
        path, table = next(KaggleDataset(out).iter_tables())
        print(f"statistics of {path} (targets: ../shared/data/kaggle_batch_statistics.md):")
        for key, value in sample_statistics(table).items():
            print(f"  {key:28s} {value:.4g}" if isinstance(value, float) else f"  {key:28s} {value}")


if __name__ == "__main__":
    main()
