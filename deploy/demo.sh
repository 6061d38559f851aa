#!/usr/bin/env bash
# cutover's local demo: a coordinator, three agents on 127.0.0.2-4, the bundled sample
# service, and a real progressive deployment of v1 then v2 under client load.
# Usage: deploy/demo.sh            (builds the workspace first; needs only cargo and curl)
#        KEEP=1 deploy/demo.sh     (leave everything running afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
started=$(date +%s.%N)

echo "==> building cutover (cargo build --workspace --bins)"
cargo build --workspace --bins --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug
CUTOVER=$BIN/cutover
AGENT=$BIN/cutover-agent
SAMPLE=$BIN/cutover-sample

WORK=$(mktemp -d /tmp/cutover-demo.XXXXXX)
COORD=127.0.0.1:17400
HTTP=127.0.0.1:17480
LISTEN=18080
export CUTOVER_COORDINATOR=$COORD CUTOVER_CREDENTIALS=$WORK/coordinator/admin
pids=()
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then
    echo "left running (pids ${pids[*]}); data in $WORK"
    return
  fi
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$(( $(date +%s) + $1 )); local what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "timed out waiting for $what" >&2; exit 1; fi
    sleep 0.2
  done
}

echo "==> starting the coordinator on $COORD (logs: $WORK/coordinator.log)"
"$CUTOVER" serve --data-dir "$WORK/coordinator" --listen "$COORD" --http "$HTTP" >"$WORK/coordinator.log" 2>&1 &
pids+=($!)
wait_for 20 "the coordinator" "$CUTOVER" hosts

for i in 2 3 4; do
  token=$("$CUTOVER" token create --labels env=demo,role=web)
  CUTOVER_JOIN_TOKEN="$token" "$AGENT" join --coordinator "$COORD" --data-dir "$WORK/agent-$i" --name "web-$i" 2>/dev/null
  "$AGENT" run --data-dir "$WORK/agent-$i" --service-address "127.0.0.$i" >"$WORK/agent-$i.log" 2>&1 &
  pids+=($!)
done
connected() { [ "$("$CUTOVER" hosts --output json | grep -c '"connected": true')" = 3 ]; }
wait_for 20 "three connected agents" connected
echo "==> three hosts enrolled over mutual TLS:"
"$CUTOVER" hosts

sha1=$("$SAMPLE" pack --out "$WORK/web-1.0.0.tar.gz" --version 1.0.0)
sha2=$("$SAMPLE" pack --out "$WORK/web-2.0.0.tar.gz" --version 2.0.0)
cat >"$WORK/plan.toml" <<PLAN
service = "web"

[release]
version = "1.0.0"
artifact = "file://$WORK/web-1.0.0.tar.gz"
sha256 = "$sha1"

[targets]
labels = { env = "demo" }

[run]
command = ["./bin/cutover-sample", "serve", "--port", "\${PORT}"]
listen = $LISTEN
drain = "2s"
stop_timeout = "5s"

[health]
http = "/healthz"
interval = "200ms"
healthy_after = 2
start_timeout = "20s"

[strategy]
max_parallel = "100%"
steps = [
  { traffic = 10, hold = "2s" },
  { traffic = 100 },
]
PLAN
"$CUTOVER" plan validate "$WORK/plan.toml"

echo "==> deploying web 1.0.0 (first deployment)"
"$CUTOVER" deploy "$WORK/plan.toml" --wait
for i in 2 3 4; do echo "    web-$i: $(curl -s "http://127.0.0.$i:$LISTEN/")"; done

echo "==> deploying web 2.0.0 while clients hammer every host"
load() { # counts requests and failures on one host until the stop file appears
  local ok=0 bad=0
  while [ ! -e "$WORK/stop" ]; do
    if curl -fs -o /dev/null --max-time 2 "http://127.0.0.$1:$LISTEN/"; then ok=$((ok+1)); else bad=$((bad+1)); fi
  done
  echo "$ok $bad" >"$WORK/load-$1"
}
for i in 2 3 4; do load "$i" & done
t0=$(date +%s.%N)
"$CUTOVER" deploy "$WORK/plan.toml" --release 2.0.0 --artifact "file://$WORK/web-2.0.0.tar.gz" --sha256 "$sha2" --wait
t1=$(date +%s.%N)
touch "$WORK/stop"; wait_for 10 "load clients" test -e "$WORK/load-4" -a -e "$WORK/load-3" -a -e "$WORK/load-2"
ok=0; bad=0
for i in 2 3 4; do read -r o b <"$WORK/load-$i"; ok=$((ok+o)); bad=$((bad+b)); done
for i in 2 3 4; do echo "    web-$i: $(curl -s "http://127.0.0.$i:$LISTEN/")"; done
"$CUTOVER" hosts

echo
echo "==> what happened"
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "    deploy 2.0.0 took %.1fs (including a 2s hold at 10%%)\n", b - a }'
echo "    client requests during the deployment: $ok served, $bad failed"
awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "    demo wall time: %.1fs\n", b - a }'
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$1/status"; }
echo "    resident memory: coordinator $(rss "${pids[0]}"), agent web-2 $(rss "${pids[1]}")"
echo "    where to look: $WORK (coordinator.log, agent-*.log, agent-*/logs/ for slot output)"
echo "    run it with KEEP=1 to leave the fleet up, then try:"
echo "      CUTOVER_COORDINATOR=$COORD CUTOVER_CREDENTIALS=$WORK/coordinator/admin $CUTOVER show"
echo "      (also: status, history, stats, hosts) and the dashboard at http://$HTTP/"
[ "$bad" = 0 ]
