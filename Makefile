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

.PHONY: install demo test test-slim install-size slim-report serve-bench gpu-check clean oip-screenshot

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q -e '.[png]' 2>/dev/null || echo "note: pyspng is not installable here; PNGs decode with Pillow (same pixels, slower)"
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
	$(SLIM_VENV)/bin/python -m pip install -q '.[png]' 2>/dev/null || echo "note: pyspng is not installable here"
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

# The served path end to end (docs/serving.md): the no-op ceiling, the sparse and the dense server pinned to core 0,
# driven in turn by wrk on core 1, every cell three times (interleaved; medians and ranges); about 10 minutes.
# Needs wrk (sudo apt-get install -y wrk) and an export (make demo).
MODEL ?= $(DEMO)/export
SERVE_SECONDS ?= 5
serve-bench: install
	@command -v wrk > /dev/null || { echo "serve-bench needs wrk: sudo apt-get install -y wrk"; exit 2; }
	$(PY) -m server.servebench $(MODEL) --seconds $(SERVE_SECONDS) --out docs

# The GPU check, for a machine with a GPU, in one script (.ci/gpu-check, step limits 14 minutes in all): the CUDA
# tests (Triton kernel parity compiled on the GPU, CUDA graphs, precisions), real Fashion-MNIST training on CUDA and
# its export, the precision gate (fp32/tf32/bf16/fp16 on the real test set), the Triton kernel's launch settings
# measured, g2g-bench --device cuda (best sparse vs best dense per precision, CUDA graphs, hidden 1024/4096/8192)
# and training throughput with concurrent cells (1/4/8, CUDA MPS) plus the timed Fashion-MNIST grid of the
# comparison. Runs with any Python that already has the
# dependencies (`make gpu-check GPU_PY=python3 FMNIST=DIR`); writes the tables docs/benchmarks.md links to GPU_DOCS.
GPU_PY ?= $(PY)
GPU_OUT ?= runs/gpu
GPU_DOCS ?= docs/benchmarks/gpu
FMNIST ?= /usr/share/datasets/fashion-mnist
gpu-check:
	GPU_PY=$(GPU_PY) GPU_OUT=$(GPU_OUT) GPU_DOCS=$(GPU_DOCS) FMNIST=$(FMNIST) .ci/gpu-check

clean:
	rm -rf $(VENV) runs .pytest_cache

# The README's screenshot of the page at / (docs/oip-page.png): a Fashion-MNIST G2GNet trained for one epoch,
# exported as version 1 of a model repository, served, and photographed in headless Chromium.
OIP := runs/oip
oip-screenshot: install
	rm -rf $(OIP)
	$(PY) -m training.fit --dataset fashion-mnist --epochs 1 --granularity block --block-size 64 \
		--dst hebbian --dst-interval 100 --no-progress --out $(OIP)/run
	$(BIN)/g2g-export $(OIP)/run/model.pt --out $(OIP)/repo/fashion-mnist/1
	$(PY) -m server.sample --index 0 --out $(OIP)/sample.png
	@set -e; \
	$(BIN)/g2g-serve --model-repository $(OIP)/repo --port $(PORT) --threads 1 > $(OIP)/server.log 2>&1 & pid=$$!; \
	trap "kill $$pid 2>/dev/null" EXIT; \
	for i in $$(seq 300); do curl -sf http://127.0.0.1:$(PORT)/v2/health/ready > /dev/null && break; sleep 0.2; done; \
	$(PY) -m server.oip.browser --url http://127.0.0.1:$(PORT) --image $(OIP)/sample.png --out docs/oip-page.png
