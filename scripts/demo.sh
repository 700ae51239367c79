#!/usr/bin/env bash
# Builds meshguard and runs `meshguard demo`: a two-node mesh in network namespaces on
# this machine, with traffic and a refused flow. Needs root; cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v ip >/dev/null || ! command -v ping >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 iputils-ping
fi
cargo build --quiet --features demo
exec ./target/debug/meshguard demo
