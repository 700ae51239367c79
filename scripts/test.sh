#!/usr/bin/env bash
# The whole test suite: formatting, lints, then unit, core, interop and namespace tests.
# Namespace tests need root; as another user they skip with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# Fail, rather than skip, a namespace test that cannot run when we are root.
if [ "$(id -u)" = 0 ]; then export MESHGUARD_REQUIRE_ROOT=1; fi

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
