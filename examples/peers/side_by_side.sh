#!/usr/bin/env bash
# side_by_side.sh: serve one model with mlops and with Python model servers, load each the
# same way, and print one table (plus a JSON file) of throughput, latency and server CPU.
#
# For an mlops ARTIFACT (default fixtures/golden/model.safetensors) it exports the ONNX model
# with `mlops export`, writes single-image request bodies (bodies.py), then, one server at a
# time on a free loopback port: starts it, checks one answer, runs load.sh against each of
# its protocols (v1 = TF Serving/KServe v1 `instances`, v2 = Open Inference Protocol), stops it.
#   mlops           `mlops serve ARTIFACT --cache-size 0` (no prediction cache: every image runs);
#                   v1, v2 and the guide's /predict
#   kserve-default  kserve_server.py with KServe's defaults (1 worker, gRPC on, request logs on)
#                   and ONNX Runtime's default thread count
#   kserve-tuned    kserve_server.py --workers 2, gRPC off, logging off, ONNX Runtime 1 thread
#   mlserver-tuned  mlserver/ runtime, debug off, $MLSERVER_WORKERS parallel workers (default 0:
#                   inference in the server process; 2.2x the req/s of 2 here), ONNX Runtime
#                   1 thread (MLServer has v2 only)
#   guide           guide_server.py: FastAPI + Keras model.predict on fixtures/keras/cnn.keras
#                   (a different model file with the same architecture; its own API)
# Python venvs are made from requirements-*.txt under $VENVS when missing.
#
#   examples/peers/side_by_side.sh [ARTIFACT]
# Environment: DURATION (s per run, default 10), CONCURRENCY ("1 16 64"), MLOPS (binary,
# default target/release/mlops), VENVS (default /tmp/peers-venvs), OUT (default
# /tmp/peers-run-DATE), PEERS (default "mlops kserve-default kserve-tuned mlserver-tuned guide"),
# MLSERVER_WORKERS (0), KERAS_MODEL (fixtures/keras/cnn.keras), PYTHON (python3.11),
# LOADGEN (hey or oha, default hey; see load.sh).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
artifact=$(realpath "${1:-$root/fixtures/golden/model.safetensors}")
name=$(basename "$artifact" .safetensors)
DURATION=${DURATION:-10}
MLOPS=$(realpath "${MLOPS:-$root/target/release/mlops}")
VENVS=${VENVS:-/tmp/peers-venvs}
OUT=${OUT:-/tmp/peers-run-$(date +%Y%m%d-%H%M%S)}
PEERS=${PEERS:-mlops kserve-default kserve-tuned mlserver-tuned guide}
MLSERVER_WORKERS=${MLSERVER_WORKERS:-0}
KERAS_MODEL=$(realpath "${KERAS_MODEL:-$root/fixtures/keras/cnn.keras}")
PYTHON=${PYTHON:-python3.11}
export DURATION CONCURRENCY="${CONCURRENCY:-1 16 64}" JSON_OUT="$OUT/runs.jsonl" LOADGEN=${LOADGEN:-hey}

case $LOADGEN in
  hey | oha) command -v "$LOADGEN" >/dev/null || { echo "side_by_side.sh: $LOADGEN is not installed" >&2; exit 1; } ;;
  *) echo "side_by_side.sh: LOADGEN must be hey or oha, not '$LOADGEN'" >&2; exit 2 ;;
esac
mkdir -p "$OUT" "$VENVS"
: >"$JSON_OUT"
log() { echo "== $*" >&2; }

# make_venv NAME: $VENVS/NAME from requirements-NAME.txt, unless it is there already.
make_venv() {
  [ -x "$VENVS/$1/bin/python" ] && return 0
  log "creating $VENVS/$1 (requirements-$1.txt)"
  if ! { "$PYTHON" -m venv "$VENVS/$1" &&
         "$VENVS/$1/bin/pip" install -q -r "$here/requirements-$1.txt" >"$OUT/pip-$1.log" 2>&1; }; then
    rm -rf "${VENVS:?}/$1"
    return 1
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Every descendant of $1 (children first found, deepest last).
descendants() {
  local kid
  for kid in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$kid"; descendants "$kid"; done
}

# stop PID: SIGTERM, then SIGKILL whatever of its tree is left after 20 s.
stop() {
  local tree
  tree=$(descendants "$1")
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 200); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  for p in $1 $tree; do kill -KILL "$p" 2>/dev/null || true; done
  wait "$1" 2>/dev/null || true
}

# wait_ready PID URL: until URL answers 200 (120 s at most) while PID lives.
wait_ready() {
  for _ in $(seq 600); do
    kill -0 "$1" 2>/dev/null || { log "server exited; see its log"; return 1; }
    curl -sf -o /dev/null "$2" && return 0
    sleep 0.2
  done
  log "not ready after 120 s: $2"; return 1
}

# answer URL BODY: the class the server gives the body's image (argmax of its probabilities).
answer() {
  if [ "${2%.bin}" != "$2" ]; then
    # The binary tensor extension: JSON header, then the outputs' bytes (probabilities
    # first, FP32).
    python3 "$here/binary_answer.py" "$1" "$2"
    return
  fi
  curl -sf -X POST -H 'Content-Type: application/json' --data-binary "@$2" "$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)
if "outputs" in r:
    probs = next(o["data"] for o in r["outputs"] if o["name"] == "probabilities")
else:
    p = r["predictions"][0]
    probs = p["probabilities"] if isinstance(p, dict) else p
print(max(range(len(probs)), key=probs.__getitem__))'
}

# bench PEER: start it, check and load each of its endpoints, stop it.
bench() {
  local peer=$1 port pid ready endpoints=() cmd=() dir=$OUT
  port=$(free_port)
  local base=http://127.0.0.1:$port
  case $peer in
    mlops)
      cmd=("$MLOPS" serve "$artifact" --port "$port" --cache-size 0 --quiet)
      ready=$base/v2/health/ready
      # The guide's own API too (servers from 2026-11-30 on; an older one is skipped).
      # v2-binary: the binary tensor extension (tritonclient's default), mlops only here.
      endpoints=("v1 $base/v1/models/$name:predict v1.json" "v2 $base/v2/models/$name/infer v2.json"
                 "v2-binary $base/v2/models/$name/infer v2.bin"
                 "guide $base/predict guide.json") ;;
    kserve-default|kserve-tuned)
      cmd=("$VENVS/kserve/bin/python" "$here/kserve_server.py" --model_name "$name"
           --model_path "$OUT/model.onnx" --http_port "$port" --grpc_port "$(free_port)")
      if [ "$peer" = kserve-default ]; then
        cmd+=(--intra_op_threads 0)
      else
        cmd+=(--workers 2 --enable_grpc false --enable_latency_logging false
              --log_config_file "$here/kserve-quiet-logging.json" --intra_op_threads 1)
      fi
      ready=$base/v2/health/ready
      endpoints=("v1 $base/v1/models/$name:predict v1.json" "v2 $base/v2/models/$name/infer v2.json") ;;
    mlserver-tuned)
      dir=$OUT/mlserver
      rm -rf "$dir" && mkdir -p "$dir"
      cp "$here/mlserver/runtime.py" "$OUT/model.onnx" "$dir/"
      sed "s/\"name\": \"model\"/\"name\": \"$name\"/" "$here/mlserver/model-settings.json" >"$dir/model-settings.json"
      python3 - "$here/mlserver/settings.json" "$dir/settings.json" "$port" "$(free_port)" "$(free_port)" "$MLSERVER_WORKERS" <<'EOF'
import json, sys
src, dst, http, grpc, metrics, workers = sys.argv[1:]
s = json.load(open(src))
s.update(http_port=int(http), grpc_port=int(grpc), metrics_port=int(metrics), parallel_workers=int(workers))
json.dump(s, open(dst, "w"), indent=2)
EOF
      cmd=("$VENVS/mlserver/bin/mlserver" start .)
      ready=$base/v2/health/ready
      endpoints=("v2 $base/v2/models/$name/infer v2.json") ;;
    guide)
      cmd=("$VENVS/guide/bin/python" "$here/guide_server.py" --model "$KERAS_MODEL" --port "$port")
      ready=$base/health
      endpoints=("guide $base/predict guide.json") ;;
    *) log "unknown peer $peer"; return 1 ;;
  esac
  log "$peer: ${cmd[*]}"
  (cd "$dir" && exec "${cmd[@]}") >"$OUT/$peer.log" 2>&1 &
  pid=$!
  if ! wait_ready "$pid" "$ready"; then stop "$pid"; return 1; fi
  local e api url body cls
  for e in "${endpoints[@]}"; do
    read -r api url body <<<"$e"
    cls=$(answer "$url" "$OUT/$body") || { log "$peer $api: no valid answer from $url, skipped"; continue; }
    log "$peer $api: answers class $cls for the test image (label $label)"
    echo "{\"label\":\"$peer $api\",\"answer_class\":$cls}" >>"$OUT/answers.jsonl"
    "$here/load.sh" "$url" "$OUT/$body" "$pid" "$DURATION" "$peer $api" || log "$peer $api: load.sh failed"
  done
  stop "$pid"
}

for p in $PEERS; do
  case $p in
    kserve-*) make_venv kserve ;;
    mlserver-*) make_venv mlserver ;;
    guide) make_venv guide || { log "guide venv failed (tensorflow-cpu is ~600 MB): skipping guide"
                                PEERS=${PEERS//guide/}; } ;;
  esac
done

"$MLOPS" export "$artifact" --format onnx --out "$OUT/model.onnx" --quiet
label=$(python3 "$here/bodies.py" "$root/fixtures/mnist-tiny/t10k-images-idx3-ubyte.gz" "$OUT")
: >"$OUT/answers.jsonl"

for p in $PEERS; do bench "$p" || log "$p failed; see $OUT/$p.log"; done

# One JSON file with every figure, the versions, and a table.
{
  echo "mlops $("$MLOPS" --version | awk '{print $2}')"
  case $LOADGEN in
    hey) echo "hey $(dpkg-query -W -f='${Version}' hey 2>/dev/null || echo '?')" ;;
    *) echo "$("$LOADGEN" --version 2>/dev/null || echo "$LOADGEN ?")" ;;
  esac
  for v in kserve mlserver guide; do
    [ -x "$VENVS/$v/bin/pip" ] && "$VENVS/$v/bin/pip" freeze 2>/dev/null |
      grep -iE '^(kserve|mlserver|onnxruntime|numpy|fastapi|uvicorn|uvloop|tensorflow[-_]cpu|keras)==' |
      sed "s/^/$v: /"
  done
} >"$OUT/versions.txt"
python3 - "$OUT" "$DURATION" "$artifact" "$(nproc)" "$LOADGEN" <<'EOF'
import json, sys, datetime
out, duration, artifact, cores, loadgen = sys.argv[1:]
runs = [json.loads(l) for l in open(f"{out}/runs.jsonl") if l.strip()]
answers = {a["label"]: a["answer_class"] for a in map(json.loads, open(f"{out}/answers.jsonl")) if a}
for r in runs:
    r["answer_class"] = answers.get(r["label"])
doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "cores": int(cores), "duration_s": float(duration), "artifact": artifact, "load_generator": loadgen,
       "versions": open(f"{out}/versions.txt").read().splitlines(), "runs": runs}
json.dump(doc, open(f"{out}/results.json", "w"), indent=1)
print(f"\n{'server api':<22}{'conc':>5}{'req/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'non200':>7}"
      f"{'srv cores':>10}{'core-ms/req':>12}{'other':>7}{'class':>6}")
for r in runs:
    ms = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"{r['label']:<22}{r['concurrency']:>5}{r['requests_per_s']:>10.1f}{ms(r['p50_ms']):>8}"
          f"{ms(r['p99_ms']):>8}{r['non_200']:>7}{r['server_cores']:>10.2f}"
          f"{r['server_core_ms_per_request']:>12.3f}{r['other_cpu_s'] / r['duration_s']:>7.2f}"
          f"{str(r['answer_class']):>6}")
print(f"\n{out}/results.json ({len(runs)} runs, {duration} s each, {cores} cores shared by servers and {loadgen};"
      " other: cores busy with anything else during the run)")
EOF
