#!/usr/bin/env bash
# Throughput and latency of cutover's proxy against a direct connection to the slot and
# against nginx as a reverse proxy, on this machine. Prints a table; not a test.
#   tests/bench/proxy.sh [seconds] [connections]
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SECS=${1:-10}
CONNS=${2:-32}

need() { command -v "$1" >/dev/null 2>&1 || { echo "==> installing $2"; apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx

echo "==> building release binaries"
cargo build --release --workspace --bins --quiet
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
WORK=$(mktemp -d /tmp/cutover-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { local d=$(( $(date +%s) + $1 )); shift; until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$d" ] || { echo "timed out: $*" >&2; exit 1; }; sleep 0.2; done; }

# 1. The backend alone.
BACKEND=$(free_port)
(cd "$WORK" && printf 'version=bench\n' > behaviour.env && exec "$BIN/cutover-sample" serve --port "$BACKEND") >"$WORK/backend.log" 2>&1 &
pids+=($!)
wait_for 10 curl -fs "http://127.0.0.1:$BACKEND/healthz"

# 2. nginx in front of the same backend, keep-alive upstream like cutover's pool.
NGINX=$(free_port)
cat >"$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  upstream slot { server 127.0.0.1:$BACKEND; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX;
    location / { proxy_pass http://slot; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_for 10 curl -fs "http://127.0.0.1:$NGINX/healthz"

# 3. cutover: coordinator, one agent, the sample deployed; the agent's proxy on 127.0.0.2.
COORD=127.0.0.1:$(free_port)
LISTEN=$(free_port)
export CUTOVER_COORDINATOR=$COORD CUTOVER_CREDENTIALS=$WORK/coordinator/admin
"$BIN/cutover" serve --data-dir "$WORK/coordinator" --listen "$COORD" --http "127.0.0.1:$(free_port)" >"$WORK/coordinator.log" 2>&1 &
pids+=($!)
wait_for 20 "$BIN/cutover" hosts
"$BIN/cutover-agent" join --coordinator "$COORD" --token "$("$BIN/cutover" token create)" --data-dir "$WORK/agent" --name bench 2>/dev/null
RUST_LOG=warn "$BIN/cutover-agent" run --data-dir "$WORK/agent" --service-address 127.0.0.2 >"$WORK/agent.log" 2>&1 &
pids+=($!)
sha=$("$BIN/cutover-sample" pack --out "$WORK/bench.tar.gz" --version 1.0.0)
cat >"$WORK/plan.toml" <<PLAN
service = "bench"
[release]
version = "1.0.0"
artifact = "file://$WORK/bench.tar.gz"
sha256 = "$sha"
[run]
command = ["./bin/cutover-sample", "serve", "--port", "\${PORT}"]
listen = $LISTEN
[health]
http = "/healthz"
interval = "200ms"
PLAN
wait_for 20 sh -c "'$BIN/cutover' hosts --output json | grep -q '\"connected\": true'"
"$BIN/cutover" deploy "$WORK/plan.toml" --wait >/dev/null 2>&1

run() { # name url
  local out; out=$(wrk -t2 -c"$CONNS" -d"${SECS}s" --latency "$2" 2>&1)
  local rps p50 p99
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  printf '%-28s %12s %10s %10s\n' "$1" "$rps" "$p50" "$p99"
}
echo
echo "wrk, ${SECS}s, $CONNS keep-alive connections, 2 threads, $(nproc) cores shared by everything"
printf '%-28s %12s %10s %10s\n' "path" "requests/s" "p50" "p99"
run "direct to the slot" "http://127.0.0.1:$BACKEND/"
run "nginx reverse proxy" "http://127.0.0.1:$NGINX/"
run "cutover agent proxy" "http://127.0.0.2:$LISTEN/"
echo
echo "RSS after the run: agent $(ps -o rss= -p "$(pgrep -f "cutover-agent run --data-dir $WORK/agent")") KiB, coordinator $(ps -o rss= -p "$(pgrep -f "cutover serve --data-dir $WORK/coordinator")") KiB"
