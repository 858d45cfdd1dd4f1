# iceaggr — the two commands a new user needs: `make report` and `make test`.
PY := .venv/bin/python
STAMP := .venv/.iceaggr-installed

.PHONY: setup test report lab sample clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh

## make test: unit tests and the notebooks under nbval (CI runs this). nbval runs each notebook with its
## stored (tiny) parameters on data/sample, which notebooks/conftest.py generates if absent; a failing
## cell fails the test item named after the notebook and cell.
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=600
test: setup
	$(PY) -m pytest tests notebooks $(NBVAL)

## make report: generate the embedded sample if absent, run the notebooks with papermill into reports/latest/
report: setup
	$(PY) -m iceaggr_lib.report --out reports/latest

## make sample: only generate the embedded sample data set (data/sample)
sample: setup
	$(PY) -m iceaggr_lib.sample --out data/sample --events 20000 --seed 0

## make lab: JupyterLab with the project kernel registered
lab: setup
	$(PY) -m ipykernel install --sys-prefix --name iceaggr --display-name "iceaggr (.venv)"
	.venv/bin/jupyter lab notebooks/

clean:
	rm -rf .venv data reports/latest reports/scratch .pytest_cache
