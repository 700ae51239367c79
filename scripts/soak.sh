#!/usr/bin/env bash
# The soak of issue 13 run by hand: mixed traffic through an impaired relay with policy
# reloads and peer restarts for SECONDS (default 1800), A's resident memory sampled
# every minute, printed at the end. As root.
#   scripts/soak.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
MESHGUARD_SOAK_SECS="${1:-1800}" MESHGUARD_REQUIRE_ROOT=1 \
    cargo test --test netns_links a_soak_of_mixed_traffic -- --nocapture
