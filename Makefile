# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make demo   trains a small GPT under a memory budget and prints the plan and the measured peak
#   make test   runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench venv clean

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

# The CPU benchmark suite (docs/benchmarks.md), sized for 20 minutes on an idle 2-core machine; BENCH_ARGS="--quick" for a smoke run.
bench: venv
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install --quiet -e ".[plot]"
	$(BIN)/python -m bench --suite cpu $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
