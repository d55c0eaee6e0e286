#!/usr/bin/env bash
# The protocol suite (tests/rollout/test_protocol.py) against real SGLang 0.5.23 on CPU: `make test-sglang`.
#   usage: tests/sglang/conformance.sh SGLANG_VENV PROJECT_BIN      (e.g. .venv-sglang .venv/bin)
# 1. writes the suite's tiny Qwen3 (float32) with a tokenizer to a private temp dir (tiny_checkpoint.py);
# 2. starts SGLang on it (launch_sglang_cpu.sh) on a free loopback port, with a random API key, and waits until
#    /health_generate answers;
# 3. runs the suite as a client (PROJECT_BIN's python: SGLang's venv serves, ours tests), the weight update from
#    distributed included (this process is rank 0 of a gloo group that SGLang's scheduler joins as rank 1);
# 4. always stops the server (SIGTERM, then SIGKILL to it and its children, by PID) and removes the temp dir.
# Exit code: the suite's. On failure the server log's tail is printed.
set -euo pipefail
if [ $# -ne 2 ]; then echo "usage: $0 SGLANG_VENV PROJECT_BIN" >&2; exit 2; fi
SGLANG_VENV=$1 BIN=$2
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
START_TIMEOUT=${SGLANG_START_TIMEOUT:-600}  # seconds; 35-150 s measured on 2 busy cores

WORK=$(mktemp -d -t megatron-rl-sglang.XXXXXX)  # mode 700: the key file and the log (SGLang logs its key) stay private
SERVER=""

descendants() {  # the PIDs under $1, deepest first
  local child
  for child in $(pgrep -P "$1" || true); do descendants "$child"; echo "$child"; done
}

stop_server() {
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    local family
    family="$(descendants "$SERVER") $SERVER"
    kill -TERM "$SERVER" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$SERVER" 2>/dev/null || break; sleep 1; done
    # shellcheck disable=SC2086  # a list of PIDs
    kill -KILL $family 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  SERVER=""
}

show_log() {
  echo "--- last 60 lines of the SGLang log ($WORK/sglang.log) ---" >&2
  tail -n 60 "$WORK/sglang.log" >&2 || true
}

cleanup() {
  local rc=$?
  stop_server
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

seconds() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.1f", b - a }'; }

cd "$ROOT"
"$BIN/python" "$HERE/tiny_checkpoint.py" "$WORK/model" > /dev/null 2>&1
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TOKEN=$("$BIN/python" -c 'import secrets; print(secrets.token_hex(16))')
(umask 077 && printf 'api-key: "%s"\n' "$TOKEN" > "$WORK/sglang.yaml")

echo "SGLang: starting on 127.0.0.1:$PORT (log: $WORK/sglang.log)"
started=$(seconds)
# --disable-overlap-schedule: with overlap scheduling (SGLang's default) the token in flight when an in-place pause
# begins is computed by the old weights but reported in the new weight_version's span (measured: one token early).
"$HERE/launch_sglang_cpu.sh" "$SGLANG_VENV" "$WORK/model" "$PORT" --config "$WORK/sglang.yaml" \
  --disable-overlap-schedule > "$WORK/sglang.log" 2>&1 &
SERVER=$!
if ! "$BIN/python" - "$PORT" "$SERVER" "$START_TIMEOUT" <<'EOF'
import os, sys, time
from megatron_rl.rollout.protocol import EngineClient
port, pid, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
probe, deadline = EngineClient(f"http://127.0.0.1:{port}", timeout=30), time.monotonic() + timeout
while not probe.health_generate():
    if not os.path.exists(f"/proc/{pid}"):
        sys.exit("SGLang exited before it was healthy")
    if time.monotonic() > deadline:
        sys.exit(f"SGLang not healthy in {timeout:.0f} s")
    time.sleep(1)
EOF
then
  show_log
  exit 1
fi
echo "SGLang: healthy after $(elapsed "$started") s"

# SGLang 0.5.23 on CPU lacks two optional features of the contract (see the suite's docstring): the read-back of a
# Qwen model's parameters (/get_weights_by_name exists for Llama-family model classes only), and a request's
# sampling_seed (honoured only under --enable-deterministic-inference, which refuses the CPU attention backends).
suite_started=$(seconds)
rc=0
MEGATRON_RL_PROTOCOL_URL="http://127.0.0.1:$PORT" MEGATRON_RL_PROTOCOL_MODEL="$WORK/model" \
  MEGATRON_RL_PROTOCOL_TOKEN="$TOKEN" MEGATRON_RL_PROTOCOL_WITHOUT=get_weights_by_name,sampling_seed \
  "$BIN/python" -m pytest -v -rs -p no:cacheprovider tests/rollout/test_protocol.py || rc=$?
echo "protocol suite against SGLang: exit $rc after $(elapsed "$suite_started") s"
if [ "$rc" -ne 0 ]; then show_log; fi
exit "$rc"
