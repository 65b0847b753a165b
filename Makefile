# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs once (a stamp file records it);
# a second run installs nothing. torch is pinned through constraints.txt to the CPU build on disk.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PIP) -e '.[test,bench]'
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/archlab inspect transformer-base

# The fast tier (what CI runs): everything not marked slow. Exit 5 (no tests collected) is not a pass.
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(BENCH_STAMP)
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
