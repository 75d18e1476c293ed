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
	touch $@

demo: $(STAMP)
	$(PY) -m mambazoo.cli demo

# The whole suite, then the native kernels' ISA x compiler matrix (native-kernel tests only; .ci/native-matrix).
test: $(STAMP)
	$(PY) -m pytest -q
	.ci/native-matrix $(PY)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info src/mambazoo/*.so
