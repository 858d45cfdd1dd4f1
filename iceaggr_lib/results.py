"""Reading a benchmark run back: derived columns, speedups, winners per regime, the seed's table, summary.md.

Everything here is computed from ``benchmark.csv`` and ``environment.json`` of one run (see
``iceaggr_lib.bench``); the only numbers typed in are the seed's own published table, kept as data in
``SEED_TABLE`` and labelled as the seed's wherever it is shown.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from iceaggr_lib.bench import DTYPES, memory_floor_bytes, read_results
from iceaggr_lib.testing import TOLERANCE

GROUP = ["mode", "dtype", "n_heads", "batch_size"]

# The seed report's table (flexattention_benchmark_results.md, 2025-10-04), as published. Its times
# are of the whole DOMTransformer (embed, QKV, attention, pool), d_model 128, 1 head, dtype not
# stated (float32 by default), on the first 500 real training events, with compilation included.
SEED_TABLE = pd.DataFrame({
    "batch_size": [4, 8, 16],
    "total_pulses": [290, 763, 1305],
    "total_doms": [227, 502, 895],
    "max_pulses": [6, 27, 27],
    "loop_ms": [33.3, 73.7, 137.1],
    "padded_ms": [20.6, 23.0, 40.8],
    "flex_ms": [436.1, 55.1, 23.4],
})
SEED_SOURCE = ("the seed's published numbers (flexattention_benchmark_results.md, 2025-10-04): NVIDIA H100 96GB, "
               "real Kaggle events (first 500), whole DOMTransformer, d_model 128, 1 head, "
               "one timing per batch size with compilation included; 'flex' is flex_dense")


def load(results_dir) -> tuple[pd.DataFrame, dict]:
    """``benchmark.csv`` and ``environment.json`` of a run directory, or of several run directories.

    Several (a list) are parts of one grid run separately on the same kind of device (e.g. bf16 and
    fp32 in two device calls): their rows are concatenated, a grid point present twice is an error,
    and the environment is the first run's, with ``merged_from`` listing each part's device name,
    torch and triton versions, copy bandwidth, platform (the host), time of measurement and code (the digest of
    ``iceaggr_lib``'s sources, ``envinfo.source_digest``; None for parts measured before it). Each row keeps its
    part's measured copy bandwidth (``copy_bandwidth_gbps``), so that ``with_derived`` puts its memory floor at
    the bandwidth of the machine that ran it (the lent machines differ by ~1 %).
    """
    dirs = [Path(d) for d in ([results_dir] if isinstance(results_dir, (str, Path)) else results_dir)]
    frames, envs = [], []
    for d in dirs:
        csv_path, env_path = d / "benchmark.csv", d / "environment.json"
        for p in (csv_path, env_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} not found: run notebooks/02_benchmark.ipynb with out_dir={d}")
        frames.append(read_results(csv_path))
        envs.append(json.loads(env_path.read_text()))
        if len(dirs) > 1:
            frames[-1]["copy_bandwidth_gbps"] = envs[-1].get("copy_bandwidth_gbps")
    if len(dirs) == 1:
        return frames[0], envs[0]
    df = pd.concat(frames, ignore_index=True)
    key = ["backend", "dtype", "mode", "n_heads", "batch_size"]
    dup = df[df.duplicated(key, keep=False)]
    if not dup.empty:
        raise ValueError(f"grid points measured in more than one of {[str(d) for d in dirs]}: "
                         f"{dup[key].drop_duplicates().head().to_dict('records')}")
    env = dict(envs[0])
    env["merged_from"] = [dict(results_dir=str(d), device_name=e.get("device_name"),
                               torch_version=e.get("torch_version"), triton_version=e.get("triton_version"),
                               copy_bandwidth_gbps=e.get("copy_bandwidth_gbps"), platform=e.get("platform"),
                               created_utc=e.get("created_utc"), iceaggr_lib_digest=e.get("iceaggr_lib_digest"))
                          for d, e in zip(dirs, envs)]
    return df, env


def bandwidth_bytes_per_s(env: dict) -> float:
    gbps = env.get("copy_bandwidth_gbps")
    return float(gbps) * 1e9 if gbps else float("nan")


def batch_time_ms(df: pd.DataFrame) -> pd.Series:
    """Each row's time per batch: ``batch_mean_ms`` (the mean over the rotated batches of each batch's median call),
    or ``median_ms`` (the median of all calls) where a row has no ``batch_mean_ms`` (CPU rows, CSVs before it).

    The memory floor is that of the mean batch, so the time it compares with is the mean batch's: the median of all
    calls sits between the batches' clusters of times, where the same kernels read 6 % apart in one run (bench.py).
    """
    return df["batch_mean_ms"].fillna(df["median_ms"]) if "batch_mean_ms" in df else df["median_ms"]


def with_time(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``time_ms`` column, each row's ``batch_time_ms``: the one time every table here ranks by."""
    return df.assign(time_ms=batch_time_ms(df))


def with_derived(df: pd.DataFrame, env: dict) -> pd.DataFrame:
    """Add floor_ms (memory floor at the measured copy bandwidth: a row's own part's where ``load`` merged
    parts, else ``env``'s), io_mb, and x_floor and pulses_per_s from ``batch_time_ms``."""
    df = df.copy()
    bw = bandwidth_bytes_per_s(env)
    if "copy_bandwidth_gbps" in df:
        bw = pd.to_numeric(df["copy_bandwidth_gbps"], errors="coerce").fillna(bw / 1e9).to_numpy() * 1e9
    floor_bytes = np.array([memory_floor_bytes(r.n_pulses, r.n_doms, int(r.n_heads), int(r.head_dim), r.dtype, r.mode)
                            if pd.notna(r.n_pulses) else np.nan for r in df.itertuples()], dtype=np.float64)
    df["io_mb"] = floor_bytes / 2**20
    df["floor_ms"] = floor_bytes / bw * 1e3
    df["x_floor"] = batch_time_ms(df) / df["floor_ms"]
    df["pulses_per_s"] = df["n_pulses"] / (batch_time_ms(df) / 1e3)
    return df


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"]


def speedups(df: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Speedup of every backend over ``baseline`` at each (mode, dtype, heads, batch size): the ratio of their times
    per batch (``time_ms``, from ``batch_time_ms``, so both sides use the same statistic where both rows have it)."""
    ok = with_time(ok_rows(df))
    base = ok[ok["backend"] == baseline][GROUP + ["time_ms"]].rename(columns={"time_ms": "baseline_ms"})
    table = ok[ok["backend"] != baseline].merge(base, on=GROUP)
    table["speedup"] = table["baseline_ms"] / table["time_ms"]
    return table[["backend"] + GROUP + ["time_ms", "baseline_ms", "speedup"]].reset_index(drop=True)


def winners(df: pd.DataFrame) -> pd.DataFrame:
    """The fastest correct backend at each (mode, dtype, heads, batch size) by time per batch (``time_ms``, from
    ``batch_time_ms``), with the runner-up, and the winner's host time per call (``host_ms``: where it reaches
    time_ms, the point is bound by the host; left out where no row measured it, as in CSVs from before the column)."""
    ok = with_time(ok_rows(df))
    rows = []
    for key, g in ok.groupby(GROUP, sort=True):
        g = g.sort_values("time_ms")
        best = g.iloc[0]
        row = dict(zip(GROUP, key), winner=best["backend"], time_ms=best["time_ms"],
                   runner_up=g.iloc[1]["backend"] if len(g) > 1 else "",
                   runner_up_ms=g.iloc[1]["time_ms"] if len(g) > 1 else np.nan,
                   n_pulses=best["n_pulses"], host_ms=best.get("host_ms", np.nan))
        row["margin"] = row["runner_up_ms"] / row["time_ms"]
        if "floor_ms" in g:
            row["x_floor"] = best["x_floor"]
        rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty:
        out["mode_rank"] = (out["mode"] != "forward").astype(int)
        out = out.sort_values(["mode_rank", "dtype", "n_heads", "batch_size"]).drop(columns="mode_rank")
        if out["host_ms"].isna().all():
            out = out.drop(columns="host_ms")
    return out.reset_index(drop=True)


def regimes(win: pd.DataFrame) -> pd.DataFrame:
    """Runs of consecutive batch sizes won by the same backend, per (mode, dtype, heads)."""
    rows = []
    for key, g in win.groupby(["mode", "dtype", "n_heads"], sort=False):
        g = g.sort_values("batch_size")
        start, current = None, None
        for b, w in zip(g["batch_size"], g["winner"]):
            if w != current:
                if current is not None:
                    rows.append(dict(zip(["mode", "dtype", "n_heads"], key), batch_sizes=_span(start, prev), winner=current))
                start, current = b, w
            prev = b
        rows.append(dict(zip(["mode", "dtype", "n_heads"], key), batch_sizes=_span(start, prev), winner=current))
    return pd.DataFrame(rows)


def _span(a, b) -> str:
    return f"{int(a)}" if a == b else f"{int(a)}-{int(b)}"


def seed_comparison(df: pd.DataFrame) -> pd.DataFrame:
    """Our loop / padded / flex_dense beside the seed's table at its batch sizes (4, 8, 16).

    Ours: forward, float32 (else the first dtype run), 1 head (else the fewest), attention + pool only;
    time per batch (``batch_time_ms``) and the first (compiling) call apart. NaN where we did not run it.
    """
    fwd = with_time(df[df["mode"] == "forward"])
    if fwd.empty:
        return pd.DataFrame()
    dtype = "float32" if (fwd["dtype"] == "float32").any() else fwd["dtype"].iloc[0]
    heads = 1 if (fwd["n_heads"] == 1).any() else int(fwd["n_heads"].min())
    ours = fwd[(fwd["dtype"] == dtype) & (fwd["n_heads"] == heads)]
    out = SEED_TABLE.rename(columns={"total_pulses": "seed_pulses", "total_doms": "seed_doms",
                                     "max_pulses": "seed_max_pulses", "loop_ms": "seed_loop_ms",
                                     "padded_ms": "seed_padded_ms", "flex_ms": "seed_flex_ms"}).copy()
    sizes = ours[ours["batch_size"].isin(out["batch_size"])].drop_duplicates("batch_size").set_index("batch_size")
    out["our_pulses"] = out["batch_size"].map(sizes["n_pulses"]) if not sizes.empty else np.nan
    for backend in ("loop", "padded", "flex_dense", "flex_dense_eager"):
        rows = ours[(ours["backend"] == backend) & (ours["status"] == "ok")].set_index("batch_size")
        out[f"our_{backend}_ms"] = out["batch_size"].map(rows["time_ms"]) if not rows.empty else np.nan
        out[f"our_{backend}_first_ms"] = out["batch_size"].map(rows["first_call_ms"]) if not rows.empty else np.nan
    out.attrs["dtype"], out.attrs["n_heads"] = dtype, heads
    return out


LIBRARIES = ("varlen", "flex_block", "padded")
# Issue 5 states its memory floor at 3 TB/s; the H100's measured copy rate is a little lower (2.94-2.98 TB/s), so
# the floor at the measured rate is ~1 % longer. The targets are checked against the issue's floor; the measured
# one (floor_ms, x_floor: the plots and the winners table) is printed beside it.
ISSUE_FLOOR_BYTES_PER_S = 3e12


def fused_targets(df: pd.DataFrame, backend: str = "dom_fused") -> pd.DataFrame:
    """The fused kernel's targets (issue 5), each checked from the rows of this run.

    Times are ``batch_time_ms`` (per batch, averaged over the rotated batches; the median of all calls where a row
    has no per-batch time), shown as ``time_ms``; the memory floor rows print the median of all calls beside it.
    "best library" is the fastest of varlen, flex_block and padded at the same point with its
    preparation left out (time_ms - prep_ms). Needs ``with_derived`` columns. Empty when the run
    has no ``backend`` rows.
    """
    ok = with_time(ok_rows(df))
    ours = ok[ok["backend"] == backend]
    if df[df["backend"] == backend].empty:
        return pd.DataFrame()
    libs = ok[ok["backend"].isin(LIBRARIES)].assign(attend_ms=lambda t: t["time_ms"] - t["prep_ms"].fillna(0))

    def pick(frame, mode, dtype, heads, b):
        sel = frame[(frame["mode"] == mode) & (frame["dtype"] == dtype) & (frame["n_heads"] == heads)
                    & (frame["batch_size"] == b)]
        return sel

    rows = []

    def add(target, measured, goal, met):
        rows.append(dict(target=target, measured=measured, goal=goal,
                         met="yes" if met is True else "no" if met is False else "not measured"))

    for mode, factor in (("forward", 3.0), ("forward_backward", 5.0)):
        me, lib = pick(ours, mode, "bfloat16", 1, 1024), pick(libs, mode, "bfloat16", 1, 1024)
        if me.empty or lib.empty:
            add(f"{mode} 1024 ev bf16 1x128: >= {factor:g}x faster than the best library", "", f">= {factor:g}x", None)
        else:
            best = lib.sort_values("attend_ms").iloc[0]
            ratio = best["attend_ms"] / me["time_ms"].iloc[0]
            add(f"{mode} 1024 ev bf16 1x128: >= {factor:g}x faster than the best library",
                f"{me['time_ms'].iloc[0]:.4g} ms vs {best['backend']} {best['attend_ms']:.4g} ms: {ratio:.3g}x",
                f">= {factor:g}x", bool(ratio >= factor))
        if mode == "forward":
            var = pick(libs, mode, "bfloat16", 1, 1024)
            var = var[var["backend"] == "varlen"]
            if me.empty or var.empty:
                add("forward 1024 ev bf16 1x128: >= 10x faster than varlen", "", ">= 10x", None)
            else:
                ratio = var["attend_ms"].iloc[0] / me["time_ms"].iloc[0]
                add("forward 1024 ev bf16 1x128: >= 10x faster than varlen", f"{ratio:.3g}x", ">= 10x",
                    bool(ratio >= 10))
    for dtype, heads, b in [("bfloat16", 1, 1024)] + [(d, h, 4096) for d in ("bfloat16", "float32") for h in (1, 8)]:
        me = pick(ours, "forward", dtype, heads, b)
        label = f"forward {b} ev {dtype} {heads}x{128 // heads}: <= 3x the memory floor"
        if me.empty:
            add(label, "", "<= 3x", None)
        else:
            r = me.iloc[0]
            floor_ms = r["io_mb"] * 2**20 / ISSUE_FLOOR_BYTES_PER_S * 1e3
            ratio = r["time_ms"] / floor_ms
            measured_gbps = r["io_mb"] * 2**20 / r["floor_ms"] / 1e6
            per_batch = pd.notna(r.get("batch_mean_ms", np.nan))
            stat = (f"{r['time_ms']:.4g} ms per batch (median of all calls {r['median_ms']:.4g} ms)" if per_batch
                    else f"{r['time_ms']:.4g} ms (median of all calls)")
            # three decimals: a ratio of 3.002 must not print as "3x" beside "no"
            add(label, f"{stat}, floor {floor_ms:.3g} ms at 3 TB/s: {ratio:.3f}x (at the measured "
                f"{measured_gbps:,.0f} GB/s: {r['x_floor']:.3f}x)", "<= 3x at 3 TB/s", bool(ratio <= 3))
    for dtype in sorted(df.loc[df["backend"] == backend, "dtype"].unique()):
        rows_d = df[(df["backend"] == backend) & (df["dtype"] == dtype)]
        checked = rows_d[rows_d["rel_err"].notna()]
        errors = rows_d[rows_d["status"] == "error"]  # a wrong result (with its rel err) or a call that raised
        tol = TOLERANCE[DTYPES[dtype]]
        label = f"correct against the float64 reference, every {dtype} row (rel err <= {tol:g})"
        if checked.empty and errors.empty:
            add(label, "", f"<= {tol:g}", None)
        else:
            worst = checked["rel_err"].max()
            add(label, f"max rel err {worst:.2g} over {len(checked)} rows (forward and gradients)"
                + (f"; {len(errors)} error rows" if len(errors) else ""), f"<= {tol:g}",
                bool(worst <= tol and errors.empty))
    me = pick(ours, "forward", "bfloat16", 1, 1024)
    if me.empty or me["peak_mem_mb"].isna().all():
        add("peak memory at 1024 ev (bf16 1x128 forward): <= 2x inputs + outputs", "", "<= 2x", None)
    else:
        r = me.iloc[0]
        inputs_mb = r["io_mb"] - r["n_doms"] * r["n_heads"] * r["head_dim"] * 2 / 2**20
        ratio = (r["peak_mem_mb"] + inputs_mb) / r["io_mb"]
        add("peak memory at 1024 ev (bf16 1x128 forward): <= 2x inputs + outputs",
            f"{r['peak_mem_mb']:.3g} MB above {inputs_mb:.3g} MB of inputs; inputs + outputs {r['io_mb']:.3g} MB: "
            f"{ratio:.3g}x", "<= 2x", bool(ratio <= 2))
    return pd.DataFrame(rows)


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    return df.pivot_table(index="backend", columns="status", values="median_ms", aggfunc="size", fill_value=0)


# ----------------------------------------------------------------------------------------------
# markdown


def format_number(v: float) -> str:
    """Readable: 12,345 / 123 / 1.23 / 0.0123 / 1.2e-06; whole numbers without decimals."""
    if np.isnan(v):
        return ""
    a = abs(v)
    if a >= 100 or (a >= 1 and float(v).is_integer()):
        return f"{v:,.0f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return "0" if v == 0 else f"{v:.2g}"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df`` (no extra dependency)."""
    if df.empty:
        return "(none)\n"

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return format_number(float(v))
        return str(v)

    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(df: pd.DataFrame, env: dict) -> str:
    """A short summary of a run, every number computed from the CSV and environment here."""
    n_status = df["status"].value_counts().to_dict()
    dev = env.get("gpu_name") or env.get("cpu_model") or env.get("device")
    lines = [
        "# Benchmark summary",
        "",
        f"Device: {dev} ({env.get('device')}); torch {env.get('torch_version')}, "
        f"triton {env.get('triton_version')}, driver {env.get('nvidia_driver')}. "
        + (f"Measured copy bandwidth {env.get('copy_bandwidth_gbps')} GB/s (the memory floor uses it)."
         if not env.get("merged_from") else "Measured copy bandwidth per part: " + ", ".join(
             f"{Path(m['results_dir']).name} {m.get('copy_bandwidth_gbps')} GB/s" for m in env["merged_from"])
         + " (each row's memory floor uses its part's). Each part's machine: " + "; ".join(
             f"{Path(m['results_dir']).name} {m.get('device_name')}, torch {m.get('torch_version')}, triton "
             f"{m.get('triton_version')}, host {m.get('platform')}, measured {m.get('created_utc')}, iceaggr_lib sources "
             f"{m.get('iceaggr_lib_digest') or 'not recorded'}"
             for m in env["merged_from"]) + "."),
        f"Grid: {len(df)} points; " + ", ".join(f"{k} {v}" for k, v in sorted(n_status.items())) + ". "
        "Times (`time_ms`) are per batch of consecutive events, per-batch preparation included: the mean over the "
        "rotated batches of each batch's median call (`batch_mean_ms`), or the median of all calls where a row has "
        "no `batch_mean_ms` (CPU rows, parts measured before it); "
        "the first (compiling) call is reported apart.",
        "",
    ]
    win = winners(df)
    if not win.empty:
        lines += ["## Winner per regime", "", markdown_table(regimes(win)), "## Fastest backend per point", ""]
        cols = ["mode", "dtype", "n_heads", "batch_size", "n_pulses", "winner", "time_ms", "runner_up",
                "runner_up_ms", "margin"] + (["x_floor"] if "x_floor" in win else []) \
            + (["host_ms"] if "host_ms" in win else [])  # (not in CSVs from before host_ms)
        lines.append(markdown_table(win[cols]))
    for baseline in ("loop", "flex_dense"):
        sp = speedups(df, baseline)
        if sp.empty:
            lines += [f"## Speedup vs {baseline}", "", f"No successful '{baseline}' rows in this run.", ""]
            continue
        largest = sp.loc[sp.groupby(["backend", "mode", "dtype", "n_heads"])["batch_size"].idxmax()]
        lines += [f"## Speedup vs {baseline} at the largest batch size each backend ran", "",
                  markdown_table(largest[["backend", "mode", "dtype", "n_heads", "batch_size", "time_ms",
                                          "baseline_ms", "speedup"]].sort_values(["mode", "dtype", "n_heads",
                                                                                  "speedup"]))]
    seed = seed_comparison(df)
    if not seed.empty:
        lines += ["## Our numbers beside the seed's", "",
                  f"Seed columns (`seed_*`): {SEED_SOURCE}. Ours (`our_*`): forward, {seed.attrs['dtype']}, "
                  f"{seed.attrs['n_heads']} head(s), attention + mean pool only, on this run's device; `_ms` is the "
                  "time per batch as above, `_first_ms` the first (compiling) call. `our_pulses` is the mean "
                  "over the rotated batches of our data set.", "", markdown_table(seed)]
    targets = fused_targets(df) if "floor_ms" in df else pd.DataFrame()
    if not targets.empty:
        lines += ["## The fused kernel's targets (issue 5), from this run", "",
                  "'best library': fastest of varlen, flex_block, padded with its preparation left out "
                  "(time - prep_ms). Times are per batch: the mean over the rotated batches of each batch's median "
                  "call (`batch_mean_ms`; the median of all calls for rows without it). The memory floor as issue 5 "
                  "states it: q, k, v read once and the DOM "
                  "embeddings written once, at 3 TB/s (beside it at the copy bandwidth measured on the device).",
                  "", markdown_table(targets)]
    bad = df[df["status"] != "ok"]
    if not bad.empty:
        lines += ["## Status of every row, per backend", "", markdown_table(status_counts(df).reset_index()),
                  "First message per (backend, status):", ""]
        first = bad.drop_duplicates(["backend", "status"])[["backend", "status", "dtype", "mode", "batch_size",
                                                            "message"]]
        lines.append(markdown_table(first))
    return "\n".join(lines)
