"""How sparse IceCube events are, and what that sparsity means for attention within DOMs.

``DomStats`` holds per-event and per-DOM arrays of a data set (pulses per event, DOMs per event,
pulses per DOM, charge and time span per DOM), gathered file by file from ``PulseTable``s, so a
data set is streamed rather than held (only the small per-DOM arrays are kept). From it:

* ``summary(stats)``: the numbers of ``sparsity_summary.json`` (percentiles with numpy's default
  linear interpolation);
* ``percentile_table(stats)``: a table of percentiles per quantity;
* ``attention_work(stats, batch_sizes)``: for batches of b consecutive events, the attention work
  (score pairs) of the three ways to compute it: dense over the whole batch (N², what FlexAttention
  without a BlockMask evaluates), block-diagonal per DOM (Σ n_d², the least), and padded to the
  longest DOM (n_doms · max², what padded SDPA computes), and the padding waste.

Everything is vectorised over events and DOMs (``np.add.reduceat``, ``np.bincount``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from iceaggr_lib.collate import PulseTable


@dataclass
class DomStats:
    """Per-event and per-DOM arrays of a data set (events in file order, DOMs in event order)."""

    pulses_per_event: np.ndarray  # (E,) int64
    doms_per_event: np.ndarray  # (E,) int64
    pulses_per_dom: np.ndarray  # (D,) int32
    charge_per_dom: np.ndarray  # (D,) float32, total charge in p.e.
    time_span_per_dom: np.ndarray  # (D,) float32, last minus first pulse time in ns (0 for one pulse)

    @property
    def n_events(self) -> int:
        return int(self.pulses_per_event.shape[0])

    @property
    def n_doms(self) -> int:
        return int(self.pulses_per_dom.shape[0])

    @property
    def n_pulses(self) -> int:
        return int(self.pulses_per_event.sum())


def table_stats(table: PulseTable, max_events: int | None = None) -> DomStats:
    """The statistics of one PulseTable (its first ``max_events`` events when given)."""
    n_events = table.n_events if max_events is None else min(max_events, table.n_events)
    p1 = int(table.event_pulse_offsets[n_events])
    d1 = int(table.event_dom_offsets[n_events])
    dom_offsets = table.dom_pulse_offsets[:d1 + 1]
    starts, ends = dom_offsets[:-1], dom_offsets[1:]
    time = table.time[:p1]
    charge = table.charge[:p1]
    return DomStats(
        pulses_per_event=np.diff(table.event_pulse_offsets[:n_events + 1]).astype(np.int64),
        doms_per_event=np.diff(table.event_dom_offsets[:n_events + 1]).astype(np.int64),
        pulses_per_dom=(ends - starts).astype(np.int32),
        charge_per_dom=(np.add.reduceat(charge, starts) if d1 else np.zeros(0)).astype(np.float32),
        time_span_per_dom=(time[ends - 1] - time[starts]).astype(np.float32),
    )


def concat(parts: Iterable[DomStats]) -> DomStats:
    parts = list(parts)
    if not parts:
        raise ValueError("no events: nothing to compute statistics of")
    return DomStats(*(np.concatenate([getattr(p, f) for p in parts]) for f in DomStats.__dataclass_fields__))


def collect(tables: Iterable, max_events: int | None = None) -> DomStats:
    """Statistics streamed over PulseTables (or ``(path, PulseTable)`` pairs), up to ``max_events`` events."""
    parts, seen = [], 0
    for item in tables:
        table = item[1] if isinstance(item, tuple) else item
        remaining = None if max_events is None else max_events - seen
        if remaining is not None and remaining <= 0:
            break
        part = table_stats(table, remaining)
        parts.append(part)
        seen += part.n_events
    return concat(parts)


def dataset_stats(data_dir: str | Path, split: str = "train", max_events: int | None = None) -> DomStats:
    """Statistics of a Kaggle-layout data set, streamed file by file through ``KaggleDataset.iter_tables``."""
    from iceaggr_lib.data.kaggle import KaggleDataset

    ds = KaggleDataset(data_dir, split=split)
    return collect(ds.iter_tables(max_events=max_events), max_events)


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q))


def summary(stats: DomStats) -> dict:
    """The numbers written to ``sparsity_summary.json`` (keys fixed: the report and tests read them)."""
    ppe, dpe, ppd = stats.pulses_per_event, stats.doms_per_event, stats.pulses_per_dom
    return {
        "n_events": stats.n_events,
        "n_pulses": stats.n_pulses,
        "n_doms": stats.n_doms,
        "pulses_per_event": {"median": _pct(ppe, 50), "p90": _pct(ppe, 90), "p99": _pct(ppe, 99),
                             "max": int(ppe.max())},
        "doms_per_event": {"median": _pct(dpe, 50), "p90": _pct(dpe, 90), "p99": _pct(dpe, 99),
                           "max": int(dpe.max())},
        "pulses_per_dom": {"median": _pct(ppd, 50), "p75": _pct(ppd, 75), "p90": _pct(ppd, 90),
                           "p95": _pct(ppd, 95), "p99": _pct(ppd, 99), "p999": _pct(ppd, 99.9),
                           "max": int(ppd.max())},
        "singleton_dom_fraction": float(np.mean(ppd == 1)),
    }


PERCENTILES = (50, 75, 90, 95, 99, 99.9)


def percentile_table(stats: DomStats) -> pd.DataFrame:
    """Rows: quantities; columns: mean, percentiles, max. Time span over DOMs with >= 2 pulses."""
    multi = stats.pulses_per_dom > 1
    quantities = {
        "pulses per event": stats.pulses_per_event,
        "DOMs per event": stats.doms_per_event,
        "pulses per DOM": stats.pulses_per_dom,
        "charge per DOM [p.e.]": stats.charge_per_dom,
        "time span per DOM, >= 2 pulses [ns]": stats.time_span_per_dom[multi],
    }
    rows = []
    for name, values in quantities.items():
        row = {"quantity": name, "mean": float(np.mean(values)) if len(values) else np.nan}
        for q in PERCENTILES:
            row[f"p{q:g}"] = _pct(values, q) if len(values) else np.nan
        row["max"] = float(np.max(values)) if len(values) else np.nan
        rows.append(row)
    return pd.DataFrame(rows).set_index("quantity")


def event_size_classes(stats: DomStats) -> pd.Series:
    """Fraction of events with < 100, 100-1K, 1K-10K, 10K-100K, > 100K pulses (the real file's classes)."""
    edges = [0, 100, 1_000, 10_000, 100_000, np.inf]
    labels = ["< 100", "100-1K", "1K-10K", "10K-100K", "> 100K"]
    counts = np.histogram(stats.pulses_per_event, bins=edges)[0]
    return pd.Series(counts / max(stats.n_events, 1), index=labels, name="fraction of events")


def attention_work(stats: DomStats, batch_sizes: Iterable[int]) -> pd.DataFrame:
    """Attention work per batch of b consecutive events, averaged over all full batches.

    Columns: batch_size, n_batches, pulses (N), doms (D), max_dom_pulses (mean of the per-batch max),
    dense_pairs (N²), dom_pairs (Σ n_d²), padded_pairs (D · max²), dense_over_dom and
    padded_over_dom (how many times the least work each does), padded_slot_waste (the fraction of
    the padded (D, max) tensor that is padding) and padded_pair_waste (the fraction of padded score
    pairs that are masked out).
    """
    n_d = stats.pulses_per_dom.astype(np.float64)
    dom_event = np.repeat(np.arange(stats.n_events), stats.doms_per_event)
    event_dom_offsets = np.concatenate([[0], np.cumsum(stats.doms_per_event)])
    rows = []
    for b in sorted(set(int(x) for x in batch_sizes)):
        n_batches = stats.n_events // b
        if n_batches == 0:
            continue
        n_in = int(event_dom_offsets[n_batches * b])  # DOMs inside full batches
        batch_of_dom = dom_event[:n_in] // b
        pulses = np.bincount(batch_of_dom, weights=n_d[:n_in], minlength=n_batches)
        dom_pairs = np.bincount(batch_of_dom, weights=n_d[:n_in] ** 2, minlength=n_batches)
        doms = np.bincount(batch_of_dom, minlength=n_batches).astype(np.float64)
        max_d = np.maximum.reduceat(n_d[:n_in], event_dom_offsets[0:n_batches * b:b])
        dense = pulses ** 2
        padded = doms * max_d ** 2
        rows.append(dict(
            batch_size=b, n_batches=n_batches, pulses=pulses.mean(), doms=doms.mean(),
            max_dom_pulses=max_d.mean(), dense_pairs=dense.mean(), dom_pairs=dom_pairs.mean(),
            padded_pairs=padded.mean(), dense_over_dom=float(np.mean(dense / dom_pairs)),
            padded_over_dom=float(np.mean(padded / dom_pairs)),
            padded_slot_waste=float(np.mean(1 - pulses / (doms * max_d))),
            padded_pair_waste=float(np.mean(1 - dom_pairs / padded)),
        ))
    return pd.DataFrame(rows)


def write_summary(out_dir: str | Path, stats_summary: dict) -> Path:
    """Write ``<out_dir>/sparsity_summary.json``."""
    import json

    path = Path(out_dir) / "sparsity_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats_summary, indent=2) + "\n")
    return path


def headline(stats_summary: dict, work: pd.DataFrame) -> str:
    """A few sentences (markdown) on what the numbers mean for attention, computed from them."""
    s = stats_summary
    ppd = s["pulses_per_dom"]
    lines = [
        f"**{s['n_events']:,} events, {s['n_pulses']:,} pulses in {s['n_doms']:,} DOMs.** "
        f"The median DOM holds {ppd['median']:g} pulse(s); {100 * s['singleton_dom_fraction']:.1f} % of DOMs "
        f"hold exactly one, whose attention output is just its value vector. The p99 DOM holds "
        f"{ppd['p99']:g} pulses and the largest {ppd['max']:,}.",
    ]
    if not work.empty:
        big = work.iloc[-1]
        lines.append(
            f"At {int(big['batch_size']):,} events per batch (mean {big['pulses']:,.0f} pulses in {big['doms']:,.0f} "
            f"DOMs), dense attention over the batch evaluates {big['dense_over_dom']:,.0f}x the score pairs that "
            f"per-DOM attention needs (Σ n_d² = {big['dom_pairs']:,.0f}); padding every DOM to the longest "
            f"({big['max_dom_pulses']:.0f} pulses on average) evaluates {big['padded_over_dom']:,.0f}x, and "
            f"{100 * big['padded_slot_waste']:.1f} % of the padded tensor is padding.")
    return "\n\n".join(lines)
