#!/usr/bin/env bash
# Throughput benchmark (root): meshguard next to boringtun, boringtun --threads 1,
# wireguard-go and plain veth, with iperf3 in network namespaces.
# Options: see `scripts/bench.sh --help` (scripts/bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/bench.py "$@"
