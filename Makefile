# make demo / make test: each creates .venv and installs what it needs, then runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.torchinductor
export RAY_AUTH_MODE := disabled

UV := uv==0.13.9
# The lock (`make lock` refreshes it): every dependency of the project and its test extra, pinned
# with hashes, for Python 3.11 on x86-64 Linux. Torch is the one package outside it: `install`
# puts in the CPU build with pip (the local wheel where the machine has one, in TORCH_WHEELS), and
# the lock is resolved against that build, so it holds torch's CPU dependencies and no CUDA ones.
# requirements/base.lock is the same resolution without the test extra (the Docker images).
LOCK := requirements/test.lock
TORCH_WHEELS ?= /opt/wheels
LOCK_FLAGS := --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links $(TORCH_WHEELS) --override $(VENV)/torch-cpu.txt --no-emit-package torch \
	--custom-compile-command "make lock" --quiet

.PHONY: install lock demo test test-gpu fuzz bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(UV)"
	# Every dependency at its locked version and hash, byte-compiled.
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --require-hashes -r $(LOCK)
	# Then the CPU build of torch (pip finds the local wheel where the machine has one); its
	# dependencies are in the lock, so pip adds torch alone.
	$(BIN)/pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --no-deps -e ".[test]"
	touch $@

# Resolve the lock again after a change to pyproject.toml, keeping every pin that still fits;
# `make lock UPGRADE=1` moves every package to its newest release.
lock:
	test -x $(BIN)/uv || { test -x $(BIN)/python || $(PY) -m venv $(VENV); $(BIN)/pip install -q "$(UV)"; }
	echo "torch==2.13.0+cpu" > $(VENV)/torch-cpu.txt
	$(BIN)/uv pip compile pyproject.toml --extra test $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -c $(LOCK) -o requirements/base.lock

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
