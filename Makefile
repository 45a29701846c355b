PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= routes.yaml

FUZZ_CASES ?= 20000
FUZZ_SEED  ?= 18

.PHONY: run test check bench bench-cache clean demo fuzz

# `make run`: create the venv, install the package, serve routes.yaml (:8080, metrics :9090).
run: $(BIN)/.installed
	$(BIN)/resilience-proxy run --config $(CONFIG)

# `make test`: create the venv with test extras and run every test.
test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# `make fuzz`: proxy/upstream/http1/ against aiohttp's client on mutated answers, at length (~20 s; FUZZ_CASES,
# FUZZ_SEED: a failure prints both, and the input; `make test` runs the first 300 cases of seed 18).
fuzz: $(BIN)/.installed-test
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_SEED=$(FUZZ_SEED) $(BIN)/python -m pytest -q -s tests/test_fuzz_http1.py

check: $(BIN)/.installed
	$(BIN)/resilience-proxy check $(CONFIG)

# `make bench`: speed vs the Python ceiling and nginx, resilience under faults (~8 min; writes bench/results.*).
bench: $(BIN)/.installed-test
	$(BIN)/python -m bench $(BENCH_ARGS)

# `make bench-cache`: RSS against cache.max_bytes while 200,000 distinct small GETs fill the memory cache (~1 min).
bench-cache: $(BIN)/.installed-test
	$(BIN)/python -m bench.cache_rss $(BENCH_ARGS)

# `make demo`: the proxy in front of bundled mock providers on 127.0.0.1, offline, stops by itself.
demo: $(BIN)/.installed
	$(BIN)/python -m proxy.demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/.installed $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
