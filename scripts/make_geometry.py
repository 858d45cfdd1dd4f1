"""Derive the shipped IceCube-86 sensor geometry (Kaggle format) from GraphNeT's geometry table.

    python scripts/make_geometry.py [--table /work/shared/data/icecube86_geometry.parquet]
                                    [--out iceaggr_lib/data/geometry/icecube86_sensor_geometry.csv]

Source: GraphNeT (graphnet-team/graphnet, ``data/geometry_tables/icecube/icecube86.parquet``,
Apache-2.0). Only this script reads the parquet table; the library ships its output and never needs
the table at run time.

What it does
------------
* keeps the in-ice optical modules (``dom_type == 20``; IceTop tanks are dropped) and numbers them
  as the Kaggle competition does: ``sensor_id = (string - 1) * 60 + (dom_number - 1)``;
* fills the modules the table lacks (77 of 86 x 60 = 5160). A string hangs (nearly) vertically,
  and its modules are evenly spaced within sections (17 m on standard strings; 10 m and 7 m on the
  DeepCore strings), so a missing run of modules between two present ones is interpolated linearly
  in ``dom_number``; a run at the top or bottom end is extrapolated with the spacing of the two
  nearest present modules. Every filled gap is checked against the neighbouring spacing, so a gap
  that straddles a section boundary would fail loudly instead of inventing a position. x and y are
  filled the same way (they are constant on every string with a missing module; string 21, complete,
  wiggles by a few cm);
* writes ``sensor_id,x,y,z`` (metres, rounded to 1 cm like the Kaggle file) with 5160 rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TABLE = Path("/work/shared/data/icecube86_geometry.parquet")
DEFAULT_OUT = REPO / "iceaggr_lib" / "data" / "geometry" / "icecube86_sensor_geometry.csv"
N_STRINGS, DOMS_PER_STRING = 86, 60
IN_ICE_DOM_TYPE = 20


def fill_string(dom_number: np.ndarray, z: np.ndarray, n_doms: int = DOMS_PER_STRING,
                check_spacing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One coordinate for modules 1..n_doms of a string from the present ones: (all, was_missing)."""
    present = np.zeros(n_doms + 1, dtype=bool)
    present[dom_number] = True
    z_all = np.full(n_doms + 1, np.nan)
    z_all[dom_number] = z
    missing = ~present
    missing[0] = False
    for k in np.flatnonzero(missing):
        below = np.flatnonzero(present[:k])  # present modules with a smaller dom_number (higher up)
        above = np.flatnonzero(present[k + 1:]) + k + 1
        if len(below) and len(above):  # interior run: linear in dom_number between its neighbours
            lo, hi = below[-1], above[0]
            step = (z_all[hi] - z_all[lo]) / (hi - lo)
            # the neighbouring spacing on either side must agree with the interpolated one
            near = [z_all[lo] - z_all[lo - 1] if lo >= 2 and present[lo - 1] else None,
                    z_all[hi + 1] - z_all[hi] if hi + 1 <= n_doms and present[hi + 1] else None]
            near = [s for s in near if s is not None]
            if check_spacing and near and not any(abs(step - s) < 0.05 * abs(s) for s in near):
                raise ValueError(f"gap {lo}..{hi} spacing {step:.2f} m matches no neighbouring spacing {near}")
            z_all[k] = z_all[lo] + step * (k - lo)
        elif len(below) >= 2:  # bottom end: continue the last spacing downwards
            a, b = below[-2], below[-1]
            z_all[k] = z_all[b] + (z_all[b] - z_all[a]) / (b - a) * (k - b)
        elif len(above) >= 2:  # top end: continue the first spacing upwards
            a, b = above[0], above[1]
            z_all[k] = z_all[a] - (z_all[b] - z_all[a]) / (b - a) * (a - k)
        else:
            raise ValueError("a string needs at least two present modules")
    return z_all[1:], missing[1:]


def derive(table: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The Kaggle-format geometry (sensor_id, x, y, z) and the number of filled modules."""
    in_ice = table[table["dom_type"] == IN_ICE_DOM_TYPE]
    rows, n_filled = [], 0
    for string in range(1, N_STRINGS + 1):
        s = in_ice[in_ice["string"] == string].sort_values("dom_number")
        dom_number = s["dom_number"].to_numpy()
        z, missing = fill_string(dom_number, s["dom_z"].to_numpy())
        x, _ = fill_string(dom_number, s["dom_x"].to_numpy(), check_spacing=False)
        y, _ = fill_string(dom_number, s["dom_y"].to_numpy(), check_spacing=False)
        n_filled += int(missing.sum())
        rows.append(pd.DataFrame({
            "sensor_id": (string - 1) * DOMS_PER_STRING + np.arange(DOMS_PER_STRING), "x": x, "y": y, "z": z}))
    geometry = pd.concat(rows, ignore_index=True)
    geometry[["x", "y", "z"]] = geometry[["x", "y", "z"]].round(2)
    return geometry, n_filled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    geometry, n_filled = derive(pd.read_parquet(args.table))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    geometry.to_csv(args.out, index=False, float_format="%.2f")
    print(f"wrote {args.out}: {len(geometry)} sensors, {n_filled} interpolated modules")


if __name__ == "__main__":
    main()
