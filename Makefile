# `make demo` and `make test` create (or refresh) the local virtualenv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat setup.py | cksum | cut -d' ' -f1)
WORKERS ?= 2

.PHONY: venv demo test test-fast clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo

# The full suite CI runs (see .ci/run).
test: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile

# The inner loop: everything but the slow end-to-end tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) runs
