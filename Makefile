# pacslb: `make demo` runs the embedded demo, `make test` runs the whole test suite.
# Both set up a virtual environment in .venv first; `make test` also installs the real peers the
# integration tests drive (dcmtk, Orthanc; needs root and Debian's apt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo run test peers lint unit integration clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pacslb demo

# `make run CONFIG=examples/infinitt.yaml`; without CONFIG, the embedded demo.
run: $(STAMP)
	$(BIN)/pacslb run $(CONFIG)

peers:
	sh tests/peers/install.sh

lint: $(STAMP)
	$(BIN)/ruff check pacslb tests
	$(BIN)/ruff format --check pacslb tests
	$(BIN)/mypy pacslb

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) peers
	$(BIN)/python -m pytest -q tests/integration

test: $(STAMP) peers lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
