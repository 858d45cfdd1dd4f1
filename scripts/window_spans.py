"""How many of dom_fused's tile windows fit a narrow (T x T) tile? The numbers behind ``narrow`` (CPU only).

    PYTHONPATH=$PWD python3 scripts/window_spans.py [--events 1024 4096] [--levels 0:16 16:32 16:64]

For each batch of the sample generator (``generate_table(max events, seed=0).batch(0, events)``, the batches
of ``scripts/bench_dom_fused.py``) and each tile level LO:T (DOMs of LO < n <= T pulses, windows of T rows, a
DOM owned by the window its first row is in), it counts the windows with work (an owned multi-pulse DOM of
the level; at LO > 0 any owned DOM of the level), those whose owned rows of the level span at most T rows
(``dom_fused._narrow_start``: a T x T tile from the first owned row holds them all), and those whose
multi-pulse DOMs alone span at most T rows (what a variant that copies one-pulse DOMs apart would reach):
``iceaggr_lib.backends.dom_fused.window_spans``.
"""

from __future__ import annotations

import argparse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--levels", nargs="+", default=["0:16", "16:32", "16:64"], help="LO:T tile levels")
    args = ap.parse_args()
    from iceaggr_lib.backends.dom_fused import window_spans
    from iceaggr_lib.data.sample import generate_table

    table = generate_table(max(args.events), seed=0)
    print(f"{'events':>6} {'level':>8} {'windows':>8} {'with work':>10} {'fit T rows':>14} {'multi fit':>14}")
    for events in args.events:
        counts = table.batch(0, events).dom_pulse_counts.numpy()
        for level in args.levels:
            lo, t = (int(x) for x in level.split(":"))
            r = window_spans(counts, lo, t)
            w = max(r["with_work"], 1)
            print(f"{events:>6} {f'{lo}<n<={t}':>8} {r['windows']:>8} {r['with_work']:>10} "
                  f"{r['fit_narrow']:>7} ({r['fit_narrow'] / w:4.0%}) {r['multi_fit_narrow']:>7} "
                  f"({r['multi_fit_narrow'] / w:4.0%})")


if __name__ == "__main__":
    main()
