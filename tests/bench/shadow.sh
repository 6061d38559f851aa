#!/usr/bin/env bash
# What shadow traffic costs the live path, on this machine: throughput and latency of
# the agent's proxy with shadow off, at 10 % and 100 % to a healthy new slot, and at
# 100 % to a new slot that never answers, side by side in one run; the copies sent and
# dropped meanwhile; and the time from the first failing shadow interval to the rollback
# being confirmed by every host. Prints tables; not a test.
#
# Each case is its own service on the same agent (the same sample release live, and for
# the shadow cases a new release in its shadow phase), and wrk visits them in turn for
# several rounds, so that whatever else the machine does weighs on every case alike; the
# table shows each case's median over the rounds.
#   tests/bench/shadow.sh [seconds per round] [connections] [rounds] [rollbacks]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SECS=${1:-5}
CONNS=${2:-32}
ROUNDS=${3:-5}
ROLLBACKS=${4:-5}

need() { command -v "$1" >/dev/null 2>&1 || { echo "==> installing $2"; apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk

echo "==> building release binaries"
cargo build --release --workspace --bins --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
WORK=$(mktemp -d /tmp/cutover-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { local d=$(( $(date +%s) + $1 )); shift; until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$d" ] || { echo "timed out: $*" >&2; exit 1; }; sleep 0.2; done; }

# A coordinator and one agent (its proxy on 127.0.0.2, its /metrics on --http).
COORD=127.0.0.1:$(free_port)
AGENT_HTTP=127.0.0.1:$(free_port)
export CUTOVER_COORDINATOR=$COORD CUTOVER_CREDENTIALS=$WORK/coordinator/admin
"$BIN/cutover" serve --data-dir "$WORK/coordinator" --listen "$COORD" --http "127.0.0.1:$(free_port)" >"$WORK/coordinator.log" 2>&1 &
pids+=($!)
wait_for 20 "$BIN/cutover" hosts
"$BIN/cutover-agent" join --coordinator "$COORD" --token "$("$BIN/cutover" token create)" --data-dir "$WORK/agent" --name bench 2>/dev/null
RUST_LOG=warn "$BIN/cutover-agent" run --data-dir "$WORK/agent" --service-address 127.0.0.2 --http "$AGENT_HTTP" >"$WORK/agent.log" 2>&1 &
pids+=($!)
wait_for 20 sh -c "'$BIN/cutover' hosts --output json | grep -q '\"connected\": true'"

declare -A PORT
# plan SERVICE VERSION BEHAVIOUR STRATEGY ANALYSIS: writes $WORK/SERVICE-VERSION.toml.
plan() {
  local sha; sha=$("$BIN/cutover-sample" pack --out "$WORK/$1-$2.tar.gz" --version "$2" $3)
  cat >"$WORK/$1-$2.toml" <<PLAN
service = "$1"
[release]
version = "$2"
artifact = "file://$WORK/$1-$2.tar.gz"
sha256 = "$sha"
[run]
command = ["./bin/cutover-sample", "serve", "--port", "\${PORT}"]
listen = ${PORT[$1]}
drain = "1s"
stop_timeout = "5s"
[health]
http = "/healthz"
interval = "200ms"
[strategy]
$4
$5
PLAN
}

# The cases: a service each, v1 live on all of them.
CASES=(off healthy-10 healthy-100 hanging-100)
declare -A LABEL=([off]="shadow off" [healthy-10]="shadow 10% -> healthy slot"
  [healthy-100]="shadow 100% -> healthy slot" [hanging-100]="shadow 100% -> hanging slot")
echo "==> v1 live on ${#CASES[@]} services"
for s in "${CASES[@]}"; do
  PORT[$s]=$(free_port)
  plan "$s" 1.0.0 "" "" ""
  "$BIN/cutover" deploy "$WORK/$s-1.0.0.toml" --wait >/dev/null 2>&1
done

# shadowing SERVICE BEHAVIOUR SHARE: v2 in a shadow phase that copies SHARE % of GETs
# until aborted (nothing judged); waits until the host copies to it.
declare -A DEP
shadowing() {
  plan "$1" 2.0.0 "$2" "shadow = { duration = \"1h\", share = $3, methods = [\"GET\"] }" ""
  DEP[$1]=$("$BIN/cutover" deploy "$WORK/$1-2.0.0.toml")
  wait_for 60 sh -c "'$BIN/cutover' show ${DEP[$1]} --output json | grep -q '\"event\": \"shadow_holding\"'"
}
echo "==> v2 in its shadow phase on the shadow cases"
shadowing healthy-10 "" 10
shadowing healthy-100 "" 100
shadowing hanging-100 "hang=1" 100

# shadow_counter SERVICE NAME: the new (green) slot's shadow counter from /metrics.
shadow_counter() {
  curl -fs "http://$AGENT_HTTP/metrics" | awk -v n="cutover_agent_shadow_$2_total" -v s="service=\"$1\"" \
    'index($1, n"{") == 1 && index($1, s) && index($1, "slot=\"green\"") {print $2; found=1} END {if (!found) print 0}'
}

echo "==> $ROUNDS rounds of ${SECS}s per case, the cases in turn"
for r in $(seq 1 "$ROUNDS"); do
  for s in "${CASES[@]}"; do
    wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.2:${PORT[$s]}/" >"$WORK/wrk-$s-$r.txt" 2>&1
  done
done

echo
echo "live path: wrk, $ROUNDS rounds of ${SECS}s per case, $CONNS keep-alive connections, 2 threads, $(nproc) cores shared by everything; medians over the rounds"
printf '%-30s %12s %10s %10s %12s %10s %8s\n' "" "requests/s" "p50" "p99" "copies sent" "dropped" "non-2xx"
for s in "${CASES[@]}"; do
  python3 - "$WORK" "$s" "$ROUNDS" "${LABEL[$s]}" "$(shadow_counter "$s" requests)" "$(shadow_counter "$s" dropped)" <<'PY'
import re, statistics, sys
work, case, rounds, label, sent, dropped = sys.argv[1:]
def ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
rps, p50, p99, bad = [], [], [], 0
for r in range(1, int(rounds) + 1):
    text = open(f"{work}/wrk-{case}-{r}.txt").read()
    rps.append(float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)))
    p50.append(ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1)))
    p99.append(ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1)))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    bad += int(m.group(1)) if m else 0
print("%-30s %12.0f %8.2fms %8.2fms %12s %10s %8d" % (label, statistics.median(rps), statistics.median(p50), statistics.median(p99), sent, dropped, bad))
PY
done
for s in healthy-10 healthy-100 hanging-100; do
  "$BIN/cutover" abort "${DEP[$s]}" >/dev/null
done

echo
echo "==> time from the first failing shadow interval to the rollback confirmed ($ROLLBACKS runs)"
ANALYSIS='[analysis]
interval = "1s"
failure_limit = 2
min_requests = 20
[[analysis.metric]]
name = "error_rate"
max = 0.05'
wrk -t1 -c4 -d"$(( ROLLBACKS * 30 ))s" "http://127.0.0.2:${PORT[off]}/" >/dev/null 2>&1 &
LOADPID=$!
pids+=($LOADPID)
printf '%-6s %22s %22s %s\n' "run" "first bad -> decided" "first bad -> done" "reason"
for i in $(seq 1 "$ROLLBACKS"); do
  plan off "4.0.$i" "error_rate=0.5" 'shadow = { duration = "1m", share = 100, methods = ["GET"] }' "$ANALYSIS"
  dep=$("$BIN/cutover" deploy "$WORK/off-4.0.$i.toml" --wait 2>/dev/null | head -1 || true)
  "$BIN/cutover" show "$dep" --output json | python3 -c '
import json, sys
d = json.load(sys.stdin)
started = next(e for e in d["timeline"] if e["event"] == "rollback_started")
done = next(e["at_unix_ms"] for e in d["timeline"] if e["event"] == "rollback_done")
first = started["first_bad_unix_ms"]
print("%-6s %21.3fs %21.3fs %s" % (sys.argv[1], (started["decided_unix_ms"] - first) / 1000, (done - first) / 1000, (d["reason"] or "")[:90]))
' "$i"
done
kill "$LOADPID" 2>/dev/null || true
echo
echo "logs: $WORK"
