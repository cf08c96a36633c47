#!/usr/bin/env bash
# One command for the whole benchmark: bash bench/run.sh [--duration 10] [--warmup 2] [--conns 20]
#   [--cases a,b,c,d,e,f,g,h] [--rounds N] [--quick]
# Needs (Debian): gcc libssl-dev nginx-light squid-openssl redis-server (installed here when missing and
# run as root; the harness starts its own redis-server on a free loopback port, not the packaged service),
# and the project's venv (`make install`) for mitmdump and secretless-proxy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
missing=()
for pkg in gcc libssl-dev nginx-light squid-openssl redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "bench: missing Debian packages: ${missing[*]} (install them, or run as root)" >&2
  fi
fi
PYTHON="${PYTHON:-$here/../.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
# Hard upper bound on the whole run; the harness kills everything it started on exit.
exec timeout --signal=TERM --kill-after=30 "${BENCH_TIMEOUT:-540}" "$PYTHON" "$here/run.py" "$@"
