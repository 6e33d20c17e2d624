#!/usr/bin/env bash
# load.sh: load one HTTP endpoint with `hey` (or `oha`) and measure what the server spent.
#
# Sends the same JSON body (one image) as POST requests to URL over keep-alive connections,
# at each concurrency of $CONCURRENCY (default "1 16 64") for DURATION seconds, after
# $WARMUP requests (default 50) that are not counted. For each run it prints one line:
#   requests/s, p50 and p99 latency (ms; hey reports 0.1 ms steps), answers that were not
#   200 (plus connection errors), the CPU time the server used (utime+stime from
#   /proc/PID/stat of SERVER_PID and all its descendants, before/after), that time per
#   request in core-milliseconds, the CPU time the load generator used (same machine), and what the
#   rest of the machine used meanwhile (/proc/stat busy time less those two: other work).
# With JSON_OUT=FILE it also appends one JSON object per run to FILE. LOADGEN=oha loads with
# oha (`cargo install oha`, tested with 1.16; Rust + tokio, about 30% less CPU per request
# than hey here, so more of a shared machine is left to the server) instead of hey; the
# same flags, its JSON summary read by python3 (whose start-up, a few tens of ms, counts
# as the load generator's CPU), and requests still in flight at the deadline are waited
# for (-w).
#
#   examples/peers/load.sh URL BODY.json SERVER_PID [DURATION_S=10] [LABEL=URL]
#   e.g. load.sh http://127.0.0.1:8501/v1/models/model:predict v1.json "$(pgrep -n mlops)" 2
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,15p' "$0"
  exit 2
fi
url=$1 body=$2 pid=$3 duration=${4:-10} label=${5:-$1}
loadgen=${LOADGEN:-hey}
case $loadgen in
  hey) command -v hey >/dev/null || { echo "load.sh: hey is not installed (apt-get install -y hey)" >&2; exit 1; } ;;
  oha) command -v oha >/dev/null || { echo "load.sh: oha is not installed (cargo install oha)" >&2; exit 1; } ;;
  *) echo "load.sh: LOADGEN must be hey or oha, not '$loadgen'" >&2; exit 2 ;;
esac
[ -d "/proc/$pid" ] || { echo "load.sh: no process $pid" >&2; exit 1; }
tick=$(getconf CLK_TCK)

# utime+stime (clock ticks) of process $1 and every descendant.
tree_ticks() {
  # (a process may exit between the glob and the read: cat then fails, which is fine)
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | sed 's/^\([0-9]*\) (.*) /\1 /' | awk -v root="$1" '
    { parent[$1] = $3; ticks[$1] = $13 + $14 }
    END {
      total = 0
      for (p in ticks) {
        q = p
        while (q != "" && q != 0 && q != root) q = parent[q]
        if (q == root) total += ticks[p]
      }
      print total
    }'
}

# user + nice + system + irq + softirq time of the whole machine (all cores), from /proc/stat.
# The kernel charges softirq work (e.g. the loopback network stack) to the process it ran in
# when it ran on a syscall's way out, so a process's utime+stime can hold time /proc/stat
# files under softirq: leaving softirq out made "other" below go negative.
machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }

request_args=(-m POST -T application/json -D "$body")
if [ "${body%.bin}" != "$body" ]; then
  # A binary tensor body: its JSON header's length beside it (bodies.py).
  request_args=(-m POST -T application/octet-stream -D "$body"
            -H "Inference-Header-Content-Length: $(cat "$body.json-length")")
fi
# One run of the load generator: `load N_OR_DURATION_FLAG VALUE CONCURRENCY`. oha's JSON
# summary is rewritten as the lines of hey's text report that the parser below reads.
load() {
  if [ "$loadgen" = hey ]; then
    hey "$1" "$2" -c "$3" "${request_args[@]}" "$url"
    return
  fi
  oha "$1" "$2" -c "$3" -w --no-tui --output-format json "${request_args[@]}" "$url" | python3 -c '
import json, sys
d = json.load(sys.stdin)
codes, errors = d.get("statusCodeDistribution") or {}, d.get("errorDistribution") or {}
total = d["summary"]["total"]
# Answers and errors per second, as hey counts them.
answered = sum(codes.values()) + sum(errors.values())
print(f"  Requests/sec:\t{answered / total if total else 0:.4f}")
for name, key in (("50%", "p50"), ("99%", "p99")):
    value = (d.get("latencyPercentiles") or {}).get(key)
    if value is not None:
        print(f"  {name} in {value:.6f} secs")
print("Status code distribution:")
for code, n in codes.items():
    print(f"  [{code}]\t{n} responses")
print("Error distribution:")
for message, n in errors.items():
    print(f"  [{n}]\t{message}")
'
}
load -n "${WARMUP:-50}" 1 >/dev/null

for c in ${CONCURRENCY:-1 16 64}; do
  out=$(mktemp)
  loadavg=$(cut -d' ' -f1 /proc/loadavg)  # 1-minute load before the run: other work on the machine
  before=$(tree_ticks "$pid")
  machine_before=$(machine_ticks)
  client_before=$(awk '{print $14 + $15 + $16 + $17}' /proc/$$/stat)  # this shell's children, once waited
  load -z "${duration}s" "$c" >"$out"
  after=$(tree_ticks "$pid")
  machine_after=$(machine_ticks)
  client_after=$(awk '{print $14 + $15 + $16 + $17}' /proc/$$/stat)
  result=$(awk -v label="$label" -v c="$c" -v d="$duration" -v tick="$tick" -v load="$loadavg" -v gen="$loadgen" \
    -v cpu="$((after - before))" -v ccpu="$((client_after - client_before))" \
    -v other="$((machine_after - machine_before - (after - before) - (client_after - client_before)))" '
    /Requests\/sec:/ { rps = $2 }
    /^ +50% in/ { p50 = sprintf("%.1f", $3 * 1000) }
    /^ +99% in/ { p99 = sprintf("%.1f", $3 * 1000) }
    /^Status code distribution:/ { section = "status"; next }
    /^Error distribution:/ { section = "error"; next }
    section == "status" && /^ +\[[0-9]+\]/ {
      code = $1; gsub(/[\[\]]/, "", code); n += $2; if (code != 200) bad += $2
    }
    section == "error" && /^ +\[[0-9]+\]/ { e = $1; gsub(/[\[\]]/, "", e); bad += e; errors += e }
    END {
      cpu_s = cpu / tick; per = (n > 0) ? cpu_s * 1000 / n : 0
      if (p50 == "") p50 = "null"  # hey leaves out a percentile it has too few answers for
      if (p99 == "") p99 = "null"
      printf "{\"label\":\"%s\",\"concurrency\":%d,\"duration_s\":%s,\"requests\":%d,", label, c, d, n
      printf "\"requests_per_s\":%.1f,\"p50_ms\":%s,\"p99_ms\":%s,", rps, p50, p99
      printf "\"non_200\":%d,\"connection_errors\":%d,\"server_cpu_s\":%.2f,", bad, errors, cpu_s
      printf "\"server_cores\":%.2f,\"server_core_ms_per_request\":%.4f,\"client_cpu_s\":%.2f,\"other_cpu_s\":%.2f,\"loadavg_before\":%s,\"load_generator\":\"%s\"}\n", \
        cpu_s / d, per, ccpu / tick, other / tick, load, gen
      printf "%-22s c=%-3d %9.1f req/s  p50 %6s ms  p99 %6s ms  non-200 %-4d ", label, c, rps, p50, p99, bad
      printf "server %6.2f core-s = %.3f core-ms/req  (%s %.2f, other %.2f core-s)\n", cpu_s, per, gen, ccpu / tick, other / tick
    }' "$out")
  rm -f "$out"
  [ -n "${JSON_OUT:-}" ] && head -n 1 <<<"$result" >>"$JSON_OUT"
  tail -n 1 <<<"$result"
done
