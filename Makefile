# custody: `make demo` and `make test` set everything up by themselves on Debian/Ubuntu.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup mosquitto chromium demo test lint typecheck bench clean

# What `make demo` needs; `make test` adds Chromium for the dashboard's browser tests.
setup: $(STAMP) mosquitto

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV) || { apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# mosquitto through apt when it is missing (root, or sudo when available).
mosquitto:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		echo "installing mosquitto with apt"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y mosquitto; \
	fi

# Debian's Chromium for the dashboard's browser tests (Playwright drives the system browser).
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
		echo "installing chromium with apt"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium; \
	fi

demo: setup
	$(BIN)/custody demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: setup chromium lint typecheck
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/relay.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
