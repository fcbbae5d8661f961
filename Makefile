# The two commands a newcomer needs: `make demo` and `make test`.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test test-unit test-integration test-asan lint clean bench

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/python -m integration.demo

test: setup lint test-asan
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/python -m pytest integration $(PYTEST_ARGS)

# The native engine's tests under AddressSanitizer + UBSan.
test-asan: setup
	native_tls/test-asan.sh $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check meshproxy tests integration
	$(BIN)/ruff format --check meshproxy tests integration
	$(BIN)/mypy

# Not part of `make test` (integration/bench/README.md); smoke run: make bench BENCH_ARGS=--quick
bench: setup
	integration/bench/run.sh $(BENCH_ARGS)
	$(BIN)/python -m integration.bench.coordinator_bench --json integration/bench/results-coordinator.json

clean:
	rm -rf build *.egg-info meshproxy/*.so .pytest_cache .mypy_cache .ruff_cache
