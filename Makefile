# Each target sets up its own virtual environment. torch and torchvision are installed first, pinned:
# that pair lies on local disk on these machines (no download), and torchvision imports beside it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo postgres test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[dev,iterative,cluster]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py --out demo-output

# The PostgreSQL tests run a throwaway server from Debian's package: installed here when missing and
# we can (root, apt-get); nothing to do when it is there. Without it those tests skip, saying why.
postgres:
	@if command -v pg_ctl >/dev/null || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q postgresql || { apt-get update -q && apt-get install -y -q postgresql; }; } \
			|| echo "make: could not install PostgreSQL; its tests will skip"; \
	else echo "make: PostgreSQL is not installed (needs root and apt-get to install it); its tests will skip"; fi

# worksteal: a worker that runs dry takes tests from the other, so the long ones do not end the run
# on one worker alone (a 2-core VM: 445 s against 497 s with xdist's default split)
test: $(STAMP) postgres
	$(BIN)/ruff check bluesky_ptychonn tests examples callbacks benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
