"""The benchmark harness: a grid of attention backends timed on real-layout batches, one CSV row per point.

The grid is backends x dtypes x batch sizes (events per batch) x modes x head counts. For each batch
size the harness takes ``n_batches`` batches of consecutive events from the start of the data set
(events 0..b-1, b..2b-1, ... as the seed did with its first events) and rotates through them while
timing, so a number is never the time of one cached input. q, k, v are fresh random (N, H, Dh)
tensors (never zeros) with head_dim = d_model / n_heads, the same for every backend at a grid point.

What is timed
-------------
The timed region is what a training step repeats per batch once the packed batch is on the device:
``spec.prepare`` (a BlockMask build, padding indices, chunking) plus ``spec.attend`` (attention +
mean pooling), and in ``forward_backward`` also the backward pass to q, k, v (``torch.autograd.grad``
with a random upstream gradient). ``forward`` runs under ``torch.no_grad`` (inference).

* ``first_call_ms``: the very first call (compilation included), wall clock, kept out of the median.
* Then one warm-up call on each rotated batch (new shapes compile here), then the timed calls,
  cycling through the batches, each batch timed equally often: ``median_ms``, ``p20_ms``, ``p80_ms`` over all of
  them, and ``batch_mean_ms``, the mean over the batches of each batch's median call (GPU; NaN on the CPU).
  The batches differ in size, so the calls' times cluster by batch: at 4,096 events the bf16 8x16 forward's four
  clusters lie between 0.43 and 0.59 ms, and the median of all calls falls in the gap between the second and third
  cluster, where dom_fused and auto, the same kernels in one run, read 0.578 and 0.543 ms (docs/dom_fused_notes.md,
  run 133).
  ``batch_mean_ms`` is the time per batch that a loop over these batches averages, the quantity that the memory
  floor of the mean batch (``memory_floor_bytes`` of the mean pulses and DOMs) compares with; the floor ratios and
  the targets of ``iceaggr_lib.results`` use it where a row has it.
  GPU: CUDA events around each call, the L2 cache flushed before each, calls issued back to back with
  no host synchronisation between them (as triton.testing.do_bench does): a step's time is its GPU
  time where the GPU is the busier side, and includes the host's dispatch time where the host is (a
  training loop overlaps the two the same way). CPU: ``torch.utils.benchmark.Timer.blocked_autorange``;
  quantiles over its blocks.
* ``prep_ms``: ``prepare`` alone, timed the same way.
* ``host_ms`` (GPU): the host's time per call while issuing the timed calls (``time_calls_and_host``). Where
  it reaches ``median_ms`` the point is bound by the host, and its reading moves with the lent machine's host
  (docs/dom_fused_notes.md, run 121: up to 2x between series at such points). NaN on the CPU and in CSVs that
  predate it.
* ``peak_mem_mb``: ``torch.cuda.max_memory_allocated`` during the warm-up pass over the rotated
  batches, minus what was allocated before it (the inputs): the memory the step itself needs. NaN on
  the CPU (not measured there).
* ``rel_err``: ||out - ref|| / ||ref|| of the first call's output against the float64 ``reference``
  backend on the same (dtype-rounded) inputs of the first batch; in ``forward_backward`` the worst
  of the output and the three gradients. A result over the tolerance of ``iceaggr_lib.testing``
  makes the row ``error`` ("wrong result"), its timings kept.
* ``n_pulses``, ``n_doms``: means over the rotated batches; ``max_dom_pulses``: their maximum.
* ``message``: why a row is not ok, and warnings worth reading beside an ok row: dynamo compiling
  inside the timed calls, and any RuntimeWarning a backend raised (how silent fallbacks, such as
  compiled FlexAttention running eager past the recompile limit, make themselves visible).
* ``status``: ``ok``, ``oom``, ``unsupported`` (the backend refuses the combination, or the grid
  skipped it: then ``message`` begins "skipped:") or ``error`` (with ``message``).

Budgets keep a grid finite: a point gets ``repeats`` timed calls at most and fewer when its calls are
slow (``time_budget_s``); once a (backend, dtype, heads, mode) series runs out of memory its larger batch
sizes are skipped, and so is a batch size whose call time, extrapolated linearly in batch size from the
series' previous point, exceeds ``max_call_ms``; ``time_limit_s`` bounds the whole grid.
Rows are appended to the CSV and flushed as each point finishes, so a crash loses nothing.
"""

from __future__ import annotations

import csv
import gc
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bar: also in notebooks, without ipywidgets

from iceaggr_lib.backends import MODES, UnsupportedError, get_backend
from iceaggr_lib.collate import DomBatch, PulseTable
from iceaggr_lib.envinfo import resolve_device
from iceaggr_lib.testing import TOLERANCE, rel_err

CSV_COLUMNS = ["backend", "dtype", "mode", "n_heads", "head_dim", "batch_size", "n_pulses", "n_doms",
               "max_dom_pulses", "status", "message", "median_ms", "p20_ms", "p80_ms", "batch_mean_ms", "prep_ms",
               "host_ms", "first_call_ms", "peak_mem_mb", "rel_err", "device", "torch_version"]
# columns added after reports were committed: read as NaN from a CSV that predates them
LATER_COLUMNS = ("host_ms", "batch_mean_ms")
STATUSES = ("ok", "oom", "unsupported", "error")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; known: {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class BenchConfig:
    """One benchmark grid. Lists are the grid's axes; the rest are budgets and settings."""

    backends: Sequence[str]
    dtypes: Sequence[str] = ("float32",)
    batch_sizes: Sequence[int] = (4, 16, 64)
    modes: Sequence[str] = MODES
    n_heads: Sequence[int] = (1,)
    d_model: int = 128
    device: str = "auto"
    repeats: int = 20  # timed calls per grid point, at most
    n_batches: int = 4  # different batches of consecutive events rotated per batch size
    time_budget_s: float = 1.0  # timing time per point; calls = clip(budget / call time, min_calls, repeats)
    min_calls: int = 3
    max_call_ms: float = 1000.0  # skip a batch size whose call would take longer (linear extrapolation)
    time_limit_s: float | None = None  # the whole grid; points after it are rows "skipped"
    check: bool = True  # compare with the float64 reference
    seed: int = 0

    def __post_init__(self):
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode '{mode}'; known: {MODES}")
        for h in self.n_heads:
            if self.d_model % h:
                raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {h}")
        for dt in self.dtypes:
            parse_dtype(dt)
        if not self.backends:
            raise ValueError("the grid needs at least one backend")

    def n_points(self) -> int:
        return (len(self.backends) * len(self.dtypes) * len(self.batch_sizes) * len(self.modes)
                * len(self.n_heads))


# ----------------------------------------------------------------------------------------------
# data


def consecutive_batches(source, batch_size: int, n_batches: int) -> list[DomBatch]:
    """Up to ``n_batches`` DomBatches of ``batch_size`` consecutive events from the data set's start.

    ``source`` is a ``PulseTable`` (``.batch(e0, e1)``), a reader with ``.batch(first_event,
    n_events)`` and ``.n_events`` (``iceaggr_lib.data.kaggle.KaggleDataset``), or a callable
    ``(first_event, n_events) -> DomBatch``.
    """
    n_events = getattr(source, "n_events", None)
    n = n_batches if n_events is None else min(n_batches, n_events // batch_size)
    if n < 1:
        raise ValueError(f"the data set has {n_events} events, fewer than one batch of {batch_size}")
    if isinstance(source, PulseTable):
        return [source.batch(i * batch_size, (i + 1) * batch_size) for i in range(n)]
    if callable(source) and not hasattr(source, "batch"):
        return [source(i * batch_size, batch_size) for i in range(n)]
    return [source.batch(i * batch_size, batch_size) for i in range(n)]


def open_dataset(data_dir: str | Path, split: str = "train"):
    """The Kaggle-layout reader for ``data_dir`` (``iceaggr_lib.data.kaggle.KaggleDataset``)."""
    from iceaggr_lib.data.kaggle import KaggleDataset

    return KaggleDataset(data_dir, split=split)


# ----------------------------------------------------------------------------------------------
# the memory floor


def memory_floor_bytes(n_pulses: float, n_doms: float, n_heads: int, head_dim: int, dtype, mode: str) -> float:
    """The fewest bytes a step must move through device memory.

    forward: read q, k, v once and write the (D, H, Dh) DOM output once.
    forward_backward: that, plus read the upstream gradient (D, H, Dh) and write dq, dk, dv.
    """
    elem = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    row = n_heads * head_dim * elem
    fwd = (3 * n_pulses + n_doms) * row
    return fwd if mode == "forward" else fwd + (3 * n_pulses + n_doms) * row


# ----------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall_ms(fn: Callable, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


_L2_FLUSH: dict = {}


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """The 256 MB buffer whose ``zero_()`` flushes the L2 cache before each timed CUDA call (one per device)."""
    flush = _L2_FLUSH.get(device)
    if flush is None:
        flush = _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    return flush


def time_calls(fn: Callable, device: torch.device, n_calls: int, est_ms: float, max_run_s: float) -> np.ndarray:
    """Per-call times in ms of ``fn`` (already warm).

    CUDA: ``n_calls`` calls, each between two CUDA events, the L2 cache flushed (a 256 MB write)
    before each, issued back to back (no host synchronisation inside the loop, as in do_bench; a
    host-bound step still shows its host time, since its start event waits for nothing while its
    kernels are not yet issued). CPU: ``torch.utils.benchmark.Timer.blocked_autorange``
    run for about ``n_calls`` calls (at least 50 ms, at most ``max_run_s``); one time per block.
    """
    return time_calls_and_host(fn, device, n_calls, est_ms, max_run_s)[0]


def time_calls_and_host(fn: Callable, device: torch.device, n_calls: int, est_ms: float,
                        max_run_s: float) -> tuple[np.ndarray, float]:
    """``time_calls``, and on CUDA the host's time per call in ms: the wall time of the loop that issues the calls
    (flush, events and ``fn``; the final synchronisation left out) over ``n_calls``. Well below the median GPU
    time, the GPU bounds the point. Where it reaches the median, the point is bound by the host and its reading moves
    with the host's speed, unless the host was waiting for the GPU (a full launch queue, or a synchronisation
    inside ``fn``). NaN on CPU (there every time is the host's)."""
    if device.type == "cuda":
        flush = l2_flush_buffer(device)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls)]
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(n_calls):
            flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        host_ms = (time.perf_counter() - t0) * 1e3 / n_calls
        torch.cuda.synchronize(device)
        return np.array([s.elapsed_time(e) for s, e in zip(starts, ends)]), host_ms
    from torch.utils.benchmark import Timer

    min_run_time = min(max(0.05, n_calls * est_ms / 1e3), max_run_s)
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return np.asarray(m.times) * 1e3, float("nan")


def _dynamo_frames() -> int:
    """Frames dynamo has compiled so far (0 when dynamo was never imported: nothing compiled)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0
    return int(utils.counters["frames"].get("total", 0))


# ----------------------------------------------------------------------------------------------
# one grid point


@dataclass
class _Inputs:
    """Rotated batches and their q, k, v, upstream gradients, plus the reference's answer on batch 0."""

    batches: list
    qkv: list  # [(q, k, v)] per batch, dtype, no grad
    grad_out: list  # (D, H, Dh) per batch
    ref: dict = field(default_factory=dict)  # mode -> list of float64 tensors (out[, dq, dk, dv]) or an error str


def _make_inputs(batches: list, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 seed: int) -> _Inputs:
    g = torch.Generator(device=device).manual_seed(seed)
    qkv, grad_out = [], []
    for b in batches:
        shape = (b.n_pulses, n_heads, head_dim)
        qkv.append(tuple(torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(3)))
        grad_out.append(torch.randn((b.n_doms, n_heads, head_dim), generator=g, device=device).to(dtype))
    return _Inputs(batches=batches, qkv=qkv, grad_out=grad_out)


def _reference(inputs: _Inputs, mode: str, scale: float):
    """float64 reference on batch 0 (cached per mode): [out] or [out, dq, dk, dv]; a str if it failed."""
    if mode in inputs.ref:
        return inputs.ref[mode]
    try:
        spec = get_backend("reference")
        b = inputs.batches[0]
        q, k, v = (t.detach().double().requires_grad_(mode == "forward_backward") for t in inputs.qkv[0])
        prep = spec.prepare(b, q.shape[1], q.shape[2], torch.float64)
        if mode == "forward":
            with torch.no_grad():
                result = [spec.attend(q, k, v, b, prep, scale)]
        else:
            out = spec.attend(q, k, v, b, prep, scale)
            grads = torch.autograd.grad(out, (q, k, v), inputs.grad_out[0].double())
            result = [out.detach(), *grads]
    except Exception as e:  # noqa: BLE001 - the row records it, the grid carries on
        result = f"reference failed: {_one_line(e)}"
    inputs.ref[mode] = result
    return result


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:limit]


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return "out of memory" in text or "outofmemory" in text or "can't allocate memory" in text


def _make_step(spec, inputs: _Inputs, mode: str, scale: float, dtype: torch.dtype, only_prepare: bool = False):
    """A closure doing one training-step slice on the next rotated batch; returns what it computed."""
    state = {"i": 0}
    n = len(inputs.batches)

    def step():
        i = state["i"] % n
        state["i"] += 1
        b = inputs.batches[i]
        q, k, v = inputs.qkv[i]
        with torch.no_grad():
            prep = spec.prepare(b, q.shape[1], q.shape[2], dtype)
        if only_prepare:
            return prep
        if mode == "forward":
            with torch.no_grad():
                return [spec.attend(q, k, v, b, prep, scale)]
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        out = spec.attend(q, k, v, b, prep, scale)
        grads = torch.autograd.grad(out, (q, k, v), inputs.grad_out[i])
        return [out.detach(), *grads]

    step.state = state  # the next call's batch is state["i"] % n: run_point reads it to sort the calls by batch
    return step


def batch_mean_of_medians(times: np.ndarray, first_batch: int, n_batches: int) -> float:
    """The mean over the rotated batches of each batch's median time; call j ran batch (first_batch + j) % n_batches.

    NaN unless every batch has at least one call (``run_point`` times a multiple of ``n_batches`` calls).
    """
    times = np.asarray(times, dtype=np.float64)
    batch = (first_batch + np.arange(len(times))) % n_batches
    medians = [np.median(times[batch == b]) for b in range(n_batches) if (batch == b).any()]
    return float(np.mean(medians)) if len(medians) == n_batches else float("nan")


def run_point(backend: str, inputs: _Inputs, mode: str, dtype: torch.dtype, device: torch.device,
              cfg: BenchConfig) -> dict:
    """Measure one grid point; returns the timing/memory/error fields (never raises for a backend failure)."""
    spec = get_backend(backend)
    spec.check(device, dtype, mode)
    head_dim = inputs.qkv[0][0].shape[2]
    scale = head_dim ** -0.5
    step = _make_step(spec, inputs, mode, scale, dtype)
    notes = []

    holder = {}
    first_call_ms = _wall_ms(lambda: holder.setdefault("out", step()), device)
    rel = float("nan")
    if cfg.check:
        ref = _reference(inputs, mode, scale)
        if isinstance(ref, str):
            notes.append(ref)
        else:
            rel = max(rel_err(o, r) for o, r in zip(holder["out"], ref))
    del holder

    # warm-up: every rotated batch once (each new shape compiles here), the call time estimated and,
    # on CUDA, the peak memory above what is resident (inputs, reference) measured over this pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    warm = [_wall_ms(step, device) for _ in range(len(inputs.batches))]
    peak_mb = float("nan")
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    est_ms = min(warm)
    n_calls = int(np.clip(cfg.time_budget_s * 1e3 / max(est_ms, 1e-3), cfg.min_calls, cfg.repeats))
    n_batches = len(inputs.batches)
    n_calls = -(-n_calls // n_batches) * n_batches  # every batch timed equally often
    first_batch = step.state["i"] % n_batches
    frames_before = _dynamo_frames()
    times, host_ms = time_calls_and_host(step, device, n_calls, est_ms, cfg.time_budget_s)
    # one time per call on CUDA; the CPU's blocked_autorange gives one per block of calls, not per batch
    batch_mean_ms = batch_mean_of_medians(times, first_batch, n_batches) if device.type == "cuda" else float("nan")
    compiled = _dynamo_frames() - frames_before
    if compiled:
        notes.append(f"warning: {compiled} dynamo frame compilations inside the timed calls")

    prep_step = _make_step(spec, inputs, mode, scale, dtype, only_prepare=True)
    prep_times = time_calls(prep_step, device, n_calls, est_ms, cfg.time_budget_s / 2)

    status = "ok"
    tol = TOLERANCE.get(dtype)
    if cfg.check and tol is not None and not rel <= tol and not math.isnan(rel):
        status = "error"
        notes.insert(0, f"wrong result: rel_err {rel:.3g} > tolerance {tol:g}")
    return dict(status=status, message="; ".join(notes), median_ms=float(np.median(times)),
                p20_ms=float(np.quantile(times, 0.2)), p80_ms=float(np.quantile(times, 0.8)),
                batch_mean_ms=batch_mean_ms, prep_ms=float(np.median(prep_times)), host_ms=host_ms,
                first_call_ms=first_call_ms,
                peak_mem_mb=peak_mb, rel_err=rel, _est_ms=est_ms)


# ----------------------------------------------------------------------------------------------
# the grid


def apply_settings() -> None:
    """fp32 means fp32: no tf32 in matmuls or cuDNN (the developers' guide's fp32 tolerance assumes it).

    ``run_grid`` applies these; call it before ``envinfo.collect`` so environment.json records them.
    """
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class CsvRows:
    """Appends rows with ``CSV_COLUMNS`` to a CSV file, flushing each one (a crash loses nothing)."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not append or not self.path.exists() or self.path.stat().st_size == 0
        self._fh = open(self.path, "w" if fresh else "a", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if fresh:
            self._writer.writeheader()
            self._fh.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: _fmt(row.get(k)) for k in CSV_COLUMNS})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def _free(device: torch.device) -> None:
    """After a failure: drop what the traceback kept alive and hand cached blocks back to the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_grid(source, cfg: BenchConfig, csv_path: str | Path, progress: bool = True,
             append: bool = False) -> pd.DataFrame:
    """Run the whole grid on ``source`` (see ``consecutive_batches``), writing ``csv_path`` row by row.

    Order: dtype, heads, batch size (ascending), mode, backend — so the inputs and the float64
    reference of a point are shared by every backend. Returns the rows as a DataFrame.
    """
    device = resolve_device(cfg.device)
    apply_settings()
    writer = CsvRows(csv_path, append=append)
    rows = []
    stopped: dict = {}  # (backend, dtype, heads, mode) -> reason its larger batch sizes are skipped
    last_call: dict = {}  # (backend, dtype, heads, mode) -> (events, ms per call) of its last measured size
    batch_cache: dict = {}
    t_start = time.perf_counter()
    # mininterval: an executed notebook stores every refresh of the bar, so refresh rarely
    bar = tqdm(total=cfg.n_points(), desc="benchmark grid", disable=not progress, mininterval=5.0)
    try:
        for dtype_str in cfg.dtypes:
            dtype = parse_dtype(dtype_str)
            for n_heads in cfg.n_heads:
                head_dim = cfg.d_model // n_heads
                for batch_size in sorted(cfg.batch_sizes):
                    inputs, load_error = None, None
                    try:
                        if batch_size not in batch_cache:
                            batch_cache.clear()
                            _free(device)
                            batch_cache[batch_size] = [b.to(device) for b in
                                                       consecutive_batches(source, batch_size, cfg.n_batches)]
                        inputs = _make_inputs(batch_cache[batch_size], n_heads, head_dim, dtype, device,
                                              seed=cfg.seed + batch_size)
                    except Exception as e:  # noqa: BLE001
                        load_error = e
                    for mode in cfg.modes:
                        for backend in cfg.backends:
                            bar.set_postfix_str(f"{backend} {dtype_name(dtype)} h{n_heads} b{batch_size} {mode}",
                                                refresh=False)
                            row = dict(backend=backend, dtype=dtype_name(dtype), mode=mode, n_heads=n_heads,
                                       head_dim=head_dim, batch_size=batch_size, device=str(device),
                                       torch_version=torch.__version__, median_ms=float("nan"),
                                       p20_ms=float("nan"), p80_ms=float("nan"), batch_mean_ms=float("nan"),
                                       prep_ms=float("nan"),
                                       host_ms=float("nan"),
                                       first_call_ms=float("nan"), peak_mem_mb=float("nan"),
                                       rel_err=float("nan"), message="")
                            if inputs is not None:
                                row.update(n_pulses=int(round(np.mean([b.n_pulses for b in inputs.batches]))),
                                           n_doms=int(round(np.mean([b.n_doms for b in inputs.batches]))),
                                           max_dom_pulses=max(b.max_dom_pulses for b in inputs.batches))
                            row.update(_measure(backend, inputs, load_error, mode, dtype, device, cfg, stopped,
                                                last_call, n_heads, t_start))
                            row.pop("_est_ms", None)
                            writer.write(row)
                            rows.append(row)
                            bar.update(1)
                    del inputs
    finally:
        bar.close()
        writer.close()
        batch_cache.clear()
        _free(device)
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def _measure(backend, inputs, load_error, mode, dtype, device, cfg, stopped, last_call, n_heads, t_start) -> dict:
    key = (backend, dtype, n_heads, mode)
    if load_error is not None:
        return dict(status="error", message=f"no data: {_one_line(load_error)}")
    if cfg.time_limit_s is not None and time.perf_counter() - t_start > cfg.time_limit_s:
        return dict(status="unsupported", message=f"skipped: the grid's time limit of {cfg.time_limit_s:g} s was reached")
    if key in stopped:
        return dict(status="unsupported", message=f"skipped: {stopped[key]}")
    n_events = inputs.batches[0].n_events
    if key in last_call:  # extrapolate the series' call time linearly in batch size
        prev_events, prev_ms = last_call[key]
        predicted = prev_ms * n_events / prev_events
        if predicted > cfg.max_call_ms:
            return dict(status="unsupported", message=(
                f"skipped: a call would take about {predicted:.0f} ms (linear from {prev_ms:.0f} ms at "
                f"{prev_events} events) > max_call_ms {cfg.max_call_ms:.0f}"))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            result = run_point(backend, inputs, mode, dtype, device, cfg)
        # RuntimeWarnings are how backends report silent fallbacks (e.g. compiled flex running eager)
        seen = dict.fromkeys(" ".join(str(w.message).split())[:200] for w in caught
                             if issubclass(w.category, RuntimeWarning))
        if seen:
            result["message"] = "; ".join(filter(None, [result["message"], *(f"warning: {m}" for m in seen)]))
        last_call[key] = (n_events, result["_est_ms"])
        return result
    except UnsupportedError as e:
        return dict(status="unsupported", message=_one_line(e))
    except KeyError as e:  # an unknown backend name: a row, not a crash
        return dict(status="error", message=_one_line(e))
    except Exception as e:  # noqa: BLE001 - OOM, compile failures, anything: a row, and the grid goes on
        oom, message = _is_oom(e), _one_line(e)
    _free(device)  # outside the except block: the traceback and the frames it held are gone
    if oom:
        stopped[key] = f"out of memory at {n_events} events"
        return dict(status="oom", message=message)
    return dict(status="error", message=message)


def read_results(csv_path: str | Path) -> pd.DataFrame:
    """A benchmark CSV as a DataFrame with numeric columns parsed (message never NaN)."""
    df = pd.read_csv(csv_path, dtype={"message": "string"})
    for c in LATER_COLUMNS:
        if c not in df.columns:
            df[c] = float("nan")
    missing = [c for c in CSV_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{csv_path}: not a benchmark CSV, missing columns {missing}")
    df["message"] = df["message"].fillna("").astype(str)
    return df


def config_dict(cfg: BenchConfig) -> dict:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in asdict(cfg).items()}
