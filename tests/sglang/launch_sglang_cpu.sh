#!/usr/bin/env bash
# Run real SGLang (PyPI sglang==0.5.23 with its CUDA build of torch) on CPU, serving MODEL on 127.0.0.1:PORT.
#   usage: tests/sglang/launch_sglang_cpu.sh VENV MODEL PORT [more sglang.launch_server args]
#   an API key: pass `--config FILE` with FILE a YAML holding `api_key: ...` (a key on the command line shows in ps)
# What CPU needs: SGLANG_USE_CPU_ENGINE=1 (else `--device cpu` still takes CUDA code paths) and the pure-torch
# sgl_kernel stub first on PYTHONPATH (PyPI's sglang-kernel is CUDA-only). A small KV pool: the default takes
# most of the machine's memory and ~40 s to allocate. float32, so logprobs match an fp32 forward within 1e-5.
# No CUDA coredump wait when it crashes or is stopped (SGLang waits 60 s for one by default).
set -euo pipefail
if [ $# -lt 3 ]; then echo "usage: $0 VENV MODEL PORT [sglang.launch_server args]" >&2; exit 2; fi
VENV=$1 MODEL=$2 PORT=$3
shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$HERE/sgl_kernel_stub${PYTHONPATH:+:$PYTHONPATH}"
export SGLANG_USE_CPU_ENGINE=1 HF_HUB_OFFLINE=1 SGLANG_CUDA_COREDUMP_BEFORE_CRASH_WAIT_SECS=0
exec "$VENV/bin/python" -m sglang.launch_server --model-path "$MODEL" --device cpu --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-total-tokens 65536 --mem-fraction-static 0.05 "$@"
