"""Reader for the Kaggle "IceCube - Neutrinos in Deep Ice" layout (real data or the embedded sample).

Layout (``data_dir``)::

    train_meta.parquet        batch_id, event_id, first_pulse_index, last_pulse_index (inclusive), azimuth, zenith
    test_meta.parquet         the same without azimuth, zenith
    train/batch_<N>.parquet   one row per pulse, index event_id: sensor_id int16, time int64, charge float64, auxiliary bool
    test/batch_<N>.parquet
    sensor_geometry.csv       sensor_id,x,y,z  (its row count is the detector size; nothing assumes 5160)

``KaggleDataset`` reads the meta rows of the batch files present (pyarrow, only the needed columns),
and loads a batch file on demand into a ``PulseTable`` sorted by (event, sensor, time), keeping the
``cache_files`` most recently used ones (memory stays bounded: a real file is ~32.8 M pulses). Events
are numbered 0..n_events-1 in (batch_id, pulse position) order across the files.

Every check raises ``DataFormatError`` naming the file and the problem: missing file or directory,
missing or mistyped column, null values, meta pulse ranges outside the batch file or not matching
its event_id column, an event with no pulses, a sensor id not in the geometry, NaN/inf time or charge.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from iceaggr_lib.collate import DomBatch, PulseTable, concat_batches
from iceaggr_lib.data.errors import DataFormatError
from iceaggr_lib.data.geometry import load_geometry

SPLITS = ("train", "test")
META_INT_COLUMNS = ("batch_id", "event_id", "first_pulse_index", "last_pulse_index")
TARGET_COLUMNS = ("azimuth", "zenith")
PULSE_COLUMNS = ("event_id", "sensor_id", "time", "charge", "auxiliary")
BATCH_FILE = re.compile(r"^batch_(\d+)\.parquet$")

# Accepted arrow types per column (the Kaggle files use the first one of each).
_TYPE_CHECKS = {
    "batch_id": (pa.types.is_integer, "integer"),
    "event_id": (pa.types.is_integer, "integer"),
    "first_pulse_index": (pa.types.is_integer, "integer"),
    "last_pulse_index": (pa.types.is_integer, "integer"),
    "azimuth": (pa.types.is_floating, "floating point"),
    "zenith": (pa.types.is_floating, "floating point"),
    "sensor_id": (pa.types.is_integer, "integer (int16)"),
    "time": (lambda t: pa.types.is_integer(t) or pa.types.is_floating(t), "integer or floating (int64 ns)"),
    "charge": (lambda t: pa.types.is_floating(t) or pa.types.is_integer(t), "floating (float64 p.e.)"),
    "auxiliary": (pa.types.is_boolean, "boolean"),
}


def _schema_of(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except Exception as err:
        raise DataFormatError(f"{path}: not a readable parquet file: {err}") from err


def _read_columns(path: Path, columns: tuple[str, ...], filters=None) -> pa.Table:
    """Read ``columns`` of a parquet file after checking that each exists with an accepted type."""
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    schema = _schema_of(path)
    for column in columns:
        if column not in schema.names:
            raise DataFormatError(f"{path}: missing column {column!r} (has {schema.names})")
        check, expected = _TYPE_CHECKS[column]
        if not check(schema.field(column).type):
            raise DataFormatError(f"{path}: column {column!r} has type {schema.field(column).type}, expected {expected}")
    try:
        table = pq.read_table(path, columns=list(columns), filters=filters)
    except Exception as err:
        raise DataFormatError(f"{path}: cannot read columns {list(columns)}: {err}") from err
    for column in columns:
        if table.column(column).null_count:
            raise DataFormatError(f"{path}: column {column!r} has {table.column(column).null_count} null values")
    return table


def _np(table: pa.Table, column: str, dtype) -> np.ndarray:
    return table.column(column).to_numpy().astype(dtype, copy=False)


class KaggleDataset:
    """Events of one split of a Kaggle-layout directory; see the module docstring.

    ``len(ds)`` events; ``ds[i]`` an event dict (for ``torch.utils.data.DataLoader`` with
    ``collate_fn=collate_events``); ``ds.batch(first_event, n_events)`` a DomBatch of consecutive
    events via the cached sorted tables (the fast path); ``iter_batches``; ``iter_tables`` streams
    whole files; ``table(batch_id)`` one file's PulseTable.

    ``batch_ids`` restricts the reader to those batch files (default: every ``batch_<N>.parquet``
    present in ``<data_dir>/<split>/``); only their meta rows are read.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", cache_files: int = 2,
                 batch_ids: list[int] | None = None, geometry_path: str | Path | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if cache_files < 1:
            raise ValueError(f"cache_files must be >= 1, got {cache_files}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.cache_files = int(cache_files)
        self.has_targets = split == "train"
        if not self.data_dir.is_dir():
            raise DataFormatError(f"{self.data_dir}: data directory not found")
        self.split_dir = self.data_dir / split
        if not self.split_dir.is_dir():
            raise DataFormatError(f"{self.split_dir}: split directory not found (expected {split}/batch_<N>.parquet files)")
        self.meta_path = self.data_dir / f"{split}_meta.parquet"
        self.geometry_path = Path(geometry_path) if geometry_path is not None else self.data_dir / "sensor_geometry.csv"
        self.sensor_xyz = load_geometry(self.geometry_path)

        present = {int(m.group(1)): self.split_dir / name
                   for name in (p.name for p in self.split_dir.iterdir()) if (m := BATCH_FILE.match(name))}
        if batch_ids is None:
            if not present:
                raise DataFormatError(f"{self.split_dir}: no batch_<N>.parquet files")
            batch_ids = sorted(present)
        else:
            batch_ids = sorted(int(b) for b in batch_ids)
            for b in batch_ids:
                if b not in present:
                    raise DataFormatError(f"{self.split_dir / f'batch_{b}.parquet'}: file not found")
        self.batch_ids = batch_ids
        self._paths = {b: present[b] for b in batch_ids}
        self._load_meta()
        self._cache: OrderedDict[int, PulseTable] = OrderedDict()

    # ---- meta -------------------------------------------------------------------------------------------
    def _load_meta(self) -> None:
        columns = META_INT_COLUMNS + (TARGET_COLUMNS if self.has_targets else ())
        meta = _read_columns(self.meta_path, columns, filters=[("batch_id", "in", self.batch_ids)])
        batch = _np(meta, "batch_id", np.int64)
        first = _np(meta, "first_pulse_index", np.int64)
        last = _np(meta, "last_pulse_index", np.int64)
        event_id = _np(meta, "event_id", np.int64)
        order = None
        if len(batch) > 1 and not (np.all(batch[1:] >= batch[:-1])
                                   and np.all((first[1:] > first[:-1]) | (batch[1:] != batch[:-1]))):
            order = np.lexsort((first, batch))
        take = (lambda a: a) if order is None else (lambda a: a[order])
        self.meta_batch_id, self.meta_event_id = take(batch), take(event_id)
        self.meta_first, self.meta_last = take(first), take(last)
        self.meta_targets = (np.stack([take(_np(meta, c, np.float64)) for c in TARGET_COLUMNS], axis=1)
                             if self.has_targets else None)
        if self.meta_targets is not None and not np.isfinite(self.meta_targets).all():
            i = int(np.flatnonzero(~np.isfinite(self.meta_targets).all(axis=1))[0])
            raise DataFormatError(f"{self.meta_path}: event {self.meta_event_id[i]} has a non-finite azimuth/zenith "
                                  f"{self.meta_targets[i].tolist()}")
        empty = np.flatnonzero(self.meta_last < self.meta_first)
        if len(empty):
            i = empty[0]
            raise DataFormatError(f"{self.meta_path}: event {self.meta_event_id[i]} (batch {self.meta_batch_id[i]}) "
                                  f"has no pulses (first_pulse_index {self.meta_first[i]} > last_pulse_index "
                                  f"{self.meta_last[i]}); {len(empty)} such event(s)")
        if (self.meta_first < 0).any():
            i = int(np.flatnonzero(self.meta_first < 0)[0])
            raise DataFormatError(f"{self.meta_path}: event {self.meta_event_id[i]} has a negative first_pulse_index")
        # file batch_ids[f] holds the split's events file_start[f] .. file_start[f + 1] - 1
        self.file_start = np.searchsorted(self.meta_batch_id, np.asarray(self.batch_ids + [np.iinfo(np.int64).max]))
        counts = np.diff(self.file_start)
        if (counts == 0).any():
            b = self.batch_ids[int(np.flatnonzero(counts == 0)[0])]
            raise DataFormatError(f"{self.meta_path}: no events for {self._paths[b]}")
        self.n_events = int(len(self.meta_event_id))

    def __len__(self) -> int:
        return self.n_events

    def __getstate__(self) -> dict:
        """Pickled (e.g. into DataLoader workers) without the cached tables; each worker loads its own."""
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    # ---- batch files ------------------------------------------------------------------------------------
    def table(self, batch_id: int) -> PulseTable:
        """The sorted PulseTable of one batch file (all its events in the meta), LRU-cached."""
        batch_id = int(batch_id)
        if batch_id in self._cache:
            self._cache.move_to_end(batch_id)
            return self._cache[batch_id]
        if batch_id not in self._paths:
            raise KeyError(f"batch {batch_id} is not among this reader's files {self.batch_ids}")
        f = self.batch_ids.index(batch_id)
        table = self._load_table(self._paths[batch_id], self.file_start[f], self.file_start[f + 1])
        self._cache[batch_id] = table
        while len(self._cache) > self.cache_files:
            self._cache.popitem(last=False)
        return table

    def _load_table(self, path: Path, m0: int, m1: int) -> PulseTable:
        """Read, check and sort the pulses of meta rows m0..m1-1 (all in ``path``)."""
        pulses = _read_columns(path, PULSE_COLUMNS)
        n_rows = pulses.num_rows
        first, last = self.meta_first[m0:m1], self.meta_last[m0:m1]
        event_ids = self.meta_event_id[m0:m1]
        outside = np.flatnonzero(last >= n_rows)
        if len(outside):
            i = outside[0]
            raise DataFormatError(f"{path}: meta ({self.meta_path.name}) gives event {event_ids[i]} pulse rows "
                                  f"{first[i]}..{last[i]}, outside this file's {n_rows} rows "
                                  f"({len(outside)} event(s) out of range)")
        if len(first) > 1 and (first[1:] <= last[:-1]).any():
            i = int(np.flatnonzero(first[1:] <= last[:-1])[0])
            raise DataFormatError(f"{path}: meta pulse ranges of events {event_ids[i]} and {event_ids[i + 1]} overlap")
        counts = last - first + 1
        contiguous = first[0] == 0 and last[-1] == n_rows - 1 and np.all(first[1:] == last[:-1] + 1)
        rows = None if contiguous else np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        # every row of an event's range must carry that event's id in the file's event_id column
        file_event = pulses.column("event_id").to_numpy()
        file_event = file_event if rows is None else file_event[rows]
        wrong = file_event != np.repeat(event_ids, counts)
        if wrong.any():
            j = int(np.flatnonzero(wrong)[0])
            i = int(np.searchsorted(np.cumsum(counts), j, side="right"))
            raise DataFormatError(f"{path}: rows {first[i]}..{last[i]} should hold event {event_ids[i]} (meta "
                                  f"{self.meta_path.name}), but row {first[i] + j - (np.cumsum(counts)[i] - counts[i])} "
                                  f"has event_id {file_event[j]} ({int(wrong.sum())} mismatched row(s))")
        column = (lambda name, dtype: _np(pulses, name, dtype)) if rows is None else \
            (lambda name, dtype: _np(pulses, name, dtype)[rows])
        sensor_id = column("sensor_id", np.int64)
        time = column("time", np.float64)
        charge = column("charge", np.float64)
        auxiliary = column("auxiliary", bool)
        event_index = np.repeat(np.arange(m1 - m0, dtype=np.int64), counts)

        n_sensors = len(self.sensor_xyz)
        bad = np.flatnonzero((sensor_id < 0) | (sensor_id >= n_sensors))
        if len(bad):
            raise DataFormatError(f"{path}: sensor_id {sensor_id[bad[0]]} (event {event_ids[event_index[bad[0]]]}) is "
                                  f"not in the geometry {self.geometry_path} (ids 0..{n_sensors - 1}); "
                                  f"{len(bad)} such pulse(s)")
        for name, values in (("time", time), ("charge", charge)):
            finite = np.isfinite(values)
            if not finite.all():
                j = int(np.flatnonzero(~finite)[0])
                raise DataFormatError(f"{path}: column {name!r} has {int((~finite).sum())} NaN/inf value(s), "
                                      f"first in event {event_ids[event_index[j]]}")
        return PulseTable.from_pulses(event_index=event_index, event_ids=event_ids, sensor_id=sensor_id, time=time,
                                      charge=charge, auxiliary=auxiliary, sensor_xyz=self.sensor_xyz,
                                      targets=None if self.meta_targets is None else self.meta_targets[m0:m1])

    def _locate(self, event: int) -> tuple[int, int]:
        """(file position f, event index within the file) of a split-wide event index."""
        if not 0 <= event < self.n_events:
            raise IndexError(f"event {event} is outside this data set of {self.n_events} events")
        f = int(np.searchsorted(self.file_start, event, side="right") - 1)
        return f, event - int(self.file_start[f])

    # ---- events and batches -----------------------------------------------------------------------------
    def __getitem__(self, i: int) -> dict:
        """Event ``i`` as a dict: event_id, sensor_id, time, charge, auxiliary, pos (n, 3) and, for train,
        azimuth, zenith. Pulses in (sensor, time) order."""
        i = int(i)
        if i < 0:
            i += self.n_events
        f, e = self._locate(i)
        t = self.table(self.batch_ids[f])
        p0, p1 = int(t.event_pulse_offsets[e]), int(t.event_pulse_offsets[e + 1])
        sensor_id = t.sensor_id[p0:p1]
        event = {"event_id": int(t.event_ids[e]), "sensor_id": sensor_id.copy(), "time": t.time[p0:p1].copy(),
                 "charge": t.charge[p0:p1].copy(), "auxiliary": t.auxiliary[p0:p1].copy(),
                 "pos": self.sensor_xyz[sensor_id]}
        if t.targets is not None:
            event["azimuth"], event["zenith"] = float(t.targets[e, 0]), float(t.targets[e, 1])
        return event

    def batch(self, first_event: int, n_events: int) -> DomBatch:
        """DomBatch of events ``first_event .. first_event + n_events - 1`` (crossing files is fine)."""
        if n_events < 1 or first_event < 0 or first_event + n_events > self.n_events:
            raise IndexError(f"events [{first_event}, {first_event + n_events}) are outside this data set "
                             f"of {self.n_events} events")
        parts, event, end = [], first_event, first_event + n_events
        while event < end:
            f, e = self._locate(event)
            take = min(end, int(self.file_start[f + 1])) - event
            parts.append(self.table(self.batch_ids[f]).batch(e, e + take))
            event += take
        return concat_batches(parts)

    def iter_batches(self, batch_size: int, max_events: int | None = None) -> Iterator[DomBatch]:
        """DomBatches of ``batch_size`` consecutive events over the whole split (or its first ``max_events``)."""
        end = self.n_events if max_events is None else min(int(max_events), self.n_events)
        for e0 in range(0, end, batch_size):
            yield self.batch(e0, min(batch_size, end - e0))

    def iter_tables(self, max_events: int | None = None) -> Iterator[tuple[Path, PulseTable]]:
        """(path, PulseTable) file by file, for streaming statistics; the last one cut at ``max_events``."""
        left = self.n_events if max_events is None else int(max_events)
        for f, b in enumerate(self.batch_ids):
            if left <= 0:
                return
            table = self.table(b)
            if table.n_events > left:
                table = table.slice_events(0, left)
            left -= table.n_events
            yield self._paths[b], table

    def __repr__(self) -> str:
        return (f"KaggleDataset({str(self.data_dir)!r}, split={self.split!r}, files={len(self.batch_ids)}, "
                f"events={self.n_events}, sensors={len(self.sensor_xyz)})")
