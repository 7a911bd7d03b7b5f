# Each target sets up its own virtual environment. torch and torchvision are installed first, pinned:
# that pair lies on local disk on these machines (no download), and torchvision imports beside it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[dev,iterative]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo-output

test: $(STAMP)
	$(BIN)/ruff check bluesky_ptychonn tests examples callbacks benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
