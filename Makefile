# The two entry points of the README: `make demo` and `make test`. Each builds its own
# virtual environment from a bare clone; nothing else needs to be installed by hand.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-test
CORE_COVERAGE_MIN := 95

.PHONY: demo test lint typecheck unit bench venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "idempay needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m idempay demo

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test: lint typecheck
	$(BIN)/python -m pytest --cov --cov-report=term --cov-report=xml:coverage.xml --durations=15
	$(BIN)/python -m coverage report --fail-under=$(CORE_COVERAGE_MIN) \
		--include='src/idempay/core/*,src/idempay/errors.py' --skip-covered --show-missing

# Not part of `make test`: speed is measured here, as ratios against same-run baselines.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -r benchmarks/requirements.txt
	$(BIN)/python benchmarks/stores.py
	$(BIN)/python benchmarks/webhook_storm.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage coverage.xml build dist
