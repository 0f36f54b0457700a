# Developer and CI entry points. `make test` is the test command the README documents.
PYTHON ?= python

.PHONY: test lint demo bench

test:
	bash scripts/bootstrap.sh
	$(PYTHON) -m pytest -q

# CI (.ci/run) runs it after installing and before the tests: the tree must pass it.
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy tests/harness tests/conftest.py

demo:
	bash scripts/bootstrap.sh
	$(PYTHON) -m hoster_tasks.demo

bench:
	$(PYTHON) bench/replication.py $(BENCH_ARGS)
