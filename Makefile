PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= routes.yaml
# Exact versions, with hashes, of every dependency (pip-compile --generate-hashes; `make lock` renews them),
# so two installs, and the image, get the same packages.
LOCK      := requirements.lock
TEST_LOCK := requirements-test.lock

FUZZ_CASES ?= 20000
FUZZ_SEED  ?= 18

.PHONY: run test check bench bench-cache clean demo fuzz lock

# `make run`: create the venv, install the package, serve routes.yaml (:8080, metrics :9090).
run: $(BIN)/.installed
	$(BIN)/resilience-proxy run --config $(CONFIG)

# `make test`: create the venv with test extras and run every test.
test: $(BIN)/.installed-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# `make fuzz`: proxy/upstream/http1/ against aiohttp's client on mutated answers, at length (~20 s; FUZZ_CASES,
# FUZZ_SEED: a failure prints both, and the input; `make test` runs the first 300 cases of seed 18).
fuzz: $(BIN)/.installed-test
	FUZZ_CASES=$(FUZZ_CASES) FUZZ_SEED=$(FUZZ_SEED) $(BIN)/python -m pytest -q -s tests/upstream/test_fuzz_http1.py

check: $(BIN)/.installed
	$(BIN)/resilience-proxy check $(CONFIG)

# `make bench`: speed vs the Python ceiling and nginx, resilience under faults (~40 min; writes bench/results.*).
bench: $(BIN)/.installed-test
	$(BIN)/python -m bench $(BENCH_ARGS)

# `make bench-cache`: RSS against cache.max_bytes while 200,000 distinct small GETs fill the memory cache (~1 min).
bench-cache: $(BIN)/.installed-test
	$(BIN)/python -m bench.cache_rss $(BENCH_ARGS)

# `make demo`: the proxy in front of bundled mock providers on 127.0.0.1, offline, stops by itself.
demo: $(BIN)/.installed
	$(BIN)/python -m proxy.demo

# The locked dependencies first (hashes checked), then the package itself without resolving anything.
$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(BIN)/.installed-test: pyproject.toml $(TEST_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r $(TEST_LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/.installed $@

# `make lock`: resolve pyproject.toml's dependencies again into both lock files (after changing them;
# tests/deploy/test_build.py fails while a lock misses a dependency). Resolved for this machine's Python.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q 'pip-tools>=7.4,<8'
	.venv-lock/bin/pip-compile -q --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
		--output-file $(LOCK) pyproject.toml
	.venv-lock/bin/pip-compile -q --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
		--extra test --output-file $(TEST_LOCK) pyproject.toml

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info .pytest_cache
