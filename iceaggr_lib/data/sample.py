"""The embedded sample: a physics-flavoured, calibrated generator of IceCube-like events.

No real data ships with the workbook, so it makes its own in the exact Kaggle layout. The generator
is a toy, but each step is the physical one, vectorised over chunks of events (events x string
segments for a coarse cut, then the (event, module) pairs within reach; no loop over pulses):

1. **Event**: a through-going muon track (``track_fraction``) or a point-like cascade. Arrival
   direction isotropic (azimuth uniform, cos zenith uniform); the particle travels opposite to the
   direction it comes from. Tracks cross a disk centred on the detector, perpendicular to the track,
   of radius the detector's horizontal radius plus ``generation_margin_m``; cascade vertices fill a
   cylinder of that radius and the detector's height plus the margin.
2. **Brightness**: an energy-like factor from a power law ``B^-spectral_index`` above 1 (capped at
   ``max_brightness``), a soft component plus a ``hard_fraction`` of events on a harder power law
   (think atmospheric plus astrophysical): the heavy tail is what makes the event-size tail.
3. **Light yield** per module: ``B * track_yield * exp(-d / L) / d`` with ``d`` the perpendicular
   distance to the track (cylindrical spreading), or ``B * cascade_yield * exp(-r / L) / r^2`` from a
   cascade vertex (spherical spreading), ``L`` the effective attenuation length, ``d`` floored at
   ``min_distance_m``.
4. **Photons**: Poisson counts per module with that mean.
5. **Pulses**: photons that arrive close together merge into one pulse; in a DOM with n photons each
   extra photon is a separate pulse with probability ``p_separate * n / (n + merge_photons)`` (a busy
   DOM's light spreads over a longer time), and the pulse count saturates at about
   ``saturation_pulses`` (the digitiser's limit: real DOMs top out at a few hundred pulses).
6. **Times**: direct Cherenkov arrival time (track: ``t0 + (s - d / tan(theta_c)) / c + d n / (c sin(theta_c))``,
   cascade: ``t0 + r n / c``) plus a gamma-distributed scattering delay growing with distance; later
   pulses of a busy DOM trail over ~a microsecond (late light, afterpulses). Integer ns like Kaggle.
7. **Charges**: photons per pulse times a lognormal single-photo-electron response, quantised to
   0.025 p.e. as in the Kaggle files; a DOM's collected charge saturates near ``saturation_pe``.
8. **Noise**: Poisson(``noise_hits_mean``) dark-noise hits per event on random modules at uniform
   times in the readout window.
9. **Auxiliary flag**: ``True`` for pulses of a DOM without a hit neighbour (+-1 or +-2 modules on
   its string) in the same event - the "not part of a local coincidence" meaning of Kaggle's flag;
   isolated noise hits come out auxiliary, dense track light mostly not.
10. **Trigger**: like IceCube's simple-majority trigger, an event is recorded only with at least
   ``trigger_hlc_doms`` DOMs in local coincidence; candidates are drawn in chunks until ``n_events``
   pass (about 40 % do).

Everything depends only on ``seed`` (chunks use ``default_rng([seed, chunk])``), so a data set is
reproducible. The defaults are calibrated so that 20,000 events land near the statistics of a real
Kaggle batch file (``../shared/data/kaggle_batch_statistics.md``; ``sample_statistics`` computes
them, ``tests/test_sample.py`` checks them).

Entry points: ``generate_table`` (in memory, a ``PulseTable``), ``write_dataset`` (files in the
Kaggle layout; ``python -m iceaggr_lib.sample`` is its command line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from iceaggr_lib.collate import PulseTable
from iceaggr_lib.data.geometry import load_geometry, string_index, write_geometry

SPEED_OF_LIGHT_M_PER_NS = 0.299792458
ICE_GROUP_INDEX = 1.35
CHERENKOV_ANGLE = np.arccos(1.0 / 1.32)


@dataclass(frozen=True)
class GeneratorConfig:
    """Knobs of the toy detector response; the defaults are the calibrated ones."""

    track_fraction: float = 0.55
    spectral_index: float = 2.8  # brightness pdf ~ B^-spectral_index, B >= 1 (a soft, atmospheric-like part)
    hard_fraction: float = 0.12  # this fraction of events follows a harder power law instead
    hard_spectral_index: float = 1.65
    max_brightness: float = 1.0e5
    track_yield: float = 35.0  # photons at 1 m from a B = 1 track (before attenuation)
    cascade_yield: float = 550.0  # photons at 1 m from a B = 1 cascade
    attenuation_length_m: float = 30.0
    min_distance_m: float = 3.0
    min_expected_photons: float = 2e-3  # modules below this mean are skipped (Poisson ~ 0)
    generation_margin_m: float = 50.0  # generation radius = detector radius + this
    p_separate: float = 0.8  # probability that a further photon makes its own pulse, in a busy DOM
    merge_photons: float = 0.7  # ... reduced by n / (n + merge_photons) for a DOM with n photons
    saturation_pulses: float = 400.0
    saturation_pe: float = 3.0e4  # a DOM's total charge saturates near this (real tail: ~3e4 p.e.)
    noise_hits_mean: float = 22.0
    trigger_hlc_doms: int = 8  # events need this many DOMs with a hit neighbour (else not recorded)
    t0_ns: float = 10_000.0
    t0_jitter_ns: float = 150.0
    window_ns: tuple[float, float] = (6_000.0, 20_000.0)  # noise hits fall uniformly in here
    late_light_ns: float = 700.0  # scale of the trailing pulses of a busy DOM
    spe_sigma: float = 0.35  # lognormal width of one photo-electron's charge
    chunk_events: int = 1024


DEFAULT_CONFIG = GeneratorConfig()


@dataclass
class GeneratedPulses:
    """Pulses in the Kaggle file order: events contiguous, ordered by time within an event."""

    event_ids: np.ndarray  # (E,) int64, increasing
    event_pulse_counts: np.ndarray  # (E,) int64
    sensor_id: np.ndarray  # (N,) int16
    time: np.ndarray  # (N,) int64 ns
    charge: np.ndarray  # (N,) float64 p.e.
    auxiliary: np.ndarray  # (N,) bool
    azimuth: np.ndarray  # (E,) float64
    zenith: np.ndarray  # (E,) float64

    @property
    def event_index(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.event_ids), dtype=np.int64), self.event_pulse_counts)


def _chunk(rng: np.random.Generator, n: int, xyz: np.ndarray, segments: "_Segments", neighbours: np.ndarray,
           centre: np.ndarray, radius: float, half_height: float, cfg: GeneratorConfig):
    """Generate ``n`` events; returns per-pulse columns (event-local index, sorted by event, time) and targets."""
    m = len(xyz)
    is_track = rng.random(n) < cfg.track_fraction
    azimuth = rng.uniform(0.0, 2.0 * np.pi, n)
    cos_zen = rng.uniform(-1.0, 1.0, n)
    zenith = np.arccos(cos_zen)
    sin_zen = np.sqrt(1.0 - cos_zen ** 2)
    origin = np.stack([sin_zen * np.cos(azimuth), sin_zen * np.sin(azimuth), cos_zen], axis=1)
    direction = -origin  # the particle travels away from where it comes from
    hard = rng.random(n) < cfg.hard_fraction
    index = np.where(hard, cfg.hard_spectral_index, cfg.spectral_index)
    brightness = np.minimum((1.0 - rng.random(n)) ** (-1.0 / (index - 1.0)), cfg.max_brightness)

    # Track: a point on the disk through the centre perpendicular to the direction; cascade: a vertex in a cylinder.
    helper = np.where(np.abs(direction[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(direction, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(direction, e1)
    r_disk = radius * np.sqrt(rng.random(n))
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    track_point = centre + r_disk[:, None] * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)
    r_cyl = radius * np.sqrt(rng.random(n))
    phi_c = rng.uniform(0.0, 2.0 * np.pi, n)
    vertex = centre + np.stack([r_cyl * np.cos(phi_c), r_cyl * np.sin(phi_c),
                                rng.uniform(-half_height, half_height, n)], axis=1)
    point = np.where(is_track[:, None], track_point, vertex)

    # Expected photons fall below `min_expected_photons` beyond a distance d_max (per event): only the
    # (event, module) pairs within d_max get their light computed.
    yield_ = np.where(is_track, cfg.track_yield, cfg.cascade_yield) * brightness
    power = np.where(is_track, 1.0, 2.0)
    d_max = _light_radius(yield_, power, cfg)

    # Coarse cull on string segments (a few neighbouring modules each; triangle inequality), then the
    # exact distance for the modules of the surviving segments only.
    # (events x segments) through two small matrix products: |c - p|^2 = |c|^2 - 2 c.p + |p|^2, s = (c - p).dir
    centre = segments.centre
    seg_r_sq = (np.einsum("ij,ij->i", centre, centre)[None, :] - 2.0 * (point @ centre.T)
                + np.einsum("ij,ij->i", point, point)[:, None])
    seg_s = direction @ centre.T - np.einsum("ij,ij->i", point, direction)[:, None]
    np.subtract(seg_r_sq, np.where(is_track[:, None], seg_s * seg_s, 0.0), out=seg_r_sq)
    reach = d_max[:, None] + segments.radius[None, :]
    ev_seg, seg = np.nonzero(seg_r_sq < reach * reach)
    per_seg = segments.count[seg]
    ev = np.repeat(ev_seg, per_seg)
    mod = np.repeat(segments.start[seg] - (np.cumsum(per_seg) - per_seg), per_seg) + np.arange(int(per_seg.sum()))

    # one coordinate at a time: 1-D gathers are much cheaper than gathering rows of a (n, 3) array
    s_hit = np.zeros(len(ev))
    r_sq = np.zeros(len(ev))
    for k in range(3):  # x, y, z
        rel = np.take(xyz[:, k], mod) - np.take(point[:, k], ev)
        s_hit += rel * np.take(direction[:, k], ev)
        r_sq += rel * rel
    r_hit = np.sqrt(r_sq)
    dist_hit = np.where(is_track[ev], np.sqrt(np.maximum(r_hit ** 2 - s_hit ** 2, 0.0)), r_hit)
    inside = dist_hit < d_max[ev]
    ev, mod, s_hit, r_hit, dist_hit = ev[inside], mod[inside], s_hit[inside], r_hit[inside], dist_hit[inside]
    mu = yield_[ev] * np.exp(-dist_hit / cfg.attenuation_length_m) / np.maximum(dist_hit, cfg.min_distance_m) ** power[ev]
    # Poisson photon counts; for the many faint modules (mu < 0.05) a Bernoulli draw with P(hit) = 1 - exp(-mu)
    # is the same to O(mu^2) and far cheaper.
    faint = mu < 0.05
    photons = np.empty(len(mu), dtype=np.int64)
    photons[faint] = rng.random(int(faint.sum())) < -np.expm1(-mu[faint])
    photons[~faint] = rng.poisson(mu[~faint])
    hit = photons > 0
    ev, mod, photons, dist_hit, s_hit, r_hit = ev[hit], mod[hit], photons[hit], dist_hit[hit], s_hit[hit], r_hit[hit]

    # Photons -> pulses: merging, then saturation.
    # A busier DOM spreads its photons over a longer time (late light), so they separate more often.
    p_sep = cfg.p_separate * photons / (photons + cfg.merge_photons)
    separate = 1 + rng.binomial(photons - 1, p_sep)
    pulses = np.maximum(1, np.rint(separate / (1.0 + separate / cfg.saturation_pulses))).astype(np.int64)

    # Direct arrival time of each hit module.
    t0 = cfg.t0_ns + rng.normal(0.0, cfg.t0_jitter_ns, n)
    c = SPEED_OF_LIGHT_M_PER_NS
    t_track = (s_hit - dist_hit / np.tan(CHERENKOV_ANGLE)) / c + dist_hit * ICE_GROUP_INDEX / (c * np.sin(CHERENKOV_ANGLE))
    t_cascade = r_hit * ICE_GROUP_INDEX / c
    t_direct = t0[ev] + np.where(is_track[ev], t_track, t_cascade)

    # Expand modules to pulses (vectorised): rank of each pulse within its module.
    n_sig = int(pulses.sum())
    dom = np.repeat(np.arange(len(pulses)), pulses)
    starts = np.cumsum(pulses) - pulses
    rank = np.arange(n_sig) - starts[dom]
    scatter_scale = 2.0 + 0.5 * dist_hit[dom]  # ns; more scattering further out
    delay = rng.gamma(1.5, scatter_scale)
    late = rank > 0
    delay[late] += rng.exponential(cfg.late_light_ns, int(late.sum()))
    sig_time = t_direct[dom] + delay
    collected_pe = photons / (1.0 + photons / cfg.saturation_pe)  # the PMT saturates for very bright light
    per_pulse_pe = (collected_pe / pulses)[dom]
    sig_charge = per_pulse_pe * np.exp(rng.normal(0.0, cfg.spe_sigma, n_sig))
    sig_event = ev[dom]
    sig_sensor = mod[dom]

    # Noise: at least one hit for an event without any signal, so that no event is empty.
    has_signal = np.bincount(ev, minlength=n) > 0
    n_noise = rng.poisson(cfg.noise_hits_mean, n)
    n_noise = np.where(has_signal, n_noise, np.maximum(n_noise, 1))
    noise_event = np.repeat(np.arange(n), n_noise)
    k = len(noise_event)
    noise_sensor = rng.integers(0, m, k)
    noise_time = rng.uniform(cfg.window_ns[0], cfg.window_ns[1], k)
    noise_charge = np.exp(rng.normal(-0.1, 0.45, k))

    event = np.concatenate([sig_event, noise_event])
    sensor = np.concatenate([sig_sensor, noise_sensor]).astype(np.int64)
    time = np.rint(np.concatenate([sig_time, noise_time])).astype(np.int64)
    charge = np.concatenate([sig_charge, noise_charge])
    charge = np.maximum(np.rint(charge / 0.025), 1) * 0.025

    # Auxiliary = the DOM has no hit neighbour (+-1, +-2 on its string) in the same event.
    dom_key = np.unique(event * m + sensor)
    dom_sensor = dom_key % m
    hlc = np.zeros(len(dom_key), dtype=bool)
    for j in range(neighbours.shape[1]):  # a handful of neighbour slots, not a loop over DOMs
        nb = neighbours[dom_sensor, j]
        valid = nb >= 0
        probe = dom_key - dom_sensor + nb
        pos = np.minimum(np.searchsorted(dom_key, probe), len(dom_key) - 1)
        hlc |= valid & (dom_key[pos] == probe)
    auxiliary = ~hlc[np.searchsorted(dom_key, event * m + sensor)]

    # Trigger (SMT-like): keep events with at least `trigger_hlc_doms` DOMs in local coincidence.
    triggered = np.bincount(dom_key[hlc] // m, minlength=n) >= cfg.trigger_hlc_doms
    keep = triggered[event]
    event, sensor, time, charge, auxiliary = event[keep], sensor[keep], time[keep], charge[keep], auxiliary[keep]
    time = np.maximum(time, 0)  # (a pulse before t = 0 would need a negative Kaggle time; none is that early)
    order = np.argsort(event * np.int64(1 << 32) + time, kind="stable")
    counts = np.bincount(event, minlength=n)[triggered]
    return (counts, sensor[order], time[order], charge[order], auxiliary[order], azimuth[triggered], zenith[triggered])


@dataclass
class _Segments:
    """Runs of up to ``size`` consecutive modules on one string, for culling far modules cheaply."""

    start: np.ndarray  # first sensor id
    count: np.ndarray  # modules in the run
    centre: np.ndarray  # (S, 3) mean position
    radius: np.ndarray  # largest module distance from the centre

    @classmethod
    def of(cls, xyz: np.ndarray, size: int = 6) -> "_Segments":
        strings = string_index(xyz)
        ids = np.arange(len(xyz))
        string_start = np.searchsorted(strings, strings)  # first id of each module's string
        new = ((ids - string_start) % size) == 0
        seg = np.cumsum(new) - 1
        count = np.bincount(seg)
        centre = np.stack([np.bincount(seg, weights=xyz[:, k]) for k in range(3)], axis=1) / count[:, None]
        radius = np.zeros(len(count))
        np.maximum.at(radius, seg, np.linalg.norm(xyz - centre[seg], axis=1))
        return cls(start=np.flatnonzero(new), count=count, centre=centre, radius=radius + 1e-6)


def _light_radius(yield_: np.ndarray, power: np.ndarray, cfg: GeneratorConfig) -> np.ndarray:
    """Per event, the distance where ``yield * exp(-d / L) / max(d, d_min)^power`` drops to the cut (bisection)."""
    lo = np.zeros_like(yield_)
    hi = np.full_like(yield_, 50.0 * cfg.attenuation_length_m)
    for _ in range(40):  # 40 halvings of a vector of events, not a loop over modules
        mid = 0.5 * (lo + hi)
        light = yield_ * np.exp(-mid / cfg.attenuation_length_m) / np.maximum(mid, cfg.min_distance_m) ** power
        inside = light > cfg.min_expected_photons
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    return hi


def _neighbour_table(sensor_xyz: np.ndarray) -> np.ndarray:
    """(n_sensors, 4) ids of the modules +-1 and +-2 along the same string (-1 where there is none)."""
    strings = string_index(sensor_xyz)
    m = len(sensor_xyz)
    ids = np.arange(m)
    table = np.full((m, 4), -1, dtype=np.int64)
    for j, off in enumerate((-2, -1, 1, 2)):
        other = ids + off
        ok = (other >= 0) & (other < m)
        ok[ok] &= strings[other[ok]] == strings[ids[ok]]
        table[ok, j] = other[ok]
    return table


def generate_pulses(n_events: int, seed: int = 0, sensor_xyz: np.ndarray | None = None,
                    config: GeneratorConfig = DEFAULT_CONFIG) -> GeneratedPulses:
    """Generate ``n_events`` events as Kaggle-ordered pulse columns (see the module docstring)."""
    if n_events < 1:
        raise ValueError(f"n_events must be >= 1, got {n_events}")
    xyz = load_geometry() if sensor_xyz is None else np.asarray(sensor_xyz, dtype=np.float64)
    centre = (xyz.min(axis=0) + xyz.max(axis=0)) / 2.0
    radius = float(np.hypot(*(xyz[:, :2] - centre[:2]).T).max()) + config.generation_margin_m
    half_height = float((xyz[:, 2].max() - xyz[:, 2].min()) / 2.0) + config.generation_margin_m
    segments = _Segments.of(xyz)
    neighbours = _neighbour_table(xyz)
    parts, have, chunk = [], 0, 0
    while have < n_events:  # chunks of candidate events until enough pass the trigger
        rng = np.random.default_rng([seed, chunk])
        part = _chunk(rng, config.chunk_events, xyz, segments, neighbours, centre, radius, half_height, config)
        if chunk > 20 and have == 0:
            raise RuntimeError("the generator's trigger rejects every event; check the geometry and config")
        parts.append(part)
        have += len(part[0])
        chunk += 1
    counts, sensor, time, charge, aux, azimuth, zenith = (np.concatenate(p) for p in zip(*parts))
    n_pulses = int(counts[:n_events].sum())
    counts, azimuth, zenith = counts[:n_events], azimuth[:n_events], zenith[:n_events]
    sensor, time, charge, aux = sensor[:n_pulses], time[:n_pulses], charge[:n_pulses], aux[:n_pulses]
    gaps = np.random.default_rng([seed, 1 << 30]).geometric(0.5, n_events)  # Kaggle ids increase with gaps
    return GeneratedPulses(event_ids=np.cumsum(gaps).astype(np.int64) + 23, event_pulse_counts=counts.astype(np.int64),
                           sensor_id=sensor.astype(np.int16), time=time, charge=charge, auxiliary=aux,
                           azimuth=azimuth, zenith=zenith)


def generate_table(n_events: int, seed: int = 0, sensor_xyz: np.ndarray | None = None,
                   config: GeneratorConfig = DEFAULT_CONFIG) -> PulseTable:
    """``n_events`` generated events as a sorted ``PulseTable`` in memory (no files); geometry default IC86."""
    xyz = load_geometry() if sensor_xyz is None else np.asarray(sensor_xyz, dtype=np.float64)
    g = generate_pulses(n_events, seed, xyz, config)
    return PulseTable.from_pulses(event_index=g.event_index, event_ids=g.event_ids, sensor_id=g.sensor_id,
                                  time=g.time, charge=g.charge, auxiliary=g.auxiliary, sensor_xyz=xyz,
                                  targets=np.stack([g.azimuth, g.zenith], axis=1))


def sample_statistics(table: PulseTable) -> dict:
    """The calibration statistics of a table (the quantities of kaggle_batch_statistics.md)."""
    ev_pulses = np.diff(table.event_pulse_offsets)
    ev_doms = np.diff(table.event_dom_offsets)
    dom_pulses = np.diff(table.dom_pulse_offsets)
    q = np.percentile(dom_pulses, [50, 75, 90, 95, 99, 99.9])
    return {
        "events": table.n_events, "pulses": table.n_pulses, "doms": table.n_doms,
        "pulses_per_event_median": float(np.median(ev_pulses)), "pulses_per_event_mean": float(ev_pulses.mean()),
        "pulses_per_event_max": int(ev_pulses.max()),
        "doms_per_event_median": float(np.median(ev_doms)), "doms_per_event_max": int(ev_doms.max()),
        "pulses_per_dom_p50": float(q[0]), "pulses_per_dom_p75": float(q[1]), "pulses_per_dom_p90": float(q[2]),
        "pulses_per_dom_p95": float(q[3]), "pulses_per_dom_p99": float(q[4]), "pulses_per_dom_p99.9": float(q[5]),
        "pulses_per_dom_max": int(dom_pulses.max()),
        "one_pulse_dom_fraction": float((dom_pulses == 1).mean()),
        "events_under_100_fraction": float((ev_pulses < 100).mean()),
        "events_100_1k_fraction": float(((ev_pulses >= 100) & (ev_pulses < 1000)).mean()),
        "events_over_1k_fraction": float((ev_pulses >= 1000).mean()),
        "events_over_10k": int((ev_pulses >= 10_000).sum()),
        "auxiliary_fraction": float(table.auxiliary.mean()),
    }


def write_dataset(out_dir: str | Path, n_events: int, seed: int = 0, events_per_file: int = 200_000,
                  sensor_xyz: np.ndarray | None = None, config: GeneratorConfig = DEFAULT_CONFIG) -> Path:
    """Write a generated train split in the Kaggle layout and return ``out_dir``.

    ``<out>/train_meta.parquet`` (batch_id, event_id, first/last_pulse_index inclusive, azimuth,
    zenith), ``<out>/train/batch_<N>.parquet`` (N from 1; index event_id; sensor_id int16, time int64,
    charge float64, auxiliary bool) and ``<out>/sensor_geometry.csv``. Same events as
    ``generate_table(n_events, seed)``.
    """
    if events_per_file < 1:
        raise ValueError(f"events_per_file must be >= 1, got {events_per_file}")
    out = Path(out_dir)
    (out / "train").mkdir(parents=True, exist_ok=True)
    xyz = load_geometry() if sensor_xyz is None else np.asarray(sensor_xyz, dtype=np.float64)
    g = generate_pulses(n_events, seed, xyz, config)
    event_off = np.concatenate([[0], np.cumsum(g.event_pulse_counts)])
    metas = []
    for k, e0 in enumerate(range(0, n_events, events_per_file)):
        e1 = min(e0 + events_per_file, n_events)
        p0, p1 = int(event_off[e0]), int(event_off[e1])
        batch_id = k + 1
        table = pa.table({
            "event_id": pa.array(np.repeat(g.event_ids[e0:e1], g.event_pulse_counts[e0:e1]), pa.int64()),
            "sensor_id": pa.array(g.sensor_id[p0:p1], pa.int16()),
            "time": pa.array(g.time[p0:p1], pa.int64()),
            "charge": pa.array(g.charge[p0:p1], pa.float64()),
            "auxiliary": pa.array(g.auxiliary[p0:p1], pa.bool_()),
        })
        # pandas metadata so that pandas.read_parquet gives the Kaggle index (event_id), as the real files do
        table = table.replace_schema_metadata(pa.Schema.from_pandas(
            pd.DataFrame({c: np.zeros(0, table.schema.field(c).type.to_pandas_dtype()) for c in table.column_names[1:]},
                         index=pd.Index(np.zeros(0, np.int64), name="event_id"))).metadata)
        pq.write_table(table, out / "train" / f"batch_{batch_id}.parquet")
        metas.append(pd.DataFrame({
            "batch_id": np.full(e1 - e0, batch_id, dtype=np.int64), "event_id": g.event_ids[e0:e1],
            "first_pulse_index": event_off[e0:e1] - p0, "last_pulse_index": event_off[e0 + 1:e1 + 1] - p0 - 1,
            "azimuth": g.azimuth[e0:e1], "zenith": g.zenith[e0:e1]}))
    pd.concat(metas, ignore_index=True).to_parquet(out / "train_meta.parquet", index=False)
    write_geometry(out / "sensor_geometry.csv", xyz)
    return out
