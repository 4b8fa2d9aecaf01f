# The two commands the README opens with: `make demo` and `make test`.
# Each creates the virtualenv and installs the project first when needed.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint services browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/credits demo

services:
	bash scripts/ensure-services.sh

browser:
	bash scripts/ensure-browser.sh

test: $(STAMP) services browser
	$(VENV)/bin/python -m pytest

# A developer's quick run: everything but the tests that start worker, scheduler or demo
# processes or a browser (marked ``slow``). CI runs everything (``make test``).
test-fast: $(STAMP) services
	$(VENV)/bin/python -m pytest -m "not slow"

# ruff: lint (pyflakes, pycodestyle, bugbear, pyupgrade, import order) and format, as CI checks them.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
