# make serve   venv + install + a tiny demo model if ./models is empty + the server on 127.0.0.1:8000
# make test    venv + install + the whole test suite
# make bench   the benchmarks (they print figures)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TESTS  := $(VENV)/.installed-test
MODELS ?= models

.PHONY: serve test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# without an NVIDIA GPU, take torch's CPU build (a plain requirement pulls the CUDA one)
	@if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "no NVIDIA GPU: installing torch 2.13.0 (CPU build)"; \
		$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e .
	@touch $(STAMP)

# what the tests need on top: their tools, Ray (its tests run), helm and the Kubernetes models
$(TESTS): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[test,ray]"
	@touch $(TESTS)

serve: $(STAMP)
	@if [ -z "$$(ls -A $(MODELS) 2>/dev/null)" ]; then $(VENV)/bin/modelium demo-model $(MODELS)/demo; fi
	$(VENV)/bin/modelium serve --models $(MODELS)

test: $(TESTS)
	$(PY) -m pytest -q

bench: $(TESTS)
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) bench/eventlog.py
	$(PY) bench/analysis.py
	$(PY) bench/coldstart.py
	$(PY) bench/serving.py
	$(PY) bench/peer.py
	$(PY) bench/simulate.py
	$(PY) bench/policies.py
	$(PY) bench/sessions_bound.py
	$(PY) bench/idle_bound.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
