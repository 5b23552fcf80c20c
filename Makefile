# The two commands a user needs: `make test` and `make demo`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo bench lock clean

install: $(STAMP)

# torch first (the pinned CPU wheel), then everything else under the lock, then the project (editable).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0"
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

# Hermetic: every cache the tests (their subprocesses, Ray workers and Ray heads) may read or write lives in one
# fresh, empty directory made for this run and removed afterwards (kept when tests fail), never in ~/.cache,
# ~/.config or ~/.ray, so a warm machine cannot hide what a fresh one would hit. CI passes its own empty
# DIFFEMBED_TEST_CACHE. tests/conftest.py points the same variables (HERMETIC_VARS) at the same places.
TEST_CACHE_ENV = DIFFEMBED_CACHE="$$run/diffembed" HF_HOME="$$run/huggingface" HF_HUB_CACHE="$$run/huggingface/hub" \
	XDG_CACHE_HOME="$$run/xdg/cache" XDG_CONFIG_HOME="$$run/xdg/config" XDG_DATA_HOME="$$run/xdg/data" \
	XDG_STATE_HOME="$$run/xdg/state" TORCH_HOME="$$run/torch" TORCH_EXTENSIONS_DIR="$$run/torch_extensions" \
	TRITON_CACHE_DIR="$$run/triton" TORCHINDUCTOR_CACHE_DIR="$$run/torchinductor" MPLCONFIGDIR="$$run/matplotlib" MTEB_CACHE="$$run/mteb" \
	RAY_AUTH_TOKEN_PATH="$$run/ray/auth_token"

test: install
	@set -e; \
	if [ -n "$$DIFFEMBED_TEST_CACHE" ]; then run="$$DIFFEMBED_TEST_CACHE"; own=; \
	else run=$$(mktemp -d "$${TMPDIR:-/tmp}/diffembed-test.XXXXXX"); own=1; fi; \
	mkdir -p "$$run"; run=$$(cd "$$run" && pwd); \
	if [ -n "$$(ls -A "$$run")" ]; then echo "DIFFEMBED_TEST_CACHE=$$run is not empty: tests need a fresh one" >&2; exit 2; fi; \
	echo "test caches: $$run"; \
	status=0; env DIFFEMBED_TEST_CACHE="$$run" $(TEST_CACHE_ENV) $(PY) -m pytest -q --durations=15 tests || status=$$?; \
	if [ -n "$$own" ] && [ $$status -eq 0 ]; then rm -rf "$$run"; fi; \
	exit $$status

demo: install
	$(PY) jobs/demo.py

bench: install
	$(PY) bench/encode_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/eval_throughput.py
	$(PY) bench/store_throughput.py --points 100000

# Refresh the lock after changing dependencies in pyproject.toml.
lock: install
	$(PIP) freeze --exclude-editable | grep -v '^diffembed' > constraints.txt

clean:
	rm -rf $(VENV)
