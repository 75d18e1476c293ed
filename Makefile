# Two commands: `make demo` and `make test`. Both create .venv and install mambazoo on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INSTALL_INPUTS := pyproject.toml $(wildcard setup.py) $(wildcard csrc/*)

.PHONY: setup demo test test-slow clean

setup: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) -m pip install --quiet --no-deps stardist  # only for its bundled nuclei sample (dense tests)
	touch $@

demo: $(STAMP)
	$(PY) -m mambazoo.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info src/mambazoo/*.so
