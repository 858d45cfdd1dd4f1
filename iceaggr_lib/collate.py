"""The packed, DOM-sorted batch: events -> DOM-grouped pulses, with no Python loop over pulses or DOMs.

The packed ("sequence stacked") layout
--------------------------------------
Every backend in ``iceaggr_lib.backends`` reads one layout, described here once.

A batch of E events holds N pulses in D DOMs (a DOM = one sensor within one event; the same sensor
hit in two events is two DOMs). Pulses are sorted by (event, sensor, time) and stacked into one
sequence, so each DOM is a contiguous run of rows::

    pulse row      0   1   2   3   4   5   6   7   8        (N = 9 pulses)
    event          0   0   0   0   0   1   1   1   1
    sensor        17  17  17  40  52  17  33  33  90
    DOM            0   0   0   1   2   3   4   4   5        pulse_to_dom_idx
    cu_seqlens    [0,          3,  4,  5,  6,      8,  9]   (int32, D + 1 entries)
    dom_pulse_counts [3, 1, 1, 1, 2, 1]                     (= diff(cu_seqlens))
    dom_to_event_idx [0, 0, 0, 1, 1, 1]
    event_dom_counts [3, 3]

DOM ``d`` owns rows ``cu_seqlens[d] : cu_seqlens[d + 1]``; attention is allowed only inside such a
run ("document masking"), and pooling averages each run into one row per DOM. ``cu_seqlens`` is
exactly the cumulative-sequence-length vector that varlen/FlashAttention kernels take, and
``max_dom_pulses`` is their ``max_seqlen``.

Per-pulse features (``pulse_features``, float32, columns in ``PULSE_FEATURE_NAMES``) are scaled to
order one: DOM position x, y, z in units of 500 m, time as (t - 1e4 ns) / 3e4 ns, log10 of the
charge in photo-electrons, and the auxiliary flag as 0/1.

Two ways in
-----------
* ``PulseTable`` holds many events (a whole Kaggle batch file) already sorted by
  (event, sensor, time) with the DOM boundaries precomputed; ``PulseTable.batch(e0, e1)`` builds the
  ``DomBatch`` of consecutive events e0..e1-1 by slicing plus offset arithmetic. This is the fast path
  the data reader and the benchmarks use.
* ``collate_events(events)`` takes any list of event records (dicts, as a ``torch.utils.data``
  Dataset yields them) and does the sort itself, vectorised.

Speed: ``PulseTable`` computes the float32 feature matrix (and per-DOM indices) once, before its
first batch, so ``batch`` is a copy of contiguous rows plus offset arithmetic
(``python -m iceaggr_lib.collate_bench`` measures it). ``concat_batches`` joins DomBatches of
consecutive ranges (e.g. across two files).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping, Sequence

import numpy as np
import torch

PULSE_FEATURE_NAMES = ("x", "y", "z", "time", "log10_charge", "auxiliary")
N_PULSE_FEATURES = len(PULSE_FEATURE_NAMES)

POSITION_SCALE_M = 500.0
TIME_OFFSET_NS = 1.0e4
TIME_SCALE_NS = 3.0e4
MIN_CHARGE_PE = 1e-3  # charges are clipped here before log10, so a zero charge stays finite


@dataclass
class DomBatch:
    """One packed batch of events, pulses grouped by DOM (layout in the module docstring).

    Tensors live on one device; ``to(device)`` moves them all. Names follow the seed project's
    collate where it had them (``pulse_features``, ``pulse_to_dom_idx``, ``dom_pulse_counts``).
    """

    pulse_features: torch.Tensor  # (N, N_PULSE_FEATURES) float32
    pulse_to_dom_idx: torch.Tensor  # (N,) int64, DOM of each pulse, non-decreasing
    dom_pulse_counts: torch.Tensor  # (D,) int64, pulses in each DOM (>= 1)
    cu_seqlens: torch.Tensor  # (D + 1,) int32, DOM d owns pulse rows cu_seqlens[d]:cu_seqlens[d+1]
    max_dom_pulses: int  # max(dom_pulse_counts), the varlen kernels' max_seqlen
    dom_to_event_idx: torch.Tensor  # (D,) int64, event (0..E-1 within the batch) of each DOM
    dom_ids: torch.Tensor  # (D,) int64, sensor id of each DOM
    dom_positions: torch.Tensor  # (D, 3) float32, x, y, z in metres
    event_dom_counts: torch.Tensor  # (E,) int64, DOMs per event
    event_pulse_counts: torch.Tensor  # (E,) int64, pulses per event
    event_ids: torch.Tensor  # (E,) int64, the data set's event ids
    targets: torch.Tensor | None = None  # (E, 2) float32 azimuth, zenith (radians); None for test

    @property
    def n_pulses(self) -> int:
        return int(self.pulse_features.shape[0])

    @property
    def n_doms(self) -> int:
        return int(self.dom_pulse_counts.shape[0])

    @property
    def n_events(self) -> int:
        return int(self.event_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.pulse_features.device

    def to(self, device: str | torch.device, non_blocking: bool = False) -> "DomBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
        return DomBatch(**moved)

    def __repr__(self) -> str:
        return (f"DomBatch(n_events={self.n_events}, n_pulses={self.n_pulses}, n_doms={self.n_doms}, "
                f"max_dom_pulses={self.max_dom_pulses}, device={self.device})")


def pulse_features_from_columns(position_xyz: np.ndarray, time: np.ndarray, charge: np.ndarray,
                                auxiliary: np.ndarray) -> np.ndarray:
    """The (N, 6) float32 feature matrix, columns as ``PULSE_FEATURE_NAMES`` (scaling in the module doc)."""
    n = len(time)
    out = np.empty((n, N_PULSE_FEATURES), dtype=np.float32)
    np.multiply(position_xyz, 1.0 / POSITION_SCALE_M, out=out[:, 0:3], casting="unsafe")
    out[:, 3] = (np.asarray(time, dtype=np.float32) - np.float32(TIME_OFFSET_NS)) * np.float32(1.0 / TIME_SCALE_NS)
    out[:, 4] = np.log10(np.maximum(np.asarray(charge, dtype=np.float32), np.float32(MIN_CHARGE_PE)))
    out[:, 5] = auxiliary
    return out


@dataclass
class PulseTable:
    """Pulses of many events sorted by (event, sensor, time), DOM boundaries precomputed.

    A whole Kaggle batch file is loaded into one of these once; ``batch(e0, e1)`` then slices out
    consecutive events. Offsets are int64 row indices into the pulse columns. ``pulse_features`` (the
    (N, 6) float32 feature matrix) and the per-pulse DOM index, per-DOM event index and DOM positions
    are computed once, by ``precompute()`` - on the first ``batch`` call, so a table only streamed for
    statistics never pays for them - and a batch is then contiguous row copies minus offsets.
    """

    event_ids: np.ndarray  # (E,) int64
    event_pulse_offsets: np.ndarray  # (E + 1,) int64: event e owns pulses [off[e], off[e+1])
    event_dom_offsets: np.ndarray  # (E + 1,) int64: event e owns DOMs [off[e], off[e+1])
    dom_pulse_offsets: np.ndarray  # (D + 1,) int64: DOM d owns pulses [off[d], off[d+1])
    dom_sensor_ids: np.ndarray  # (D,) int64
    sensor_id: np.ndarray  # (N,) int64
    time: np.ndarray  # (N,) float64, ns
    charge: np.ndarray  # (N,) float64, p.e.
    auxiliary: np.ndarray  # (N,) bool
    sensor_xyz: np.ndarray  # (n_sensors, 3) float64, geometry indexed by sensor id
    targets: np.ndarray | None = None  # (E, 2) float64 azimuth, zenith
    pulse_features: np.ndarray | None = None  # (N, N_PULSE_FEATURES) float32, see the module doc
    # Precomputed once (from_pulses, or the first batch call) so that batch() only slices:
    pulse_dom_index: np.ndarray | None = field(default=None, repr=False)  # (N,) int32, table-wide DOM of each pulse
    dom_event_index: np.ndarray | None = field(default=None, repr=False)  # (D,) int32, table-wide event of each DOM
    dom_positions: np.ndarray | None = field(default=None, repr=False)  # (D, 3) float32, metres

    @property
    def n_events(self) -> int:
        return int(self.event_ids.shape[0])

    @property
    def n_pulses(self) -> int:
        return int(self.sensor_id.shape[0])

    @property
    def n_doms(self) -> int:
        return int(self.dom_sensor_ids.shape[0])

    @classmethod
    def from_pulses(cls, event_index: np.ndarray, event_ids: np.ndarray, sensor_id: np.ndarray,
                    time: np.ndarray, charge: np.ndarray, auxiliary: np.ndarray, sensor_xyz: np.ndarray,
                    targets: np.ndarray | None = None) -> "PulseTable":
        """Sort pulses by (event, sensor, time) and find the DOM boundaries, all vectorised.

        ``event_index`` (N,) gives each pulse's event as an index 0..E-1 into ``event_ids``; every
        event must own at least one pulse. ``sensor_xyz`` is indexed by sensor id. Input already in
        the Kaggle order (events contiguous, time-ordered within each event) needs one integer sort;
        input already in (event, sensor, time) order needs none; any other order is sorted fully.
        """
        event_index = np.asarray(event_index, dtype=np.int64)
        sensor_id = np.asarray(sensor_id, dtype=np.int64)
        time = np.asarray(time, dtype=np.float64)
        event_ids = np.asarray(event_ids, dtype=np.int64)
        sensor_xyz = np.asarray(sensor_xyz, dtype=np.float64)
        n_events, n_sensors, n = len(event_ids), len(sensor_xyz), len(event_index)
        if not (len(sensor_id) == len(time) == len(charge) == len(auxiliary) == n):
            raise ValueError("PulseTable.from_pulses: pulse columns differ in length")
        if n and (sensor_id.min() < 0 or sensor_id.max() >= n_sensors):
            bad = sensor_id[(sensor_id < 0) | (sensor_id >= n_sensors)][0]
            raise ValueError(f"PulseTable.from_pulses: sensor id {bad} is not in the geometry (0..{n_sensors - 1})")
        if n and (event_index.min() < 0 or event_index.max() >= n_events):
            raise ValueError(f"PulseTable.from_pulses: event_index outside 0..{n_events - 1}")
        if targets is not None and np.shape(targets) != (n_events, 2):
            raise ValueError(f"PulseTable.from_pulses: targets must be ({n_events}, 2), got {np.shape(targets)}")

        order = _sort_order(event_index, sensor_id, time, n_sensors)
        if order is None:  # already in (event, sensor, time) order
            event_sorted, sensor_sorted = event_index, sensor_id
            time_sorted = time
            charge_sorted = np.asarray(charge, dtype=np.float64)
            aux_sorted = np.asarray(auxiliary, dtype=bool)
        else:
            event_sorted, sensor_sorted, time_sorted = event_index[order], sensor_id[order], time[order]
            charge_sorted = np.asarray(charge, dtype=np.float64)[order]
            aux_sorted = np.asarray(auxiliary, dtype=bool)[order]

        new_dom = np.empty(n, dtype=bool)
        if n:
            new_dom[0] = True
            # a new DOM starts where the sensor or the event changes
            np.not_equal(sensor_sorted[1:], sensor_sorted[:-1], out=new_dom[1:])
            new_dom[1:] |= event_sorted[1:] != event_sorted[:-1]
        dom_starts = np.flatnonzero(new_dom)
        dom_pulse_offsets = np.append(dom_starts, n).astype(np.int64)
        event_pulse_offsets = np.searchsorted(event_sorted, np.arange(n_events + 1), side="left").astype(np.int64)
        empty = np.flatnonzero(np.diff(event_pulse_offsets) == 0)
        if len(empty):
            raise ValueError(f"PulseTable.from_pulses: event {event_ids[empty[0]]} has no pulses "
                             f"({len(empty)} empty event(s) in all)")
        event_dom_offsets = np.searchsorted(dom_starts, event_pulse_offsets, side="left").astype(np.int64)
        return cls(
            event_ids=event_ids,
            event_pulse_offsets=event_pulse_offsets,
            event_dom_offsets=event_dom_offsets,
            dom_pulse_offsets=dom_pulse_offsets,
            dom_sensor_ids=sensor_sorted[dom_starts],
            sensor_id=sensor_sorted,
            time=time_sorted,
            charge=charge_sorted,
            auxiliary=aux_sorted,
            sensor_xyz=sensor_xyz,
            targets=None if targets is None else np.asarray(targets, dtype=np.float64),
        )

    def precompute(self) -> None:
        """Compute the feature matrix and the per-pulse / per-DOM indices that ``batch`` slices (once)."""
        if self.pulse_features is None:
            self.pulse_features = pulse_features_from_columns(np.take(self.sensor_xyz, self.sensor_id, axis=0),
                                                              self.time, self.charge, self.auxiliary)
        if self.pulse_dom_index is None:
            self.pulse_dom_index = np.repeat(np.arange(self.n_doms, dtype=np.int32), np.diff(self.dom_pulse_offsets))
        if self.dom_event_index is None:
            self.dom_event_index = np.repeat(np.arange(self.n_events, dtype=np.int32), np.diff(self.event_dom_offsets))
        if self.dom_positions is None:
            self.dom_positions = np.take(self.sensor_xyz.astype(np.float32), self.dom_sensor_ids, axis=0)

    def batch(self, e0: int, e1: int) -> DomBatch:
        """The DomBatch of consecutive events ``e0 .. e1-1``: contiguous row copies minus offsets."""
        if not 0 <= e0 < e1 <= self.n_events:
            raise IndexError(f"event range [{e0}, {e1}) is outside this table of {self.n_events} events")
        if self.pulse_dom_index is None or self.dom_event_index is None or self.dom_positions is None \
                or self.pulse_features is None:
            self.precompute()
        p0, p1 = int(self.event_pulse_offsets[e0]), int(self.event_pulse_offsets[e1])
        d0, d1 = int(self.event_dom_offsets[e0]), int(self.event_dom_offsets[e1])
        cu = self.dom_pulse_offsets[d0:d1 + 1] - p0
        # x[1:] - x[:-1] rather than np.diff, and ufunc.reduce rather than .max(): same result, less call
        # overhead, which is what dominates a batch of a few events
        dom_pulse_counts = cu[1:] - cu[:-1]
        event_doms = self.event_dom_offsets[e0:e1 + 1]
        event_pulses = self.event_pulse_offsets[e0:e1 + 1]
        # every array is a copy: batches never alias (or pin) the table
        return DomBatch(
            pulse_features=torch.from_numpy(self.pulse_features[p0:p1].copy()),
            pulse_to_dom_idx=torch.from_numpy(np.subtract(self.pulse_dom_index[p0:p1], d0, dtype=np.int64)),
            dom_pulse_counts=torch.from_numpy(dom_pulse_counts),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            max_dom_pulses=int(np.maximum.reduce(dom_pulse_counts)) if d1 > d0 else 0,
            dom_to_event_idx=torch.from_numpy(np.subtract(self.dom_event_index[d0:d1], e0, dtype=np.int64)),
            dom_ids=torch.from_numpy(self.dom_sensor_ids[d0:d1].astype(np.int64, copy=True)),
            dom_positions=torch.from_numpy(self.dom_positions[d0:d1].copy()),
            event_dom_counts=torch.from_numpy(event_doms[1:] - event_doms[:-1]),
            event_pulse_counts=torch.from_numpy(event_pulses[1:] - event_pulses[:-1]),
            event_ids=torch.from_numpy(self.event_ids[e0:e1].copy()),
            targets=None if self.targets is None else torch.from_numpy(self.targets[e0:e1].astype(np.float32)),
        )

    def batches(self, batch_size: int):
        """Yield DomBatches of ``batch_size`` consecutive events (the last one may be shorter)."""
        for e0 in range(0, self.n_events, batch_size):
            yield self.batch(e0, min(e0 + batch_size, self.n_events))

    def slice_events(self, e0: int, e1: int) -> "PulseTable":
        """The sub-table of events ``e0 .. e1-1`` (views of this table's columns, offsets rebased)."""
        if not 0 <= e0 < e1 <= self.n_events:
            raise IndexError(f"event range [{e0}, {e1}) is outside this table of {self.n_events} events")
        p0, p1 = int(self.event_pulse_offsets[e0]), int(self.event_pulse_offsets[e1])
        d0, d1 = int(self.event_dom_offsets[e0]), int(self.event_dom_offsets[e1])
        return PulseTable(
            event_ids=self.event_ids[e0:e1],
            event_pulse_offsets=self.event_pulse_offsets[e0:e1 + 1] - p0,
            event_dom_offsets=self.event_dom_offsets[e0:e1 + 1] - d0,
            dom_pulse_offsets=self.dom_pulse_offsets[d0:d1 + 1] - p0,
            dom_sensor_ids=self.dom_sensor_ids[d0:d1],
            sensor_id=self.sensor_id[p0:p1], time=self.time[p0:p1], charge=self.charge[p0:p1],
            auxiliary=self.auxiliary[p0:p1], sensor_xyz=self.sensor_xyz,
            targets=None if self.targets is None else self.targets[e0:e1],
            pulse_features=None if self.pulse_features is None else self.pulse_features[p0:p1],
            dom_positions=None if self.dom_positions is None else self.dom_positions[d0:d1],
            # the index arrays are rebuilt for the sub-table (they count from its first DOM / event)
        )


def _sort_order(event_index: np.ndarray, sensor_id: np.ndarray, time: np.ndarray, n_sensors: int) -> np.ndarray | None:
    """The permutation into (event, sensor, time) order, or None when the pulses are in it already.

    Three cases, cheapest first: already sorted (no sort); Kaggle order, i.e. events contiguous and
    ascending with time non-decreasing inside each (one stable integer sort on the (event, sensor)
    key keeps the time order); anything else (a full three-key stable sort, arrow's being the fastest).
    """
    n = len(event_index)
    if n < 2:
        return None
    key = event_index * np.int64(max(n_sensors, 1)) + sensor_id
    same_key = key[1:] == key[:-1]
    time_up = time[1:] >= time[:-1]
    if np.all(key[1:] >= key[:-1]) and np.all(time_up | ~same_key):
        return None
    event_up = event_index[1:] >= event_index[:-1]
    if np.all(event_up) and np.all(time_up | (event_index[1:] != event_index[:-1])):
        return np.argsort(key, kind="stable")
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = pa.table({"key": key, "time": time})
    return pc.sort_indices(columns, sort_keys=[("key", "ascending"), ("time", "ascending")]).to_numpy()


def concat_batches(batches: Sequence[DomBatch]) -> DomBatch:
    """Join DomBatches (e.g. consecutive event ranges from two files) into one; offsets shifted, no loop over pulses."""
    if not batches:
        raise ValueError("concat_batches: empty list")
    if len(batches) == 1:
        return batches[0]
    dom_shift = np.cumsum([0] + [b.n_doms for b in batches[:-1]])
    pulse_shift = np.cumsum([0] + [b.n_pulses for b in batches[:-1]])
    event_shift = np.cumsum([0] + [b.n_events for b in batches[:-1]])
    with_targets = [b.targets is not None for b in batches]
    if any(with_targets) and not all(with_targets):
        raise ValueError("concat_batches: some batches have targets and some do not")
    cu = [batches[0].cu_seqlens] + [b.cu_seqlens[1:] + int(s) for b, s in zip(batches[1:], pulse_shift[1:])]
    cu_seqlens = torch.cat([c.to(torch.int64) for c in cu])
    if int(cu_seqlens[-1]) > torch.iinfo(torch.int32).max:
        raise ValueError("concat_batches: more pulses than int32 cu_seqlens can index")
    return DomBatch(
        pulse_features=torch.cat([b.pulse_features for b in batches]),
        pulse_to_dom_idx=torch.cat([b.pulse_to_dom_idx + int(s) for b, s in zip(batches, dom_shift)]),
        dom_pulse_counts=torch.cat([b.dom_pulse_counts for b in batches]),
        cu_seqlens=cu_seqlens.to(torch.int32),
        max_dom_pulses=max(b.max_dom_pulses for b in batches),
        dom_to_event_idx=torch.cat([b.dom_to_event_idx + int(s) for b, s in zip(batches, event_shift)]),
        dom_ids=torch.cat([b.dom_ids for b in batches]),
        dom_positions=torch.cat([b.dom_positions for b in batches]),
        event_dom_counts=torch.cat([b.event_dom_counts for b in batches]),
        event_pulse_counts=torch.cat([b.event_pulse_counts for b in batches]),
        event_ids=torch.cat([b.event_ids for b in batches]),
        targets=torch.cat([b.targets for b in batches]) if all(with_targets) else None,
    )


def collate_events(events: Sequence[Mapping], sensor_xyz: np.ndarray | None = None) -> DomBatch:
    """Collate a list of event records into one DomBatch, vectorised (one sort, no loop over pulses).

    Each record is a mapping with ``event_id`` (int), ``sensor_id``, ``time``, ``charge``,
    ``auxiliary`` (arrays of one length, at least one pulse), optional ``azimuth``/``zenith``, and
    either ``sensor_xyz`` (the geometry, indexed by sensor id) or ``pos`` ((n_pulses, 3) positions);
    ``sensor_xyz`` may also be passed once for the whole list.
    """
    if not events:
        raise ValueError("collate_events: empty list of events")
    counts = np.array([len(e["sensor_id"]) for e in events], dtype=np.int64)
    if (counts == 0).any():
        bad = events[int(np.flatnonzero(counts == 0)[0])].get("event_id")
        raise ValueError(f"collate_events: event {bad} has no pulses")
    cat = {c: np.concatenate([np.asarray(e[c]) for e in events]) for c in ("sensor_id", "time", "charge", "auxiliary")}
    if sensor_xyz is None:
        sensor_xyz = events[0].get("sensor_xyz")
    if sensor_xyz is None:
        # Positions given per pulse: build a geometry for the sensors seen in this batch.
        pos = np.concatenate([np.asarray(e["pos"], dtype=np.float64) for e in events])
        n_sensors = int(cat["sensor_id"].max()) + 1
        sensor_xyz = np.zeros((n_sensors, 3))
        sensor_xyz[cat["sensor_id"]] = pos
    targets = None
    if all("azimuth" in e and "zenith" in e for e in events):
        targets = np.array([[e["azimuth"], e["zenith"]] for e in events], dtype=np.float64)
    table = PulseTable.from_pulses(
        event_index=np.repeat(np.arange(len(events), dtype=np.int64), counts),
        event_ids=np.array([e["event_id"] for e in events], dtype=np.int64),
        sensor_id=cat["sensor_id"], time=cat["time"], charge=cat["charge"], auxiliary=cat["auxiliary"],
        sensor_xyz=sensor_xyz, targets=targets)
    return table.batch(0, table.n_events)
