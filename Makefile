# The two commands a new user needs (see README): `make run` and `make test`.
# Both set themselves up: a virtualenv in .venv with the package and its
# dependencies, sample data, and (for tests) the local servers.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/sample
DAYS ?= 30

.PHONY: setup run test test-unit bench clean

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found (install python3.11 and python3.11-venv)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip wheel setuptools
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

$(DATA)/manifest.json: | $(STAMP)
	$(VENV)/bin/txstream generate --days $(DAYS) --out $(DATA)

# The main job: generate 30 days of sample data (once) and run the whole graph on it.
run: $(STAMP) $(DATA)/manifest.json
	$(VENV)/bin/txstream run --input $(DATA) --summary_json out/summary.json

# The test suite: unit, streaming (TestStream), integration against real servers, end to end.
test: $(STAMP)
	$(VENV)/bin/txstream services up
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/bench_run.py

clean:
	rm -rf out data/sample
