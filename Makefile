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

bench: venv
	$(BIN)/python -m bench.gpt_budget_frontier

clean:
	rm -rf $(VENV)
