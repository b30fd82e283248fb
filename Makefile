# `make demo` and `make test` create (or refresh) the local virtualenv and install what they need:
# the demo only the core packages, the tests also the test extras (CPU torch, diffusers, pytest,
# peft, transformers), libtpu (the TPU compiler behind launch.aot's CPU-host compiles) and the data
# extras (grain, array-record, tensorflow-datasets: launch.precompute and the latents source).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SETUP  := $(shell cat setup.py | cksum | cut -d' ' -f1)
BASE   := $(VENV)/.installed-base-$(SETUP)
TESTS  := $(VENV)/.installed-test-$(SETUP)
WORKERS ?= 2

.PHONY: venv demo test test-fast clean

$(BASE): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	rm -f $(VENV)/.installed-base-* && touch $(BASE)

$(TESTS): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,tpu,data]"
	rm -f $(VENV)/.installed-* && touch $(TESTS) $(BASE)

venv: $(TESTS)

# The embedded default: distil the shipped digits teacher, evaluate, print the table.
demo: $(BASE)
	$(PY) -m launch.demo

# The full suite CI runs (see .ci/run).
test: $(TESTS)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

# The inner loop: everything but the slow end-to-end tests.
test-fast: $(TESTS)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) runs
