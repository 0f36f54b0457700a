# Developer and CI entry points. `make test` is the test command the README documents.
PYTHON ?= python

.PHONY: test lint demo bench

test:
	bash scripts/bootstrap.sh
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy tests/harness tests/conftest.py

demo:
	bash scripts/bootstrap.sh
	$(PYTHON) -m hoster_tasks.demo

bench:
	$(PYTHON) bench/replication.py $(BENCH_ARGS)
