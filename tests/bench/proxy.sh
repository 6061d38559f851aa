#!/usr/bin/env bash
# Throughput and latency of cutover's proxy against nginx and HAProxy as reverse proxies,
# all in front of the same backend, in one run on this machine. Prints a table; not a test.
#
#   tests/bench/proxy.sh [seconds] [connections...]      (default: 5 32 128)
#   ROUNDS=5 tests/bench/proxy.sh                         (medians of five rounds; default 3)
#   CUTOVER_BIN=DIR tests/bench/proxy.sh                  (cutover and cutover-agent from DIR)
#   RUNS_OUT=FILE tests/bench/proxy.sh                    (every run's figures, not just medians)
#   HOLD=1 tests/bench/proxy.sh                           (set up, print the addresses, wait)
#   PERF_OUT=DIR tests/bench/proxy.sh                     (perf record of the agent during
#                                                          its first row; folded stacks and,
#                                                          with inferno, a flamegraph)
#
# The backend is nginx answering `return 200` with one worker. cutover deploys it as a
# real release (a coordinator, one agent, a slot, per-slot counting, weights and drain all
# on); "direct", nginx (2 workers, keep-alive upstream) and HAProxy (2 threads,
# `http-reuse always`) are pointed at that same slot's port. wrk runs with one thread.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SECS=${1:-5}
shift || true
CONNS=("$@")
[ ${#CONNS[@]} -gt 0 ] || CONNS=(32 128)
ROUNDS=${ROUNDS:-3}

need() { command -v "$1" >/dev/null 2>&1 || { echo "==> installing $2"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }; }
need wrk wrk
need nginx nginx
need haproxy haproxy
[ -z "${PERF_OUT:-}" ] || need perf linux-perf

if [ -n "${CUTOVER_BIN:-}" ]; then
  BIN=$CUTOVER_BIN   # binaries built elsewhere, e.g. an earlier version to compare with
else
  echo "==> building release binaries"
  cargo build --release --bin cutover --bin cutover-agent --quiet
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
WORK=$(mktemp -d /tmp/cutover-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("0.0.0.0",0)); print(s.getsockname()[1])'; }
wait_for() { local d=$(( $(date +%s) + $1 )); shift; until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -lt "$d" ] || { echo "timed out: $*" >&2; exit 1; }; sleep 0.2; done; }

# 1. The backend as a release: nginx, one worker, `return 200`, on the slot's ${PORT}. It
#    writes its configuration into the service's state directory, and its port there too,
#    so that the other proxies can be pointed at the very same slot.
mkdir -p "$WORK/release/bin"
cat >"$WORK/release/bin/backend" <<'SH'
#!/bin/sh
set -e
port=$1
dir=$CUTOVER_STATE_DIR
mkdir -p "$dir/tmp"
cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/tmp;
  keepalive_requests 10000000;
  server {
    listen 127.0.0.1:$port;
    location / { default_type text/plain; return 200 "ok\n"; }
  }
}
CONF
echo "$port" >"$dir/port"
exec nginx -c "$dir/nginx.conf" -g 'daemon off;'
SH
chmod 755 "$WORK/release/bin/backend"
tar -C "$WORK/release" -czf "$WORK/backend.tar.gz" .
sha=$(sha256sum "$WORK/backend.tar.gz" | cut -d' ' -f1)

COORD=127.0.0.1:$(free_port)
LISTEN=$(free_port)
export CUTOVER_COORDINATOR=$COORD CUTOVER_CREDENTIALS=$WORK/coordinator/admin
"$BIN/cutover" serve --data-dir "$WORK/coordinator" --listen "$COORD" --http "127.0.0.1:$(free_port)" >"$WORK/coordinator.log" 2>&1 &
pids+=($!)
wait_for 20 "$BIN/cutover" hosts
"$BIN/cutover-agent" join --coordinator "$COORD" --token "$("$BIN/cutover" token create)" --data-dir "$WORK/agent" --name bench 2>/dev/null
AGENT_HTTP=127.0.0.1:$(free_port)
RUST_LOG=warn "$BIN/cutover-agent" run --data-dir "$WORK/agent" --service-address 127.0.0.2 --http "$AGENT_HTTP" >"$WORK/agent.log" 2>&1 &
AGENT=$!
pids+=($AGENT)
cat >"$WORK/plan.toml" <<PLAN
service = "bench"
[release]
version = "1.0.0"
artifact = "file://$WORK/backend.tar.gz"
sha256 = "$sha"
[run]
command = ["./bin/backend", "\${PORT}"]
listen = $LISTEN
[health]
http = "/healthz"
interval = "200ms"
PLAN
wait_for 20 sh -c "'$BIN/cutover' hosts --output json | grep -q '\"connected\": true'"
"$BIN/cutover" deploy "$WORK/plan.toml" --wait >"$WORK/deploy.log" 2>&1 || { cat "$WORK/deploy.log"; exit 1; }
SLOT=$(cat "$WORK/agent/state/bench/port")
wait_for 10 curl -fs "http://127.0.0.1:$SLOT/"

# 2. nginx as a reverse proxy: one worker per core, keep-alive upstream.
NGINX=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<CONF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  keepalive_requests 10000000;
  upstream slot { server 127.0.0.1:$SLOT; keepalive 256; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$NGINX;
    location / { proxy_pass http://slot; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
nginx -c "$WORK/nginx/nginx.conf" -g 'daemon off;' &
NGINX_PID=$!
pids+=($NGINX_PID)
wait_for 10 curl -fs "http://127.0.0.1:$NGINX/"

# 3. HAProxy: two threads, idle server connections shared by every client.
HAPROXY=$(free_port)
cat >"$WORK/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 8000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 2s
  timeout client 60s
  timeout server 60s
frontend public
  bind 127.0.0.1:$HAPROXY
  default_backend slot
backend slot
  server s1 127.0.0.1:$SLOT
CONF
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
HAPROXY_PID=$!
pids+=($HAPROXY_PID)
wait_for 10 curl -fs "http://127.0.0.1:$HAPROXY/"
wait_for 10 curl -fs "http://127.0.0.2:$LISTEN/"

if [ -n "${HOLD:-}" ]; then
  echo "backend 127.0.0.1:$SLOT  nginx 127.0.0.1:$NGINX  haproxy 127.0.0.1:$HAPROXY  cutover 127.0.0.2:$LISTEN  agent pid $AGENT"
  touch "$WORK/hold"
  echo "holding: rm $WORK/hold to stop"
  while [ -e "$WORK/hold" ]; do sleep 1; done
  exit 0
fi

# CPU time (clock ticks) used so far by these processes and their children's threads.
ticks() {
  local t=0 p f
  for p in "$@" $(for p in "$@"; do pgrep -P "$p"; done); do
    for f in /proc/"$p"/task/*/stat; do
      [ -r "$f" ] && t=$((t + $(sed 's/.*) //' "$f" | awk '{print $12 + $13}')))
    done
  done
  echo "$t"
}

# Prints "requests/s p50 p99 cpu-us-per-request" of one wrk run against a path whose
# processes are given; latencies in ms. A trailing "!" marks errors wrk saw.
measure() { # conns url pids...
  local c=$1 url=$2; shift 2
  local t0 t1
  t0=$(ticks "$@")
  wrk -t1 -c"$c" -d"${SECS}s" --latency "$url" >"$WORK/wrk.out" 2>&1
  t1=$(ticks "$@")
  awk -v cpu=$(( t1 - t0 )) -v hz="$(getconf CLK_TCK)" -v secs="$SECS" '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /Requests\/sec/ { rps=$2 } $1=="50%" { p50=ms($2) } $1=="99%" { p99=ms($2) }
    /Non-2xx|Socket errors/ { bad=1 }
    END { printf "%.0f %.2f %.2f %.1f%s\n", rps, p50, p99, (rps > 0 ? cpu / hz * 1e6 / (rps * secs) : 0), (bad ? " !" : "") }' "$WORK/wrk.out"
}

perf_agent() { # seconds
  [ -n "${PERF_OUT:-}" ] || return 0
  mkdir -p "$PERF_OUT"
  perf record -F 499 -g -p "$AGENT" -o "$PERF_OUT/perf.data" -- sleep "$1" >/dev/null 2>&1 &
  PERF=$!
}

BACKEND_PID=$(pgrep -f "nginx -c $WORK/agent/state/bench/nginx.conf" | head -1)
NAMES=("direct to the backend" "nginx, 2 workers, keep-alive upstream" "HAProxy, 2 threads, http-reuse always" "cutover agent proxy")
URLS=("http://127.0.0.1:$SLOT/" "http://127.0.0.1:$NGINX/" "http://127.0.0.1:$HAPROXY/" "http://127.0.0.2:$LISTEN/")
PIDS=("$BACKEND_PID" "$NGINX_PID" "$HAPROXY_PID" "$AGENT")

echo
echo "wrk -t1, ${SECS}s per run, keep-alive connections; backend nginx 'return 200' (1 worker);"
echo "$(nproc) cores shared by wrk, the backend and the proxy under test. $ROUNDS round(s), the"
echo "paths taking turns within each; figures are medians over the rounds. cpu: the proxy's"
echo "(or, direct, the backend's) CPU time per request."
# Every run's figures, one line each: conns path-index rps p50 p99 cpu [!]
: >"$WORK/runs"
profiled=
for round in $(seq "$ROUNDS"); do
  for c in "${CONNS[@]}"; do
    for i in 0 1 2 3; do
      if [ "$i" -eq 3 ] && [ -z "$profiled" ]; then perf_agent "$SECS"; profiled=1; fi
      echo "$c $i $(measure "$c" "${URLS[$i]}" "${PIDS[$i]}")" >>"$WORK/runs"
    done
  done
done
printf '%-40s %5s %11s %7s %7s %9s %9s %8s\n' "path" "conns" "requests/s" "p50 ms" "p99 ms" "vs nginx" "p99 vs" "cpu us"
for c in "${CONNS[@]}"; do
  for i in 0 1 2 3; do
    awk -v c="$c" -v i="$i" -v n="${NAMES[$i]}" '
      function median(a, k,   j, t, x, y) {
        for (x = 1; x <= k; x++) for (y = x + 1; y <= k; y++) if (a[y] < a[x]) { t = a[x]; a[x] = a[y]; a[y] = t }
        return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
      }
      $1 == c && $2 == i { k++; r[k] = $3; p50[k] = $4; p99[k] = $5; cpu[k] = $6; if ($7 == "!") bad = 1 }
      $1 == c && $2 == 1 { m++; nr[m] = $3; np[m] = $5 }
      END {
        R = median(r, k); P99 = median(p99, k); NR = median(nr, m); NP = median(np, m)
        printf "%-40s %5s %11.0f %7.2f %7.2f %8.2fx %8.2fx %8.1f%s\n", n, c, R, median(p50, k), P99, R / NR, P99 / NP, median(cpu, k), (bad ? " !" : "")
      }' "$WORK/runs"
  done
done
[ -z "${RUNS_OUT:-}" ] || cp "$WORK/runs" "$RUNS_OUT"
echo "(! = wrk saw non-2xx answers or socket errors)"
echo
echo "RSS after the run: agent $(ps -o rss= -p "$AGENT") KiB"
echo "requests the agent counted on the slot: $(curl -fs "http://$AGENT_HTTP/metrics" | awk '/^cutover_agent_requests_total/ {s+=$2} END {print s}')"

if [ -n "${PERF_OUT:-}" ]; then
  wait "$PERF" || true
  perf script -i "$PERF_OUT/perf.data" 2>/dev/null >"$PERF_OUT/perf.script"
  if command -v inferno-collapse-perf >/dev/null; then
    inferno-collapse-perf <"$PERF_OUT/perf.script" >"$PERF_OUT/folded.txt"
    inferno-flamegraph <"$PERF_OUT/folded.txt" >"$PERF_OUT/flamegraph.svg"
    echo "profile of the agent: $PERF_OUT/flamegraph.svg (folded stacks in folded.txt)"
  else
    echo "profile of the agent: $PERF_OUT/perf.data (cargo install inferno for a flamegraph)"
  fi
fi
