"""`make report`: run the three notebooks headless with papermill into one folder, and render them to HTML.

    python -m iceaggr_lib.report --out reports/latest

1. generates the embedded sample (``data/sample``, 20,000 events in the Kaggle layout) if absent;
2. picks the grid: ``GPU_GRID`` when CUDA is visible, else the small ``CPU_GRID`` (``--grid`` overrides);
3. runs ``notebooks/01_sparsity``, ``02_benchmark`` and ``03_report`` with papermill, parameters
   injected, the executed notebooks and every artefact (sparsity_summary.json, benchmark.csv,
   environment.json, figures/*.png, summary.md) written to ``--out``;
4. renders each executed notebook to HTML with nbconvert.

A GPU grid too long for one 10-minute device call can be run in parts, each into its own folder
(``--dtypes bfloat16 --out reports/h100_bf16``, then ``--dtypes float32 --out reports/h100_fp32``), and
the report drawn over both: ``--notebooks 03_report --results-dirs reports/h100_bf16 reports/h100_fp32
--out reports/h100``; the parts' rows are then also written merged to ``--out``'s benchmark.csv and
environment.json.

A failing notebook still leaves its executed copy (with the error in the failing cell) and its HTML,
the later notebooks still run (the report on whatever rows the benchmark finished), and the command
exits non-zero naming the failed notebook.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_NAMES = ("01_sparsity", "02_benchmark", "03_report")
DEFAULT_SAMPLE = ROOT / "data" / "sample"
ARTEFACTS = {"01_sparsity": ("sparsity_summary.json", "attention_work.csv"),
             "02_benchmark": ("benchmark.csv", "environment.json"), "03_report": ("summary.md",)}
SAMPLE_EVENTS = 20_000

# The CPU grid: small enough for ~10 minutes on 2 cores (FlexAttention compiles slowly on the CPU and
# has no CPU backward, so its forward_backward rows are 'unsupported' rows).
CPU_GRID = dict(
    backends=["loop", "padded", "flex_dense_eager", "flex_dense", "flex_block"],
    dtypes=["float32"],
    batch_sizes=[4, 8, 16, 64],
    modes=["forward", "forward_backward"],
    n_heads=[1],
    d_model=128,
    repeats=10,
    time_limit_s=None,
    max_call_ms=1000.0,
)

# The GPU grid: every registered backend except the float64 reference (which checks the others).
GPU_GRID = dict(
    backends=None,  # filled with the registry at run time, so later backends (dom_fused, auto) join in
    dtypes=["bfloat16", "float32"],
    batch_sizes=[4, 8, 16, 64, 256, 1024, 4096],
    modes=["forward", "forward_backward"],
    n_heads=[1, 8],
    d_model=128,
    repeats=20,
    time_limit_s=None,
    max_call_ms=300.0,  # the loop baseline and O(N^2) flex_dense stop early instead of taking minutes
)


def ensure_sample(data_dir: str | Path = DEFAULT_SAMPLE, n_events: int = SAMPLE_EVENTS, seed: int = 0) -> Path:
    """The embedded sample at ``data_dir``, generated (into a temporary folder, then renamed) if absent."""
    data_dir = Path(data_dir)
    if (data_dir / "train_meta.parquet").exists():
        return data_dir
    from iceaggr_lib.data.sample import write_dataset

    tmp = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    write_dataset(tmp, n_events, seed=seed)
    if data_dir.exists():  # an incomplete earlier attempt
        shutil.rmtree(data_dir)
    tmp.rename(data_dir)
    print(f"report: generated the sample ({n_events:,} events, seed {seed}) in {data_dir} "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)
    return data_dir


def default_grid(kind: str = "auto") -> dict:
    """The grid for this machine: 'gpu' when CUDA is visible (or asked for), else 'cpu'."""
    import torch

    from iceaggr_lib.backends import available_backends

    if kind == "auto":
        kind = "gpu" if torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"--grid must be auto, cpu or gpu, not '{kind}'")
    grid = dict(GPU_GRID if kind == "gpu" else CPU_GRID)
    if grid["backends"] is None:
        grid["backends"] = [b for b in available_backends() if b != "reference"]
    return grid


def run_notebook(name: str, out_dir: Path, parameters: dict, kernel_name: str = "python3") -> Path:
    """Execute ``notebooks/<name>.ipynb`` with papermill into ``out_dir/<name>.ipynb``."""
    import papermill as pm

    output = out_dir / f"{name}.ipynb"
    pm.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(output), parameters=parameters,
                        kernel_name=kernel_name, cwd=str(NOTEBOOKS), progress_bar=False, log_output=True)
    return output


def render_html(notebook: Path) -> Path:
    """``<notebook>.html`` beside the executed notebook (nbconvert's HTML exporter)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(notebook))
    html = notebook.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def write_merged(results_dirs, out: Path) -> None:
    """``benchmark.csv`` and ``environment.json`` in ``out``: the parts' rows concatenated (a grid point
    measured twice is an error, see ``results.load``) and the first part's environment with ``merged_from``."""
    import json

    from iceaggr_lib import results
    from iceaggr_lib.bench import CSV_COLUMNS

    df, env = results.load([Path(d) for d in results_dirs])
    df[CSV_COLUMNS].to_csv(out / "benchmark.csv", index=False)
    (out / "environment.json").write_text(json.dumps(env, indent=1, default=str))
    print(f"report: merged {len(df)} rows of {len(results_dirs)} parts into {out / 'benchmark.csv'}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/latest", help="folder for executed notebooks, artefacts and HTML")
    p.add_argument("--data-dir", default=None, help="a Kaggle-layout data set (default: the embedded sample, "
                   "generated if absent)")
    p.add_argument("--events", type=int, default=SAMPLE_EVENTS, help="events in a generated sample")
    p.add_argument("--seed", type=int, default=0, help="seed of a generated sample")
    p.add_argument("--max-events", type=int, default=None, help="events read by the sparsity notebook (default all)")
    p.add_argument("--grid", default="auto", help="auto, cpu or gpu")
    p.add_argument("--device", default="auto")
    p.add_argument("--backends", nargs="+", help="override the grid's backends")
    p.add_argument("--dtypes", nargs="+", help="override the grid's dtypes")
    p.add_argument("--batch-sizes", nargs="+", type=int, help="override the grid's batch sizes")
    p.add_argument("--n-heads", nargs="+", type=int, help="override the grid's head counts")
    p.add_argument("--modes", nargs="+", help="override the grid's modes")
    p.add_argument("--repeats", type=int, help="override the grid's timed calls per point")
    p.add_argument("--time-limit-s", type=float, help="bound the benchmark grid; later points become 'skipped' rows")
    p.add_argument("--max-call-ms", type=float, help="skip batch sizes whose extrapolated call time exceeds this")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    p.add_argument("--notebooks", nargs="+", default=list(NOTEBOOK_NAMES), choices=NOTEBOOK_NAMES,
                   help="run only these notebooks")
    p.add_argument("--results-dirs", nargs="+", help="03_report reads these runs (merged) instead of --out, "
                   "e.g. a bf16 and an fp32 part of one GPU grid run in two device calls")
    p.add_argument("--no-html", action="store_true")
    args = p.parse_args(argv)

    grid = default_grid(args.grid)
    for key in ("backends", "dtypes", "batch_sizes", "n_heads", "modes", "repeats", "time_limit_s", "max_call_ms"):
        if getattr(args, key) is not None:
            grid[key] = getattr(args, key)
    if "02_benchmark" in args.notebooks:  # a bad grid (unknown dtype or mode, ...) fails here, before the sample
        from iceaggr_lib.bench import BenchConfig
        try:
            BenchConfig(**grid, device=args.device)
        except ValueError as e:
            p.error(f"the benchmark grid: {e}")

    t_all = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data_dir:
        data_dir = Path(args.data_dir).resolve()
    elif {"01_sparsity", "02_benchmark"} & set(args.notebooks):
        data_dir = ensure_sample(DEFAULT_SAMPLE, args.events, args.seed)
    else:
        data_dir = DEFAULT_SAMPLE
    params = {
        "01_sparsity": dict(data_dir=str(data_dir), split="train", max_events=args.max_events, out_dir=str(out)),
        "02_benchmark": dict(data_dir=str(data_dir), device=args.device, out_dir=str(out), **grid),
        "03_report": dict(results_dir=[str(Path(d).resolve()) for d in args.results_dirs] if args.results_dirs
                          else str(out), out_dir=str(out)),
    }
    print(f"report: data {data_dir}, out {out}\nreport: grid {grid}", flush=True)
    for name in args.notebooks:  # never let a report show an earlier run's numbers
        for stale in ARTEFACTS[name]:
            (out / stale).unlink(missing_ok=True)
    failed = []
    if args.results_dirs:  # one merged benchmark.csv / environment.json beside the report, for outside tools
        try:
            write_merged(args.results_dirs, out)
        except (FileNotFoundError, ValueError) as e:  # a missing part or a point in two parts: say so, go on
            failed.append(f"merging --results-dirs: {e}")
    for name in args.notebooks:
        if name == "03_report" and not args.results_dirs and not (out / "benchmark.csv").exists():
            failed.append(f"{name}: skipped, no benchmark.csv")
            continue
        t0 = time.perf_counter()
        try:
            nb = run_notebook(name, out, params[name], kernel_name=args.kernel)
            state = "done"
        except Exception as e:  # papermill has written the executed notebook with the failing cell
            failed.append(f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:500]}")
            nb, state = out / f"{name}.ipynb", "FAILED"
        # a failed benchmark still leaves the rows it finished: the report notebook runs on them
        print(f"report: {name} {state} in {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.no_html and nb.exists():
            print(f"report: {render_html(nb)}", flush=True)
    print(f"report: total {time.perf_counter() - t_all:.1f} s; outputs in {out}", flush=True)
    for failure in failed:
        print(f"report: FAILED {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
