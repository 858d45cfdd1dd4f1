"""nbval needs data: the notebooks' stored parameters read the embedded sample at data/sample.

Generated here (the same call as `make report`, a few seconds) when the notebooks are collected and the
sample is absent. The notebooks write their small outputs to reports/scratch/ (git-ignored).
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(session, config, items):
    if any(str(getattr(item, "fspath", "")).endswith(".ipynb") for item in items):
        from iceaggr_lib.report import DEFAULT_SAMPLE, ensure_sample

        ensure_sample(DEFAULT_SAMPLE)
