# Two commands do everything: `make demo` and `make test` (each creates/updates .venv first).
# TORCH pins the CPU wheel that installs from local disk here; GPU users: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# fetch the demo corpus, train a WordPiece vocab, pretrain configs/tiny.yaml, export, and load the export back
# through transformers in a fresh process (top predictions + held-out MLM loss/accuracy before vs after)
demo: venv
	$(PY) scripts/pretrain.py configs/tiny.yaml
	$(PY) scripts/demo_check.py runs/tiny

test: venv
	$(PY) -m pytest -q -m "not slow"

# minutes-long statistical runs on the demo corpus (DESIGN §4 decoupling smoke test, ELECTRA dist == sim)
test-slow: venv
	$(PY) -m pytest -q -m slow

# the CPU benchmarks (minutes; raw JSON in benchmarks/): decoupled pipelines vs backprop, our step vs stock HF
bench: venv
	$(PY) scripts/benchmark.py decouple --synthetic
	$(PY) scripts/benchmark.py step --preset compare-cpu --objective mlm span electra --device cpu

clean-demo:
	rm -rf runs/tiny
