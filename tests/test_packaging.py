"""Packaging: environment.yml (conda) lists the same dependencies as pyproject.toml; the geometry ships as package data."""

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda package name -> PyPI name
NOT_DEPENDENCIES = {"python", "pip"}


def split_requirement(text: str) -> tuple[str, str]:
    """'pandas>=2.0' -> ('pandas', '>=2.0'); names normalised as PyPI does (case, '_' vs '-')."""
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*(.*)$", text)
    name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
    return CONDA_NAMES.get(name, name), m.group(3).replace(" ", "")


def pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return dict(split_requirement(r) for r in requirements)


def conda_requirements() -> dict[str, str]:
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, spec = split_requirement(dep)
            if name not in NOT_DEPENDENCIES:
                out[name] = spec
    return out


def test_environment_yml_in_step_with_pyproject():
    pyproject, conda = pyproject_requirements(), conda_requirements()
    assert set(conda) == set(pyproject), (f"only in environment.yml: {sorted(set(conda) - set(pyproject))}; "
                                          f"only in pyproject.toml: {sorted(set(pyproject) - set(conda))}")
    different = {n: (pyproject[n], conda[n]) for n in pyproject if pyproject[n] != conda[n]}
    assert not different, f"version specifiers differ (pyproject, environment.yml): {different}"


def test_environment_yml_installs_the_package_itself():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_lists = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert any(item.startswith("-e .") for items in pip_lists for item in items)
    assert any(split_requirement(d)[0] == "python" for d in env["dependencies"] if isinstance(d, str))


def test_geometry_csv_is_package_data():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = package_data["iceaggr_lib"]
    shipped = sorted((REPO / "iceaggr_lib").glob("data/geometry/*.csv"))
    assert shipped, "no geometry csv in iceaggr_lib/data/geometry/"
    for csv in shipped:
        relative = csv.relative_to(REPO / "iceaggr_lib")
        assert any(relative.match(g) for g in globs), f"{relative} is not covered by package-data {globs}"
