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

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) jobs/demo.py

bench: install
	$(PY) bench/encode_throughput.py
	$(PY) bench/train_throughput.py
	$(PY) bench/eval_throughput.py

# Refresh the lock after changing dependencies in pyproject.toml.
lock: install
	$(PIP) freeze --exclude-editable | grep -v '^diffembed' > constraints.txt

clean:
	rm -rf $(VENV)
