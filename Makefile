# make demo / make test: each creates .venv and installs what it needs, then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.torchinductor
export RAY_AUTH_MODE := disabled

.PHONY: install demo test test-gpu fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check uv
	# The CPU build of torch first (pip finds the local wheel where the machine has one);
	# uv then sees it satisfied and installs the rest quickly, byte-compiled.
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/blt-data demo

test: $(STAMP)
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
	$(BIN)/python -m pytest -q -m "not gpu"

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# The fuzz set with random seeds and 50x the CI budget (issue 14); failures are kept in .hypothesis/.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -m fuzz --timeout 3600

bench: $(STAMP)
	$(BIN)/python bench/download.py
	$(BIN)/python bench/shuffle.py

clean:
	rm -rf $(VENV) blt-store .pytest_cache .hypothesis
