# Two commands matter: `make run` and `make test`. Everything else is a step they take.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install run up stop status tick manifest test lint bench clean mwaa

install: $(INSTALLED)

$(INSTALLED): requirements.txt requirements-local.txt constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-local.txt -c constraints.txt
	touch $(INSTALLED)

run: install  ## set up, start Airflow, run ingestion and the Asset-triggered transform, summarise
	$(BIN)/python -m include.local_stack run

up: install  ## set up and start Airflow without triggering anything
	$(BIN)/python -m include.local_stack up

stop: install  ## stop Airflow and the embedded PostgreSQL
	$(BIN)/python -m include.local_stack stop

status: install
	$(BIN)/python -m include.local_stack status

tick: install  ## apply one batch of changes to the demo source; `make run` then copies them
	$(BIN)/python -m include.local_stack tick

manifest: install  ## dbt parse: the manifest Cosmos renders the transform DAG from
	$(BIN)/python -m include.local_stack manifest

test: install manifest  ## the whole test suite, end-to-end runs with a real scheduler included
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check dags include config tests bench

bench: install manifest  ## benchmarks: ratios against baselines measured in the same run
	$(BIN)/python -m bench.copy_engine_bench
	$(BIN)/python -m bench.dbt_execution_modes

clean: stop
	rm -rf .data dbt/target dbt/logs

mwaa: manifest  ## what Amazon MWAA reads from S3, laid out in dist/mwaa/ (uploads nothing): docs/deploy.md
	$(BIN)/python mwaa/package.py --out dist/mwaa
