# pacslb: `make demo` runs the embedded demo, `make test` runs the whole test suite.
# Both set up a virtual environment in .venv first; `make test` also installs the real peers the
# integration tests drive (dcmtk, Orthanc, nginx, keepalived, redis-server) and the browser the dashboard tests drive (Chromium; needs root
# and Debian's apt).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# What the demo needs: pacslb (editable) and its dependencies, nothing else, so that a fresh clone's
# `make demo` is up in seconds. The rest (test tools, mypy) comes with STAMP, for every other target.
BASE   := $(VENV)/.base
STAMP  := $(VENV)/.installed
# The per-request path compiled with mypyc, next to its sources (pacslb/compiled.py); rebuilt when one of
# them changes. PACSLB_COMPILE=0 runs it as Python; so does a machine without a C compiler. The demo runs
# without it (it would wait about a minute for the C compiler); `pip install .` compiles it into the wheel.
# The list is pacslb/compiled.py's (HOT_MODULES), asked of it with any Python: it imports nothing else.
HOT      := $(shell $(PYTHON) -m pacslb.compiled sources)
COMPILED := $(VENV)/.compiled
# Compiled modules older than their sources would run the code before an edit: the targets that do not wait
# for the compiler (demo, check) drop them, and the stamp, so that the next target compiles again.
DROP_STALE = @$(BIN)/python -m pacslb.compiled check > /dev/null 2>&1 || { $(BIN)/python -m pacslb.compiled clean; rm -f $(COMPILED); }

.PHONY: demo run test peers ha browser lint unit integration clean compile check pure

# An editable install never compiles (setup.py); --no-compile: no .pyc written ahead for every dependency.
$(BASE): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

$(COMPILED): $(STAMP) $(HOT)
	$(BIN)/python -m pacslb.compiled build > $(VENV)/compile.log 2>&1 || tail -n 5 $(VENV)/compile.log
	touch $(COMPILED)

compile: $(COMPILED)

demo: $(BASE)
	$(DROP_STALE)
	$(BIN)/pacslb demo

# `make run CONFIG=examples/infinitt.yaml`; without CONFIG, the embedded demo.
run: $(COMPILED)
	$(BIN)/pacslb run $(CONFIG)

peers:
	sh tests/peers/install.sh

# keepalived (its --config-test judges `pacslb keepalived`) and redis-server, for a clustered pair.
ha:
	sh tests/ha/install.sh

# Debian's Chromium for the dashboard tests (tests/browser); Playwright itself comes with the test extra.
browser:
	sh tests/browser/install.sh

lint: $(STAMP)
	$(BIN)/ruff check pacslb tests
	$(BIN)/ruff format --check pacslb tests
	$(BIN)/mypy pacslb

unit: $(COMPILED)
	$(BIN)/python -m pytest -q tests/unit

# The quick lane while developing (well under a minute): lint, format, types and the unit tests, on the
# sources as they are (no compile step: an edit is tested at once).
check: lint
	$(DROP_STALE)
	$(BIN)/python -m pytest -q -p no:cacheprovider -x tests/unit

integration: $(COMPILED) peers ha
	$(BIN)/python -m pytest -q tests/integration

# The per-request path as Python where it was compiled (PACSLB_COMPILE=0 at run time): the unit tests and the
# HTTP tests that drive it hardest, again, so that both keep the same behaviour.
PURE_TESTS := tests/unit tests/integration/test_http_framing.py tests/integration/test_http_persistence.py \
              tests/integration/test_http_workers.py
pure: $(STAMP)
	PACSLB_COMPILE=0 $(BIN)/python -m pytest -q -p no:cacheprovider $(PURE_TESTS)

test: $(COMPILED) peers ha browser lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests
	PACSLB_COMPILE=0 $(BIN)/python -m pytest -q -p no:cacheprovider $(PURE_TESTS)

clean:
	-$(BIN)/python -m pacslb.compiled clean
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis

# `make bench` runs the side-by-side benchmark (pacslb vs HAProxy vs direct; see docs/performance.md).
# Installs its peers first (haproxy, iperf3, wrk, nginx, dcmtk; needs root + apt). Options go in BENCH_ARGS,
# e.g. `make bench BENCH_ARGS="--quick --cases bulk,http"` or `make bench BENCH_ARGS=--write-docs`.
.PHONY: bench
bench: $(COMPILED)
	sh bench/install.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# `make instructions` counts the machine instructions of one proxied HTTP request in a running pacslb, with
# callgrind (bench/instructions.py): the steady measure of a change to the per-request path.
# `make instructions ARGS=--new-connections`: of one new tcp-mode connection instead.
.PHONY: instructions
instructions: $(COMPILED)
	BENCH_PACSLB=checkout $(BIN)/python -m bench.instructions $(ARGS)

# `make fuzz` runs the fuzz campaign (docs/fuzzing.md): 1,000,000 DICOM first PDUs and HTTP request heads,
# in-process through the parsers (coverage-guided with atheris) and through a running pacslb. Options go in
# FUZZ_ARGS, e.g. `make fuzz FUZZ_ARGS="--total 100000 --seed 7"`. Seeds, corpus, crashes and figures: .fuzz/
.PHONY: fuzz
fuzz: $(STAMP)
	$(BIN)/python -m pip install -q atheris || echo "fuzz: atheris not installed; the seeded mutator is used"
	$(BIN)/python tests/fuzz/campaign.py $(FUZZ_ARGS)
