# Two commands on a fresh machine: `make audit` and `make test`. Both bootstrap .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: audit test bytecode lab bench clean-data peers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,postgres,dask]"
	touch $(STAMP)

# An editable install leaves the package uncompiled: where PYTHONDONTWRITEBYTECODE is set, every CLI start
# would compile it again (19-25 ms of --help, runs and show in scripts/bench_cli.py). pip compiles an
# installed package; this does the same for the checkout.
bytecode: $(STAMP)
	$(PY) -m compileall -q pipeline

audit: $(STAMP) bytecode
	$(PY) scripts/run_audit.py --profile standard

# Two workers, each test file on one (its module fixtures, such as the quick audit, run once): the suite waits on
# servers and subprocesses as much as it computes, so two halve the wall time where one core would idle.
test: $(STAMP) bytecode
	$(PY) -m pytest -q -n 2 --dist loadfile

# Extra arguments for JupyterLab, e.g. `make lab LAB_ARGS=--allow-root` in a container running as root.
LAB_ARGS ?=

# Rooted at the repository, so the report (docs/performance/) and its charts open too; starts in notebooks/.
lab: $(STAMP)
	$(PY) -m pip install --quiet -e ".[lab]"
	$(PY) -m ipykernel install --sys-prefix --name pipeline-audit --display-name "Pipeline audit (project .venv)"
	$(PY) -m jupyter lab --ServerApp.root_dir=. --FileContentsManager.preferred_dir=notebooks $(LAB_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_store.py

clean-data:
	rm -rf data/runs.sqlite3* data/spool data/outbox data/work data/inbox

# Issue 16's peers (Prefect, Dagster, Airflow) for notebook 14_peers, each in a venv of its own under data/peers/:
# their pins conflict with each other's and ours, so they are no extra of this package. Minutes; needs the index.
peers: $(STAMP)
	$(PY) -m pipeline.audit.base.peerenv
