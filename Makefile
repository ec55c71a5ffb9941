# Two commands do everything: `make demo` and `make test` (each creates/updates .venv first).
# TORCH pins the CPU wheel that installs from local disk here; GPU users: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-slow bench bench-gpu clean-demo

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

# the CPU benchmarks (minutes; raw JSON in benchmarks/): decoupled pipelines vs backprop, our step vs stock HF (each
# arch's stock *ForMaskedLM), our data preparation vs datasets map + group_texts
bench: venv
	$(PY) scripts/benchmark.py decouple --synthetic
	$(PY) scripts/benchmark.py step --preset compare-cpu --objective mlm span electra --device cpu
	$(PY) scripts/benchmark.py step --preset compare-cpu --arch roberta modernbert --objective mlm span --device cpu \
		--out benchmarks/step-archs-$(BENCH_DAY).json
	$(PY) scripts/benchmark.py data

# on a CUDA machine (`make bench-gpu TORCH=torch`): the GPU checks, then DESIGN §6's step and e2e suites (the
# stock transformers step vs ours in one process; every arm compiles its step first), last the step suite of the
# other archs (each arch's stock *ForMaskedLM vs ours, bert-base widths; issue 20 item 5); raw JSON in
# benchmarks/gpu-*.json, to be written up in benchmarks/RESULTS.md
BENCH_DAY := $(shell date +%F)
bench-gpu: venv
	$(PY) -m pytest -q tests/test_cuda.py
	$(PY) scripts/benchmark.py step --preset bert-base --seq 128 --batch 256 --compile \
		--ours eager compiled+mask compiled fast --out benchmarks/gpu-step-bert-base-s128-$(BENCH_DAY).json
	$(PY) scripts/benchmark.py step --preset bert-base --seq 128 --batch 256 --compile --objective span electra \
		--out benchmarks/gpu-step-span-electra-s128-$(BENCH_DAY).json
	$(PY) scripts/benchmark.py step --preset bert-base --seq 512 --batch 64 --compile \
		--out benchmarks/gpu-step-bert-base-s512-$(BENCH_DAY).json
	$(PY) scripts/benchmark.py step --preset electra-small --seq 128 --batch 128 --objective electra --compile \
		--out benchmarks/gpu-step-electra-small-$(BENCH_DAY).json
	$(PY) scripts/benchmark.py e2e --preset bert-base --seq 128 --batch 256 --steps 50 --workers 8 \
		--objective mlm span electra --out benchmarks/gpu-e2e-$(BENCH_DAY).json
	$(PY) scripts/benchmark.py step --preset bert-base --seq 128 --batch 256 --compile --arch roberta modernbert \
		--objective mlm span --ours eager compiled fast --out benchmarks/gpu-step-archs-s128-$(BENCH_DAY).json

clean-demo:
	rm -rf runs/tiny
