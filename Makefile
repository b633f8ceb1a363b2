# Every target works on a fresh machine with Python 3.11+: the first creates .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every package installed anywhere is pinned, with its hashes, in a lock file that `make lock`
# writes from pyproject.toml: runtime (the image), dev (`make install`: runtime + the extras
# embedded, dev, load) and bench (dev + bench). One pin per package across the three (and the
# compose gateway image's lock).
LOCK_RUNTIME := requirements/runtime.txt
LOCK_DEV     := requirements/dev.txt
LOCK_BENCH   := requirements/bench.txt
# The compose `gateway` image's (localstripe alone), from its own list, with the same pins.
LOCK_GATEWAY_IN := deploy/gateway/requirements.in
LOCK_GATEWAY    := deploy/gateway/requirements.txt

.PHONY: install lock run test test-fast lint format bench loadtest screenshots clean

install: $(STAMP)

# Runs again only when the lock or pyproject.toml changed: the dependencies exactly as locked,
# then the project itself (editable) without resolving anything.
$(STAMP): pyproject.toml $(LOCK_DEV)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes --requirement $(LOCK_DEV)
	$(BIN)/python -m pip install --quiet --no-deps --editable .
	@touch $(STAMP)

# Resolve the lock files again after a dependency changed in pyproject.toml, keeping every pin
# that still fits (`make lock LOCK_ARGS=--upgrade` moves them all to the newest releases), then
# install the result. Universal: one file serves every Python from 3.11 (pyproject's
# requires-python) and every platform, with markers where they differ. uv reads no pip
# configuration, so it is given the index pip is configured with, if any (else PyPI's default).
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --quiet --custom-compile-command "make lock" $(LOCK_ARGS)

lock: install
	index=$$($(BIN)/python -m pip config list | sed -n "s/^[^.]*\.index-url='\(.*\)'$$/\1/p" | tail -n 1); \
	if [ -n "$$index" ]; then export UV_DEFAULT_INDEX="$$index"; fi; \
	set -e; \
	$(UV_COMPILE) --all-extras --output-file $(LOCK_BENCH); \
	$(UV_COMPILE) --extra embedded --extra dev --extra load --constraint $(LOCK_BENCH) \
		--output-file $(LOCK_DEV); \
	$(UV_COMPILE) --constraint $(LOCK_BENCH) --output-file $(LOCK_RUNTIME)
	$(BIN)/uv pip compile $(LOCK_GATEWAY_IN) --universal --python-version 3.11 --generate-hashes \
		--quiet --custom-compile-command "make lock" $(LOCK_ARGS) --constraint $(LOCK_BENCH) \
		--output-file $(LOCK_GATEWAY)
	$(MAKE) install

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

# The console's pages as PNGs in docs/console/, taken by its browser tests (needs chromium and
# chromium-driver).
screenshots: install
	$(BIN)/python -m tests.support.screenshots $(PYTEST_ARGS)

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Side-by-side benchmarks (docs/benchmarks.md); BENCH_ARGS="--help" lists the knobs.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP) $(LOCK_BENCH)
	$(BIN)/python -m pip install --quiet --require-hashes --requirement $(LOCK_BENCH)
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m loadtests.bench $(BENCH_ARGS)

# Headless Locust run (60 s) against a service it starts itself, or LOADTEST_HOST; reports in
# loadtests/reports/.
loadtest: install
	$(BIN)/python -m loadtests.loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
