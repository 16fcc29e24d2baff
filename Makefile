.PHONY: demo test test-fast bench setup test-deps

setup:
	@scripts/setup.sh

demo: setup
	@.venv/bin/molink-swarm demo

test-deps:
	@scripts/setup-test-deps.sh

test: setup test-deps
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15

test-fast: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider -m "not slow"

bench: setup
	.venv/bin/python benchmarks/bench_generate.py
