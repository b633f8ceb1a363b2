# Every target works on a fresh machine with Python 3.11+: the first creates .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast lint format bench loadtest clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev,load]'
	@touch $(STAMP)

run: install
	$(BIN)/payment-service run

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inner loop: everything but the slow fault tests (marked `slow`). CI runs `make test`.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app outbox_relay payment_service payment_cli tests loadtests deploy/failover/demo.py
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Side-by-side benchmarks (docs/benchmarks.md); BENCH_ARGS="--help" lists the knobs.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev,load,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)

# Headless Locust run (60 s) against a service it starts itself, or LOADTEST_HOST; reports in
# loadtests/reports/.
loadtest: install
	$(BIN)/python -m loadtests.loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
