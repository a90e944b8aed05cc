# The two commands of the README: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch must go in before anything else: an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0
# pytest-xdist workers for `make test`, one thread each (tests/conftest.py): on 2 cores, two
# workers ran the suite in 253-262 s where one process took 420 s
TEST_WORKERS ?= 2

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: install
	$(BIN)/steiner demo

test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -n $(TEST_WORKERS)

bench: install
	$(BIN)/python benchmarks/bench_countdown.py

clean:
	rm -rf $(VENV) runs .pytest_cache
