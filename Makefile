# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make demo   trains a small GPT under a memory budget and prints the plan and the measured peak
#   make test   runs the test suite (on torch 2.13.0, as CI does)
#   make test-torch VERSION=2.15.0   runs it against another torch release, in .venv-torch-2.15.0
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-torch bench venv clean

$(BIN)/graphopt-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/graphopt-installed

demo: venv
	MALLOC_MMAP_THRESHOLD_=65536 $(BIN)/python -m examples.demo

test: venv
	MALLOC_MMAP_THRESHOLD_=65536 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The same suite against another torch release (pyproject.toml's pin says which are
# supported), in a venv of its own. PIP_CONFIG_FILE=/dev/null: a machine-wide pip
# configuration may constrain torch to the releases it keeps on disk. Installing
# graphopt must leave the requested torch in place.
TORCH_VENV := .venv-torch-$(VERSION)
test-torch:
	@test -n "$(VERSION)" || { echo "usage: make test-torch VERSION=2.15.0"; exit 2; }
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	PIP_CONFIG_FILE=/dev/null $(TORCH_VENV)/bin/pip install --quiet --upgrade pip
	PIP_CONFIG_FILE=/dev/null $(TORCH_VENV)/bin/pip install --quiet torch==$(VERSION)
	PIP_CONFIG_FILE=/dev/null $(TORCH_VENV)/bin/pip install --quiet -e ".[test]"
	$(TORCH_VENV)/bin/python -c "import sys, torch; v = torch.__version__.split('+')[0]; \
		sys.exit(None if v == '$(VERSION)' else f'installing graphopt changed torch $(VERSION) to {torch.__version__}')"
	MALLOC_MMAP_THRESHOLD_=65536 $(TORCH_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The CPU benchmark suite (docs/benchmarks.md), sized for 20 minutes on an idle 2-core machine; BENCH_ARGS="--quick" for a smoke run.
bench: venv
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install --quiet -e ".[plot]"
	$(BIN)/python -m bench --suite cpu $(BENCH_ARGS)

# One prepared GPU check (bench/gpu_check.py, under 8 minutes on one H100/H200): graphopt
# under budgets, offload and fp8/int8 saving beside torch's own tools, into one CSV. Needs
# a CUDA build of torch in the venv; without CUDA it says it skipped and exits 0.
.PHONY: gpu-check
gpu-check: venv
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .venv-torch-*
