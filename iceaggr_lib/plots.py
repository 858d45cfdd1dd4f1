"""The figures the notebooks show: data sparsity, and benchmark time, throughput, speedup and memory.

Every function returns a matplotlib Figure and draws nothing else; ``save(fig, out_dir, name)``
writes it as ``<out_dir>/figures/<name>.png``. Benchmark plots take the DataFrame of
``iceaggr_lib.results.with_derived`` (the CSV plus floor_ms and pulses_per_s) and draw one panel per
(mode, dtype, heads) with one line per backend against batch size, on log axes.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

BACKEND_COLORS = {
    "loop": "#7f7f7f", "padded": "#1f77b4", "flex_dense": "#ff7f0e", "flex_dense_eager": "#ffbb78",
    "flex_block": "#2ca02c", "varlen": "#9467bd", "dom_fused": "#d62728", "auto": "#e377c2",
    "reference": "#17becf",
}
_EXTRA_COLORS = ["#8c564b", "#bcbd22", "#17becf", "#aec7e8", "#98df8a", "#c5b0d5"]


def backend_color(name: str) -> str:
    if name in BACKEND_COLORS:
        return BACKEND_COLORS[name]
    return _EXTRA_COLORS[sum(map(ord, name)) % len(_EXTRA_COLORS)]


def save(fig, out_dir: str | Path, name: str, dpi: int = 120) -> Path:
    """Write ``fig`` to ``<out_dir>/figures/<name>.png`` and return the path."""
    path = Path(out_dir) / "figures" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------------------
# sparsity


def hist_log(values, title: str, xlabel: str, integer: bool = True, log_y: bool = True, ax=None):
    """Histogram for heavy tails: log-spaced bins, log x, optionally log y.

    Counts (``integer``): bins hold whole numbers (edges at k + 0.5) and the height is the count per
    integer value in the bin, so the first bins (one value each) and the wide tail bins compare
    fairly. Continuous values: equal bins in log x, the height is the count in the bin.
    """
    values = np.asarray(values, dtype=np.float64)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    positive = values[values > 0]
    if len(positive) == 0:
        ax.text(0.5, 0.5, "no positive values", ha="center", transform=ax.transAxes)
        ylabel = "count"
    else:
        lo, hi = positive.min(), positive.max()
        if integer:
            edges = np.unique(np.floor(np.geomspace(max(lo, 1), hi + 1, 60))) - 0.5
            edges = np.append(edges, hi + 0.5) if edges[-1] < hi + 0.5 else edges
            counts = np.histogram(positive, bins=edges)[0] / np.diff(edges)
            ylabel = "count per integer value"
        else:
            edges = np.geomspace(lo, hi * 1.0001, 60) if hi > lo else np.array([lo * 0.9, hi * 1.1])
            counts = np.histogram(positive, bins=edges)[0].astype(np.float64)
            ylabel = "count per log bin"
        ax.stairs(counts, edges, fill=True, color="#1f77b4", alpha=0.85)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        med = np.median(values)
        ax.axvline(max(med, lo), color="k", ls="--", lw=1, label=f"median {med:g}")
        ax.legend(loc="upper right")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    return fig if fig is not None else ax.figure


def sparsity_figures(stats) -> dict:
    """Histograms of a ``DomStats``: name -> Figure (names are the PNG file names)."""
    multi = stats.pulses_per_dom > 1
    return {
        "pulses_per_dom": hist_log(stats.pulses_per_dom, "Pulses per DOM", "pulses in one DOM of one event"),
        "doms_per_event": hist_log(stats.doms_per_event, "DOMs per event", "DOMs hit in one event"),
        "pulses_per_event": hist_log(stats.pulses_per_event, "Pulses per event", "pulses in one event"),
        "charge_per_dom": hist_log(stats.charge_per_dom, "Charge per DOM", "total charge in one DOM [p.e.]",
                                   integer=False),
        "time_span_per_dom": hist_log(stats.time_span_per_dom[multi], "Time span per DOM (DOMs with >= 2 pulses)",
                                      "last minus first pulse time [ns]", integer=False),
    }


def attention_work_figure(work: pd.DataFrame):
    """Left: score pairs per batch (dense N², padded D·max², per-DOM Σn²); right: padding waste."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    b = work["batch_size"]
    for col, label, color in [("dense_pairs", "dense N² (flex without BlockMask)", backend_color("flex_dense")),
                              ("padded_pairs", "padded n_doms·max² (padded SDPA)", backend_color("padded")),
                              ("dom_pairs", "block-diagonal Σ n_d² (the least)", backend_color("dom_fused"))]:
        ax1.plot(b, work[col], "o-", label=label, color=color)
    ax1.plot(b, work["pulses"], "k:", label="N (one pair per pulse)")
    _batch_axis(ax1, b)
    ax1.set_yscale("log")
    ax1.set_ylabel("attention score pairs per batch (mean)")
    ax1.set_title("Attention work per batch")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3, which="both")
    ax2.plot(b, 100 * work["padded_slot_waste"], "o-", label="padding slots in the (D, max) tensor")
    ax2.plot(b, 100 * work["padded_pair_waste"], "s-", label="masked pairs in D·max² scores")
    _batch_axis(ax2, b)
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("waste [%]")
    ax2.set_title("Padding waste of padded attention")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# benchmark


def _panels(df: pd.DataFrame):
    """(mode, dtype, n_heads) groups present in ``df``, in a stable order."""
    keys = {(m, d, int(h)) for m, d, h in df[["mode", "dtype", "n_heads"]].itertuples(index=False)}
    return sorted(keys, key=lambda k: (k[0] != "forward", k[0], k[1], k[2]))


def _grid(n: int, ncols: int = 4):
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def _finish(fig, title: str):
    """One legend for the whole grid, right of the panels (every panel's labels, each once, in first-seen order), so
    that no legend covers the curves; then the title and the layout."""
    entries = {}
    for ax in fig.axes:
        if ax.get_visible():
            for handle, label in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(label, handle)
    fig.suptitle(title)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="center right", fontsize=8, frameon=False)
        width = max(len(label) for label in entries) * 0.06 + 0.6  # inches the legend needs, about
        fig.tight_layout(rect=(0, 0, 1 - width / fig.get_figwidth(), 1))
    else:
        fig.tight_layout()
    return fig


def _by_backend(panel: pd.DataFrame):
    for backend, g in panel.groupby("backend", sort=False):
        yield backend, g.sort_values("batch_size")


def _batch_axis(ax, sizes) -> None:
    """Log2 x axis labelled with the batch sizes themselves (4, 16, 1024, not 2^k)."""
    sizes = sorted({int(x) for x in sizes})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s:,}" for s in sizes], fontsize=8)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("batch size [events]")


def _empty(title: str, text: str):
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    ax.set_title(title)
    return fig


def time_vs_batch(df: pd.DataFrame, floor: bool = True):
    """Median time (p20-p80 bars) vs batch size per backend, log-log; the memory floor dashed; where rows have
    ``batch_mean_ms`` (the mean over the rotated batches of each batch's median call), that time as crosses."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return _empty("Time per batch", "no successful rows")
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, (mode, dtype, heads) in zip(axes, panels):
        panel = ok[(ok["mode"] == mode) & (ok["dtype"] == dtype) & (ok["n_heads"] == heads)]
        for backend, g in _by_backend(panel):
            yerr = np.vstack([g["median_ms"] - g["p20_ms"], g["p80_ms"] - g["median_ms"]]).clip(min=0)
            ax.errorbar(g["batch_size"], g["median_ms"], yerr=yerr, fmt="o-", ms=4, capsize=2,
                        color=backend_color(backend), label=backend)
            if "batch_mean_ms" in g and g["batch_mean_ms"].notna().any():
                ax.plot(g["batch_size"], g["batch_mean_ms"], "x", ms=6, color=backend_color(backend))
        if "batch_mean_ms" in panel and panel["batch_mean_ms"].notna().any():
            ax.plot([], [], "kx", label="mean of per-batch medians")
        if floor and "floor_ms" in panel and panel["floor_ms"].notna().any():
            fl = panel.groupby("batch_size")["floor_ms"].median()
            ax.plot(fl.index, fl.values, "k--", lw=1.2, label="memory floor")
        _batch_axis(ax, panel["batch_size"])
        ax.set_yscale("log")
        ax.set_title(f"{mode}, {dtype}, {heads} head(s)", fontsize=10)
        ax.set_ylabel("time per batch [ms]")
        ax.grid(alpha=0.3, which="both")
    return _finish(fig, "Attention + mean pool per batch (median, p20-p80), preparation included; "
                   "memory floor at the measured copy rate")


def throughput_vs_batch(df: pd.DataFrame):
    """Pulses per second vs batch size per backend, log-log."""
    ok = df[df["status"] == "ok"]
    if ok.empty:
        return _empty("Throughput", "no successful rows")
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, (mode, dtype, heads) in zip(axes, panels):
        panel = ok[(ok["mode"] == mode) & (ok["dtype"] == dtype) & (ok["n_heads"] == heads)]
        for backend, g in _by_backend(panel):
            ax.plot(g["batch_size"], g["pulses_per_s"], "o-", ms=4, color=backend_color(backend), label=backend)
        _batch_axis(ax, panel["batch_size"])
        ax.set_yscale("log")
        ax.set_title(f"{mode}, {dtype}, {heads} head(s)", fontsize=10)
        ax.set_ylabel("pulses / s")
        ax.grid(alpha=0.3, which="both")
    return _finish(fig, "Throughput (pulses per second through attention + pool)")


def speedup_vs(table: pd.DataFrame, baseline: str):
    """Speedup over ``baseline`` (table from ``results.speedups``) vs batch size; 1 drawn as a line."""
    if table.empty:
        return _empty(f"Speedup vs {baseline}", f"no rows to compare with '{baseline}'")
    panels = _panels(table)
    fig, axes = _grid(len(panels))
    for ax, (mode, dtype, heads) in zip(axes, panels):
        panel = table[(table["mode"] == mode) & (table["dtype"] == dtype) & (table["n_heads"] == heads)]
        for backend, g in _by_backend(panel):
            ax.plot(g["batch_size"], g["speedup"], "o-", ms=4, color=backend_color(backend), label=backend)
        ax.axhline(1.0, color="k", lw=1)
        _batch_axis(ax, panel["batch_size"])
        ax.set_yscale("log")
        ax.set_title(f"{mode}, {dtype}, {heads} head(s)", fontsize=10)
        ax.set_ylabel(f"speedup vs {baseline} (x)")
        ax.grid(alpha=0.3, which="both")
    return _finish(fig, f"Speedup over {baseline} (ratio of times per batch at the same batch size)")


def memory_vs_batch(df: pd.DataFrame):
    """Peak memory above the inputs vs batch size (GPU runs; the CPU does not measure it)."""
    ok = df[(df["status"] == "ok") & df["peak_mem_mb"].notna()]
    if ok.empty:
        return _empty("Peak memory", "peak memory not measured (CPU run: NaN by design)")
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    for ax, (mode, dtype, heads) in zip(axes, panels):
        panel = ok[(ok["mode"] == mode) & (ok["dtype"] == dtype) & (ok["n_heads"] == heads)]
        for backend, g in _by_backend(panel):
            ax.plot(g["batch_size"], g["peak_mem_mb"].clip(lower=1e-3), "o-", ms=4,
                    color=backend_color(backend), label=backend)
        if "io_mb" in panel:
            io = panel.groupby("batch_size")["io_mb"].median()
            ax.plot(io.index, io.values, "k--", lw=1.2, label="inputs + outputs")
        _batch_axis(ax, panel["batch_size"])
        ax.set_yscale("log")
        ax.set_title(f"{mode}, {dtype}, {heads} head(s)", fontsize=10)
        ax.set_ylabel("peak memory above inputs [MB]")
        ax.grid(alpha=0.3, which="both")
    return _finish(fig, "Peak device memory of one step, above the resident inputs")
