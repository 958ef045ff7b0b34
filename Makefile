# `make demo` and `make test` do all the set-up on a fresh machine.
# Pick the interpreter with PYTHON=..., e.g. `make test PYTHON="env PYENV_VERSION=3.12.1 python3" VENV=.venv312`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
JAXMOELORA_CACHE ?= $(HOME)/.cache/jaxmoelora
export JAXMOELORA_CACHE

.PHONY: install test test-fast demo generate-demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The PyTorch reference for parity tests exists as a local CPU wheel for Python 3.11 only;
	# elsewhere the tests that need it are skipped and say so.
	if $(PY) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then \
		$(PY) -m pip install -q "torch==2.13.0" "peft>=0.17" || echo "torch reference not installed: torch tests will be skipped"; fi
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/jaxmoelora train configs/demo.yaml

generate-demo: $(STAMP)
	$(VENV)/bin/jaxmoelora generate --model smollm2-135m --max-new-tokens 48 \
		--prompt "What is the capital of France?" \
		--prompt "Write one sentence about the sea."

bench: $(STAMP)
	$(PY) benchmarks/bench_models.py
	$(PY) benchmarks/bench_adapters.py

clean:
	rm -rf $(VENV) .pytest_cache
