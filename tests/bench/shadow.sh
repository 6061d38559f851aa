#!/usr/bin/env bash
# What shadow traffic costs the live path, on this machine: throughput and latency of
# the agent's proxy with shadow off, at 100 % to a healthy new slot, and at 100 % to a
# new slot that never answers, side by side in one run; the copies sent and dropped
# meanwhile; and the time from the first failing shadow interval to the rollback being
# confirmed by every host. Prints tables; not a test.
#   tests/bench/shadow.sh [seconds] [connections] [rollbacks]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SECS=${1:-10}
CONNS=${2:-32}
ROLLBACKS=${3:-5}

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
LISTEN=$(free_port)
AGENT_HTTP=127.0.0.1:$(free_port)
export CUTOVER_COORDINATOR=$COORD CUTOVER_CREDENTIALS=$WORK/coordinator/admin
"$BIN/cutover" serve --data-dir "$WORK/coordinator" --listen "$COORD" --http "127.0.0.1:$(free_port)" >"$WORK/coordinator.log" 2>&1 &
pids+=($!)
wait_for 20 "$BIN/cutover" hosts
"$BIN/cutover-agent" join --coordinator "$COORD" --token "$("$BIN/cutover" token create)" --data-dir "$WORK/agent" --name bench 2>/dev/null
RUST_LOG=warn "$BIN/cutover-agent" run --data-dir "$WORK/agent" --service-address 127.0.0.2 --http "$AGENT_HTTP" >"$WORK/agent.log" 2>&1 &
pids+=($!)
wait_for 20 sh -c "'$BIN/cutover' hosts --output json | grep -q '\"connected\": true'"

# plan VERSION BEHAVIOUR STRATEGY ANALYSIS: writes $WORK/VERSION.toml for the sample.
plan() {
  local sha; sha=$("$BIN/cutover-sample" pack --out "$WORK/$1.tar.gz" --version "$1" $2)
  cat >"$WORK/$1.toml" <<PLAN
service = "bench"
[release]
version = "$1"
artifact = "file://$WORK/$1.tar.gz"
sha256 = "$sha"
[run]
command = ["./bin/cutover-sample", "serve", "--port", "\${PORT}"]
listen = $LISTEN
drain = "1s"
stop_timeout = "5s"
[health]
http = "/healthz"
interval = "200ms"
[strategy]
$3
$4
PLAN
}

# shadowing VERSION BEHAVIOUR SHARE: deploys it with a shadow phase copying SHARE % of
# GETs until aborted (nothing judged), and waits until every host copies to it.
shadowing() {
  plan "$1" "$2" "shadow = { duration = \"1h\", share = $3, methods = [\"GET\"] }" ""
  DEP=$("$BIN/cutover" deploy "$WORK/$1.toml")
  wait_for 60 sh -c "'$BIN/cutover' show $DEP --output json | grep -q '\"event\": \"shadow_holding\"'"
}

# abort_current: rolls the deployment in its shadow phase back.
abort_current() {
  "$BIN/cutover" abort "$DEP" >/dev/null
  wait_for 60 sh -c "'$BIN/cutover' status $DEP --output json | grep -q '\"state\": \"aborted\"'"
}

# shadow_counter NAME: the green slot's shadow counter NAME from the agent's /metrics.
shadow_counter() {
  curl -fs "http://$AGENT_HTTP/metrics" | awk -v n="cutover_agent_shadow_$1_total" \
    '$1 ~ "^"n"\\{" && $1 ~ /slot="green"/ {print $2; found=1} END {if (!found) print 0}'
}

ROWS=()
run() { # name
  local out; out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "http://127.0.0.2:$LISTEN/" 2>&1)
  local rps p50 p99 errors
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  errors=$(echo "$out" | awk '/Non-2xx/ {n=$5} /Socket errors/ {s=$0} END {print (n ? n " non-2xx " : "") s}')
  local sent dropped
  sent=$(shadow_counter requests); dropped=$(shadow_counter dropped)
  ROWS+=("$(printf '%-30s %12s %10s %10s %12s %10s  %s' "$1" "$rps" "$p50" "$p99" "$sent" "$dropped" "$errors")")
}

echo "==> v1 live, shadow off"
plan 1.0.0 "" "" ""
"$BIN/cutover" deploy "$WORK/1.0.0.toml" --wait >/dev/null 2>&1
run "shadow off"

echo "==> v2 (healthy) in shadow, 10% of GETs copied"
shadowing 2.0.0 "" 10
run "shadow 10% -> healthy slot"
abort_current

echo "==> v2 (healthy) in shadow, 100% of GETs copied"
shadowing 2.0.1 "" 100
run "shadow 100% -> healthy slot"
abort_current

echo "==> v3 (never answers) in shadow, 100% of GETs copied"
shadowing 3.0.0 "hang=1" 100
run "shadow 100% -> hanging slot"
abort_current

echo
echo "live path: wrk, ${SECS}s, $CONNS keep-alive connections, 2 threads, $(nproc) cores shared by everything"
printf '%-30s %12s %10s %10s %12s %10s  %s\n' "" "requests/s" "p50" "p99" "copies sent" "dropped" "client errors"
for r in "${ROWS[@]}"; do echo "$r"; done

echo
echo "==> time from the first failing shadow interval to the rollback confirmed ($ROLLBACKS runs)"
ANALYSIS='[analysis]
interval = "1s"
failure_limit = 2
min_requests = 20
[[analysis.metric]]
name = "error_rate"
max = 0.05'
wrk -t1 -c4 -d"$(( ROLLBACKS * 30 ))s" "http://127.0.0.2:$LISTEN/" >/dev/null 2>&1 &
LOADPID=$!
pids+=($LOADPID)
printf '%-6s %22s %22s %s\n' "run" "first bad -> decided" "first bad -> done" "reason"
for i in $(seq 1 "$ROLLBACKS"); do
  plan "4.0.$i" "error_rate=0.5" 'shadow = { duration = "1m", share = 100, methods = ["GET"] }' "$ANALYSIS"
  DEP=$("$BIN/cutover" deploy "$WORK/4.0.$i.toml" --wait 2>/dev/null | head -1 || true)
  "$BIN/cutover" show "$DEP" --output json | python3 -c '
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
