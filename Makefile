# Entry points for people and CI. `make run` starts the whole system on this
# machine; `make test` runs every test against real RabbitMQ and PostgreSQL.

UV_VERSION := 0.13.9
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test lint format bench clean help

help:
	@echo "make install  create .venv with every pinned dependency (uv, uv.lock)"
	@echo "make run      start PostgreSQL/RabbitMQ-backed services and run the demo"
	@echo "make test     run the test suite against real RabbitMQ and PostgreSQL"
	@echo "make lint     ruff check, ruff format --check and mypy"
	@echo "make bench    run the benchmarks and record them in docs/benchmarks.md"

# uv is the only tool installed outside the project; pip puts it in .tools.
.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.installed: uv.lock pyproject.toml $(wildcard libs/*/pyproject.toml services/*/pyproject.toml) | $(UV)
	$(UV) sync --frozen --all-packages
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m deploy.local.demo $(ARGS)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy libs/coggo/coggo $(patsubst %/__init__.py,%,$(wildcard services/*/*/__init__.py))

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) -m tests.bench $(ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache
