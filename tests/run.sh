#!/usr/bin/env bash
# The README's test command. It installs what the tests run when it is missing (from
# Debian's packages: iproute2 and curl for the network-namespace partition tests,
# prometheus for promtool and a real Prometheus server, chromium for the dashboard,
# postgresql for the database tests), then builds the binaries and runs every test.
# Every test runs even when an earlier one fails (--no-fail-fast).
set -euo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
  command -v initdb >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
{ command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; } || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
have_postgres || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing test tools: ${need[*]}" >&2
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo)
    else
      echo "error: the tests need these Debian packages: ${need[*]} (run as root, or install them first)" >&2
      exit 1
    fi
  fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

cargo build --workspace --bins --locked
cargo test --workspace --locked --no-fail-fast "$@"
