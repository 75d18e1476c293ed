# Two commands: `make demo` and `make test`. Both create .venv and install mambazoo on first use.
# CPU-only machines: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs torch and torchvision from
# that index first (both from the same index; see the README), then the rest from PyPI.
PYTHON ?= python3
TORCH_INDEX ?=
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INSTALL_INPUTS := pyproject.toml $(wildcard setup.py) $(wildcard csrc/*)

.PHONY: setup demo test test-slow clean

setup: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) -m pip install --quiet --no-deps stardist  # only for its bundled nuclei sample (dense tests)
	touch $@

demo: $(STAMP)
	$(PY) -m mambazoo demo

# The whole suite, then the native kernels' ISA x compiler matrix (native-kernel tests only; .ci/native-matrix).
test: $(STAMP)
	$(PY) -m pytest -q
	.ci/native-matrix $(PY)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info src/mambazoo/*.so
