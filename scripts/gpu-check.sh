#!/usr/bin/env bash
# The GPU proof of issue 12 in one call, on a machine with an NVIDIA GPU (H100/H200, driver
# >= 580), run from the repository root with the CUDA build carried along:
#
#   bash scripts/gpu-check.sh                     # device tool: carry ["target/cuda"]
#
# It needs target/cuda/{mlops,cuda-env.sh} (scripts/build-cuda.sh makes them; cuda-env.sh
# finds the CUDA runtime libraries in the machine's PyTorch venv), fixtures/ (committed) and
# a python3 with torch (the GPU machine's own) for the PyTorch reference and the summary.
# Steps, each under `timeout` and an overall budget, a failure recorded and the next step run:
#   env          ldd of the binary, nvidia-smi, train --help (does --precision exist?)
#   errors       a bad ordinal is a one-line error; int8 on CUDA: real path or clear refusal
#   agreement    eval (mnist-tiny) and predict (the whole test set) of the golden model on
#                CUDA, CPU candle and CPU native: accuracy, loss, probabilities to 1e-4
#   train        2-epoch CUDA fp32 training on fixtures/mnist (accuracy, images/s), then the
#                trained model evaluated on the CPU
#   torch        the same model and epochs in PyTorch eager on the same GPU
#   bench        fp32/fp16/bf16 artifacts of the golden model at batch 1, 64, 1024
#   train bf16   when `mlops train --help` offers --precision
#   train ddp    `train --devices cuda:0` (a one-rank NCCL group; cuda:0,cuda:1 with two GPUs)
#                against `--device cuda` on the same 10,000 images
# Output under $OUT (default target/gpu-check), at most 8 files as the device tool returns:
#   summary.json     every figure, the pass/fail of each check, each step's status
#   log.txt          this script's log (each step's stderr tail)
#   details.tar.gz   every step's raw stdout/stderr and JSON (not the model files)
#
# Environment: MLOPS_BIN (default target/cuda/mlops), GPU_CHECK_BUDGET_S (360: the script
# stops starting steps when it is spent), TORCH_PYTHON (python3), PYTHON (python3: the
# summary), GPU_CHECK_DEVICE=cpu for a local run of the plumbing on a machine without a GPU:
# `--engine candle` stands in for `--device cuda`, with small data and epochs (the bars
# then say nothing about a GPU; the mode is in the summary).
set -u

T0=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

MODE=${GPU_CHECK_DEVICE:-cuda}
OUT=${OUT:-$REPO/target/gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-360}
PYTHON=${PYTHON:-python3}
TORCH_PYTHON=${TORCH_PYTHON:-python3}
MLOPS_BIN=${MLOPS_BIN:-target/cuda/mlops}
GOLDEN=fixtures/golden/model.safetensors
DATA=fixtures/mnist
TINY=fixtures/mnist-tiny

mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
STEPS=$WORK/steps.tsv
: >"$STEPS"
exec > >(tee -a "$OUT/log.txt") 2>&1

case "$MODE" in
  cuda)
    DEV=(--device cuda)
    BAD_DEV=(--device cuda:99)
    TRAIN_SIZE=()                       # the whole of fixtures/mnist, 2 epochs
    EPOCHS=2
    PRED_LIMIT=()                       # the whole test set
    EVAL_LIMIT=()
    BENCH_ARGS=(--batch "1,64,1024")
    TORCH_ARGS=(--device cuda)
    ;;
  cpu)
    DEV=(--engine candle)
    BAD_DEV=(--device cuda:99)
    TRAIN_SIZE=(--limit 2000 --val-limit 500)
    EPOCHS=1
    PRED_LIMIT=(--limit 500)
    EVAL_LIMIT=(--limit 500)
    BENCH_ARGS=(--batch "1,64" --duration 0 --iters 5 --warmup 2 --warmup-secs 0)
    TORCH_ARGS=(--device cpu --limit 2000 --val-limit 500)
    ;;
  *) echo "GPU_CHECK_DEVICE must be cuda or cpu, not '$MODE'"; exit 2 ;;
esac

# As users run it: RUST_BACKTRACE=1 makes candle append a captured backtrace to its errors.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE

log() { printf '[gpu-check %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }

# The CUDA libraries the binary needs (cuda-env.sh beside it; absent for a CPU-only build).
BIN_DIR=$(dirname "$MLOPS_BIN")
if [ -f "$BIN_DIR/cuda-env.sh" ]; then
  # On a machine without a GPU (cpu mode) the build's libcuda stub lets the binary load.
  [ "$MODE" = cpu ] && export MLOPS_CUDA_STUB=1
  # shellcheck source=/dev/null
  . "$BIN_DIR/cuda-env.sh"
fi
log "mode $MODE, binary $MLOPS_BIN, LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}, work $WORK, budget ${BUDGET}s"

# step NAME TIMEOUT_S CMD...: runs CMD with stdout to $WORK/NAME.out, stderr to
# $WORK/NAME.err, under `timeout` capped by what is left of the budget; records
# NAME, rc, seconds, status (ok | fail | timeout | skipped) in steps.tsv. Never exits.
step() {
  local name=$1 limit=$2 left rc t1 secs status
  shift 2
  left=$((BUDGET - ($(date +%s) - T0) - 5))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 5 ]; then
    skip "$name" "budget spent (GPU_CHECK_BUDGET_S=$BUDGET)"
    return 0
  fi
  log "$name: $* (timeout ${limit}s)"
  t1=$(date +%s.%N)
  timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"
  rc=$?
  secs=$(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=fail ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$status" >>"$STEPS"
  log "$name: $status (rc $rc, ${secs}s)"
  if [ "$status" != ok ]; then tail -n 5 "$WORK/$name.err" | sed 's/^/    /'; fi
  return 0
}
# skip NAME REASON: records a step not run.
skip() {
  printf '%s\t\t0\t0\tskipped\n' "$1" >>"$STEPS"
  printf '%s\n' "$2" >"$WORK/$1.err"
  log "$1: skipped ($2)"
}

M=$MLOPS_BIN

# ---- env --------------------------------------------------------------------------------
step ldd 20 ldd "$M"
step nvidia_smi 20 nvidia-smi
step nvidia_smi_query 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,compute_cap,clocks.max.sm,power.limit --format=csv,noheader,nounits
step version 20 "$M" --version
step train_help 20 "$M" train --help

# ---- errors: a bad ordinal (one line, no panic); int8 on CUDA --------------------------
if [ "$MODE" = cuda ]; then
  step bad_ordinal 30 "$M" eval "$GOLDEN" "${BAD_DEV[@]}" --data "$TINY" --json
  step int8_cuda 30 "$M" eval fixtures/golden/model.int8.safetensors "${DEV[@]}" --data "$TINY" --json
else
  skip bad_ordinal "cpu mode"
  skip int8_cuda "cpu mode"
fi

# ---- agreement: the golden model on CUDA, CPU candle and CPU native ---------------------
step eval_dev 60 "$M" -q eval "$GOLDEN" "${DEV[@]}" --data "$TINY" --json
step eval_candle_cpu 60 "$M" -q eval "$GOLDEN" --engine candle --data "$TINY" --json
step eval_native 60 "$M" -q eval "$GOLDEN" --data "$TINY" --json
step predict_dev 90 "$M" -q predict "$GOLDEN" "${DEV[@]}" --data "$DATA" "${PRED_LIMIT[@]}" --json
step predict_candle_cpu 90 "$M" -q predict "$GOLDEN" --engine candle --data "$DATA" "${PRED_LIMIT[@]}" --json
step predict_native 60 "$M" -q predict "$GOLDEN" --data "$DATA" "${PRED_LIMIT[@]}" --json

# ---- train fp32 (the figure that matters most), then the PyTorch yardstick -------------
step train_fp32 180 "$M" -q train "${DEV[@]}" --data "$DATA" --epochs "$EPOCHS" "${TRAIN_SIZE[@]}" \
  --out "$WORK/train-fp32" --json
if [ -f "$WORK/train-fp32/model.safetensors" ]; then
  step trained_eval_native 60 "$M" -q eval "$WORK/train-fp32/model.safetensors" --data "$DATA" \
    "${EVAL_LIMIT[@]}" --json
  step trained_eval_dev 60 "$M" -q eval "$WORK/train-fp32/model.safetensors" "${DEV[@]}" --data "$DATA" \
    "${EVAL_LIMIT[@]}" --json
else
  skip trained_eval_native "train_fp32 wrote no model"
  skip trained_eval_dev "train_fp32 wrote no model"
fi
step torch_fp32 120 "$TORCH_PYTHON" examples/torch_reference.py --data "$DATA" --epochs "$EPOCHS" "${TORCH_ARGS[@]}"

# ---- bench fp32 / fp16 / bf16 ------------------------------------------------------------
step export_fp16 30 "$M" -q export "$GOLDEN" --precision fp16 --out "$WORK/model.fp16.safetensors"
step export_bf16 30 "$M" -q export "$GOLDEN" --precision bf16 --out "$WORK/model.bf16.safetensors"
BENCH_SET=("$GOLDEN")
for p in fp16 bf16; do
  if [ -f "$WORK/model.$p.safetensors" ]; then BENCH_SET+=("$WORK/model.$p.safetensors"); fi
done
step bench 120 "$M" -q bench "${BENCH_SET[@]}" "${DEV[@]}" "${BENCH_ARGS[@]}" --format json

# ---- train bf16 (when the binary has --precision) and torch bf16 -------------------------
if [ ! -s "$WORK/train_help.out" ]; then
  skip train_bf16 "'mlops train --help' did not run, so whether --precision exists is unknown"
elif grep -q -- '--precision' "$WORK/train_help.out"; then
  if [ "$MODE" = cuda ]; then
    step train_bf16 150 "$M" -q train "${DEV[@]}" --precision bf16 --data "$DATA" --epochs "$EPOCHS" \
      "${TRAIN_SIZE[@]}" --out "$WORK/train-bf16" --json
  else
    # candle's CPU backend has no bf16 convolution: fp16 exercises the same plumbing.
    step train_bf16 150 "$M" -q train "${DEV[@]}" --precision fp16 --data "$DATA" --epochs "$EPOCHS" \
      "${TRAIN_SIZE[@]}" --out "$WORK/train-bf16" --json
  fi
else
  skip train_bf16 "this mlops build has no 'train --precision' (see train_help)"
fi
step torch_bf16 90 "$TORCH_PYTHON" examples/torch_reference.py --data "$DATA" --epochs "$EPOCHS" \
  --precision bf16 "${TORCH_ARGS[@]}"

# ---- data parallel: NCCL (`--devices`) against one device, same data and settings -------
if [ "$MODE" = cuda ]; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
  if [ "${GPUS:-0}" -ge 2 ]; then DDP_DEVICES=cuda:0,cuda:1; else DDP_DEVICES=cuda:0; fi
  DDP_SIZE=(--epochs 1 --limit 10000 --val-limit 2000)
else
  DDP_DEVICES=cpu,cpu
  DDP_SIZE=(--epochs 1 --limit 1000 --val-limit 500)
fi
step train_ddp 90 "$M" -q train --devices "$DDP_DEVICES" --data "$DATA" "${DDP_SIZE[@]}" \
  --out "$WORK/train-ddp" --json
step train_ddp_ref 90 "$M" -q train "${DEV[@]}" --data "$DATA" "${DDP_SIZE[@]}" \
  --out "$WORK/train-ddp-ref" --json

# ---- summary -----------------------------------------------------------------------------
log "writing the summary"
MODE=$MODE WORK=$WORK OUT=$OUT BUDGET=$BUDGET MLOPS_BIN=$M ELAPSED=$(($(date +%s) - T0)) \
  LIBS_MISSING=${MLOPS_CUDA_LIBS_MISSING:-} LIBS=${MLOPS_CUDA_LIBS:-} \
  "$PYTHON" - <<'PY' || { log "summary failed"; printf '{"error": "the summary script failed; see log.txt"}\n' >"$OUT/summary.json"; }
import json, os, re

mode, work, out = os.environ["MODE"], os.environ["WORK"], os.environ["OUT"]
cuda = mode == "cuda"


def text(name, ext):
    try:
        with open(os.path.join(work, f"{name}.{ext}"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def doc(name):
    try:
        return json.loads(text(name, "out"))
    except ValueError:
        return None


def find(o, key):
    """The first value of `key` in a JSON document, depth first."""
    if isinstance(o, dict):
        if key in o:
            return o[key]
        for v in o.values():
            r = find(v, key)
            if r is not None:
                return r
    elif isinstance(o, list):
        for v in o:
            r = find(v, key)
            if r is not None:
                return r
    return None


steps = {}
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, secs, limit, status = line.rstrip("\n").split("\t")
    err = text(name, "err").strip().splitlines()
    steps[name] = {
        "status": status,
        "rc": int(rc) if rc else None,
        "seconds": float(secs),
        "timeout_s": int(limit),
        "stderr_tail": err[-8:],
    }

checks, figures = {}, {}


def check(name, ok, **info):
    """ok: True/False, or None when it could not be decided (a step failed or was skipped)."""
    checks[name] = {"pass": ok, **info}


# -- env
figures["cuda_libs"] = {"needed": os.environ.get("LIBS", "").split(), "missing": os.environ.get("LIBS_MISSING", "").split(),
                        "LD_LIBRARY_PATH": os.environ.get("LD_LIBRARY_PATH", "")}
figures["ldd"] = text("ldd", "out").strip().splitlines()
figures["ldd_not_found"] = [l.strip() for l in figures["ldd"] if "not found" in l]
figures["nvidia_smi"] = text("nvidia_smi", "out").strip().splitlines()
q = text("nvidia_smi_query", "out").strip()
if q:
    keys = ["name", "driver", "memory_total_mib", "memory_used_mib", "compute_cap", "max_sm_clock_mhz", "power_limit_w"]
    figures["gpu"] = dict(zip(keys, [v.strip() for v in q.splitlines()[0].split(",")]))
figures["mlops_version"] = text("version", "out").strip()
figures["train_has_precision"] = "--precision" in text("train_help", "out")
check("binary_loads", steps.get("ldd", {}).get("status") == "ok" and not figures["ldd_not_found"]
      and steps.get("version", {}).get("status") == "ok", not_found=figures["ldd_not_found"])

# -- errors
if cuda:
    s, err = steps.get("bad_ordinal", {}), [l for l in text("bad_ordinal", "err").splitlines() if l.strip()]
    check("bad_ordinal_one_line_error", s.get("status") == "fail" and len(err) == 1 and "panicked" not in text("bad_ordinal", "err"),
          rc=s.get("rc"), stderr=err[:5])
    s, err = steps.get("int8_cuda", {}), [l for l in text("int8_cuda", "err").splitlines() if l.strip()]
    refused = s.get("status") == "fail" and len(err) >= 1 and "panicked" not in text("int8_cuda", "err")
    ran = s.get("status") == "ok"
    check("int8_on_cuda_runs_or_refuses_clearly", ran or (refused and bool(re.search(r"fp16|bf16", " ".join(err)))),
          outcome="ran" if ran else ("refused" if refused else s.get("status")), stderr=err[:5],
          accuracy=find(doc("int8_cuda"), "accuracy") if ran else None)

# -- agreement
ev = {k: doc(k) for k in ("eval_dev", "eval_candle_cpu", "eval_native")}
figures["eval_tiny"] = {k: ({"accuracy": find(v, "accuracy"), "loss": find(v, "loss"), "compute": find(v, "compute"),
                             "device": find(v, "device")} if v else None) for k, v in ev.items()}
if all(ev.values()):
    a = {k: find(v, "accuracy") for k, v in ev.items()}
    l = {k: find(v, "loss") for k, v in ev.items()}
    dl = max(abs(l["eval_dev"] - l["eval_candle_cpu"]), abs(l["eval_dev"] - l["eval_native"]))
    check("eval_agrees", a["eval_dev"] == a["eval_candle_cpu"] == a["eval_native"] and dl <= 1e-4,
          accuracy=a, loss_max_abs_diff=dl)
else:
    check("eval_agrees", None, note="an eval step failed")

pr = {k: doc(k) for k in ("predict_dev", "predict_candle_cpu", "predict_native")}
if all(pr.values()):
    P = {k: v["predictions"] for k, v in pr.items()}
    n = len(P["predict_dev"])
    res = {"images": n}
    ok = n > 0
    for other in ("predict_candle_cpu", "predict_native"):
        o = P[other]
        if len(o) != n:
            ok = False
            res[other] = {"error": f"{len(o)} predictions against {n}"}
            continue
        maxd = max(abs(x - y) for a_, b_ in zip(P["predict_dev"], o) for x, y in zip(a_["probabilities"], b_["probabilities"]))
        top1 = sum(a_["class"] != b_["class"] for a_, b_ in zip(P["predict_dev"], o))
        res[other] = {"prob_max_abs_diff": maxd, "top1_mismatches": top1}
        ok = ok and maxd <= 1e-4 and top1 == 0
    figures["predict_agreement"] = res
    check("cpu_vs_device_probabilities_1e-4", ok, **res)
else:
    check("cpu_vs_device_probabilities_1e-4", None, note="a predict step failed")


# -- training
def train_fig(name):
    d = doc(name)
    if not d:
        return None
    eps = find(d, "epoch_reports") or []
    return {
        "test_accuracy": find(d, "test_accuracy"),
        "images_per_s_median": find(d, "images_per_s"),
        "images_per_s_last_epoch": eps[-1]["images_per_s"] if eps else None,
        "epochs": [{k: e.get(k) for k in ("epoch", "train_loss", "test_accuracy", "train_seconds", "images_per_s")} for e in eps],
        "engine": find(d, "engine"), "precision": find(d, "precision"),
        "loss_scale": find(d, "loss_scale"), "skipped_steps": find(d, "skipped_steps"),
        "train_images": find(d, "train_images"), "batch_size": find(d, "batch_size"),
        "seconds": steps.get(name, {}).get("seconds"),
    }


def torch_fig(name):
    d = doc(name)
    if not d:
        return None
    return {k: d.get(k) for k in ("images_per_s", "test_accuracy", "device_name", "torch", "precision",
                                  "cudnn_allow_tf32", "train_images", "batch_size")} | {
        "epochs": [{k: e.get(k) for k in ("epoch", "test_accuracy", "train_seconds", "images_per_s")} for e in d["epoch_reports"]],
        "seconds": steps.get(name, {}).get("seconds")}


for k in ("train_fp32", "train_bf16"):
    figures[k] = train_fig(k)
for k in ("torch_fp32", "torch_bf16"):
    figures[k] = torch_fig(k)
t = figures["train_fp32"]
bar = 0.988 if cuda else None
if t and t["test_accuracy"] is not None:
    check("train_fp32_test_accuracy_ge_0.988", (t["test_accuracy"] >= 0.988) if cuda else None,
          test_accuracy=t["test_accuracy"], note=None if cuda else "cpu mode: small data, bar not applied")
else:
    check("train_fp32_test_accuracy_ge_0.988", False if steps.get("train_fp32", {}).get("status") != "skipped" else None,
          note="train_fp32 " + steps.get("train_fp32", {}).get("status", "missing"))
tv, td = doc("trained_eval_native"), doc("trained_eval_dev")
if tv and td:
    d = abs(find(tv, "accuracy") - find(td, "accuracy"))
    check("trained_model_cpu_vs_device_accuracy", d <= 1e-4, cpu=find(tv, "accuracy"), device=find(td, "accuracy"),
          loss_abs_diff=abs(find(tv, "loss") - find(td, "loss")))
else:
    check("trained_model_cpu_vs_device_accuracy", None, note="a trained-model eval did not run")
tt = figures["torch_fp32"]
if t and tt and tt.get("images_per_s") and t["images_per_s_last_epoch"]:
    ratio = t["images_per_s_last_epoch"] / tt["images_per_s"]
    figures["train_vs_torch"] = {"mlops_images_per_s_last_epoch": t["images_per_s_last_epoch"],
                                 "mlops_images_per_s_median": t["images_per_s_median"],
                                 "torch_images_per_s_last_epoch": tt["images_per_s"], "ratio": ratio}
    check("train_images_per_s_ge_pytorch_eager", ratio >= 1.0 if cuda else None, ratio=ratio,
          mlops=t["images_per_s_last_epoch"], pytorch=tt["images_per_s"])
else:
    check("train_images_per_s_ge_pytorch_eager", None, note="mlops or PyTorch training did not finish")
tb = figures["train_bf16"]
if tb and t and tb["images_per_s_last_epoch"] and t["images_per_s_last_epoch"]:
    check("train_bf16_faster_than_fp32", (tb["images_per_s_last_epoch"] > t["images_per_s_last_epoch"]) if cuda else None,
          bf16=tb["images_per_s_last_epoch"], fp32=t["images_per_s_last_epoch"], bf16_test_accuracy=tb["test_accuracy"],
          note=None if cuda else "cpu mode: fp16 on the CPU, bar not applied")
else:
    check("train_bf16_faster_than_fp32", None, note="skipped: " + " ".join(steps.get("train_bf16", {}).get("stderr_tail", []))
          if steps.get("train_bf16", {}).get("status") == "skipped" else "train_bf16 " + steps.get("train_bf16", {}).get("status", "missing"))

# -- data parallel (`--devices`: NCCL on GPUs) against one device
dp, ref = doc("train_ddp"), doc("train_ddp_ref")
if dp and ref:
    a, r = find(dp, "test_accuracy"), find(ref, "test_accuracy")
    figures["train_ddp"] = {"devices": find(dp, "devices"), "world_size": find(dp, "world_size"),
                            "test_accuracy": a, "reference_test_accuracy": r,
                            "images_per_s": find(dp, "images_per_s"), "reference_images_per_s": find(ref, "images_per_s")}
    check("data_parallel_trains_like_one_device", abs(a - r) <= 0.01, **figures["train_ddp"])
else:
    check("data_parallel_trains_like_one_device", None,
          note="train_ddp " + steps.get("train_ddp", {}).get("status", "missing") + ", train_ddp_ref "
          + steps.get("train_ddp_ref", {}).get("status", "missing"))

# -- bench
b = doc("bench")
if b:
    rows = []
    for r in b.get("rows", []):
        rows.append({k: v for k, v in r.items() if k not in ("samples_us", "sha256")})
    figures["bench"] = {"machine": b.get("machine"), "rows": rows}
    thr = {(r.get("precision"), r.get("batch")): r.get("throughput_images_per_s") for r in rows}
    big = max((r.get("batch") or 0) for r in rows) if rows else None
    f32, b16 = thr.get(("fp32", big)), thr.get(("bf16", big))
    check("bench_all_precisions_ran", {r.get("precision") for r in rows} >= {"fp32", "fp16", "bf16"}, batches=sorted({r.get("batch") for r in rows}))
    check("bench_bf16_faster_than_fp32_at_largest_batch", (b16 > f32) if (cuda and f32 and b16) else None, batch=big, fp32=f32, bf16=b16)
else:
    st = steps.get("bench", {}).get("status", "missing")
    check("bench_all_precisions_ran", None if st == "skipped" else False, note="bench " + st)

decided = [c["pass"] for c in checks.values() if c["pass"] is not None]
summary = {
    "mode": mode,
    "binary": os.environ["MLOPS_BIN"],
    "elapsed_s": int(os.environ["ELAPSED"]),
    "budget_s": int(os.environ["BUDGET"]),
    "all_pass": bool(decided) and all(decided) and all(c["pass"] is not None for c in checks.values()),
    "checks": checks,
    "figures": figures,
    "steps": steps,
}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print("checks:")
for k, c in checks.items():
    print(f"  {'PASS' if c['pass'] else ('n/a ' if c['pass'] is None else 'FAIL')}  {k}  " +
          json.dumps({x: y for x, y in c.items() if x != "pass"})[:300])
print("steps: " + " ".join(f"{k}={v['status']}({v['seconds']:.0f}s)" for k, v in steps.items()))
PY

# Raw outputs (no model files) in one archive: the device tool returns at most 8 files.
tar -czf "$OUT/details.tar.gz" -C "$WORK" --exclude='*.safetensors' . 2>/dev/null || log "details archive failed"
log "done in $(($(date +%s) - T0))s; $OUT: $(cd "$OUT" && echo *)"
rm -rf "$WORK"
exit 0
