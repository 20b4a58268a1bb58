# Two entry points: `make demo` and `make test`. Both create .venv and install the project into it.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
SLIM_VENV ?= .venv-slim
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
DEMO := runs/demo
PORT ?= 8765

.PHONY: install demo test test-slim install-size slim-report serve-bench gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Train a small block-sparse G2GNet on real Fashion-MNIST, export it, benchmark it against its dense
# twin, then serve it and classify a real test image with curl.
demo: install
	rm -rf $(DEMO)
	$(PY) -m training.fit --dataset fashion-mnist --epochs 2 --granularity block --block-size 64 \
		--dst hebbian --dst-interval 100 --out $(DEMO)
	$(BIN)/g2g-export $(DEMO)/model.pt --out $(DEMO)/export
	$(BIN)/g2g-bench $(DEMO)/export --batch-sizes 1,64 --seconds 2 --out $(DEMO)/bench
	$(PY) -m server.sample --index 0 --out $(DEMO)/sample.png
	@set -e; \
	$(BIN)/g2g-serve $(DEMO)/export --port $(PORT) --threads 1 > $(DEMO)/server.log 2>&1 & pid=$$!; \
	trap "kill $$pid 2>/dev/null" EXIT; \
	for i in $$(seq 300); do curl -sf http://127.0.0.1:$(PORT)/readyz > /dev/null && break; sleep 0.2; done; \
	echo; echo "$$ curl -F file=@$(DEMO)/sample.png 'http://127.0.0.1:$(PORT)/classify?top_k=3'"; \
	curl -sS -F file=@$(DEMO)/sample.png "http://127.0.0.1:$(PORT)/classify?top_k=3" | $(PY) -m json.tool; \
	for i in $$(seq 300); do curl -s http://127.0.0.1:$(PORT)/stats | grep -q '"status":"done"' && break; sleep 0.5; done; \
	echo; echo "$$ curl http://127.0.0.1:$(PORT)/stats"; \
	curl -sS http://127.0.0.1:$(PORT)/stats | $(PY) -m json.tool

test: install test-slim
	$(PY) -m pytest -q

# A venv with only the [serve] extra (no torch, no onnx): the slim runtime tests run in it against an export
# made by the full venv, so a serving install is shown to load, classify and match the torch backend.
$(SLIM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SLIM_VENV)
	$(SLIM_VENV)/bin/python -m pip install -q '.[serve]' pytest
	touch $@

# Disk size of the [serve]-only install against the full one (issue 18: at most 1/10), as a generated page.
install-size: install $(SLIM_VENV)/.installed
	$(PY) -m g2gserve.bench.install_size $(SLIM_VENV) $(VENV) --names serve,full --out docs/install-size.md \
		--json docs/install-size.json

# Issue 18's targets in one page (docs/slim.md, .json, .png): a torch-free g2g-serve under SLIM_REQUESTS requests,
# slim peak RSS sparse vs dense for the demo and a hidden-4096 model (built into runs/wide when missing), install
# size. Needs an export (make demo). About 3 minutes on 2 cores.
SLIM_REQUESTS ?= 10000
slim-report: install-size
	$(PY) -m g2gserve.bench.slim_report $(MODEL) --wide runs/wide/export --requests $(SLIM_REQUESTS) --out docs

test-slim: install $(SLIM_VENV)/.installed
	$(PY) tests/tiny_export.py runs/slim
	G2G_SLIM_EXPORT=runs/slim/export PYTHONPATH=$(CURDIR) $(SLIM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_slim.py

# The served path end to end (docs/serving.md): the no-op ceiling, the sparse and the dense server in turn, pinned
# to core 0, driven by wrk on core 1. Needs wrk (sudo apt-get install -y wrk) and an export (make demo).
SERVE_SECONDS ?= 10
serve-bench: install
	@command -v wrk > /dev/null || { echo "serve-bench needs wrk: sudo apt-get install -y wrk"; exit 2; }
	$(PY) -m server.servebench $(MODEL) --seconds $(SERVE_SECONDS) --out docs

# The CUDA checks, for a machine with a GPU: the CUDA tests (and the rest of the suite), real Fashion-MNIST
# training on CUDA, side-by-side epoch times, and g2g-bench on CUDA. Runs with any Python that already has
# the dependencies (`make gpu-check GPU_PY=python3 FMNIST=DIR MODEL=EXPORT_DIR`); docs/benchmarks.md quotes it.
GPU_PY ?= $(PY)
GPU_OUT ?= runs/gpu
FMNIST ?= /usr/share/datasets/fashion-mnist
MODEL ?= $(DEMO)/export
gpu-check:
	mkdir -p $(GPU_OUT)
	$(GPU_PY) -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
	$(GPU_PY) -m pytest -q -p no:cacheprovider tests 2>&1 | tee $(GPU_OUT)/pytest.txt
	$(GPU_PY) -m training.fit --device cuda --dataset fashion-mnist --data-dir $(FMNIST) --epochs 3 --no-progress \
		--out $(GPU_OUT)/fit 2>&1 | tee $(GPU_OUT)/fit.txt
	$(GPU_PY) -m training.epoch_time --device cuda --data-dir $(FMNIST) --repeats 2 2>&1 | tee $(GPU_OUT)/epoch_time.txt
	$(GPU_PY) -m server.bench $(MODEL) --device cuda --backends torch --batch-sizes 1,8,64,256 --seconds 1.5 \
		--sweep --out $(GPU_OUT)/bench

clean:
	rm -rf $(VENV) runs .pytest_cache
