#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for SECONDS each (default 15) with cargo-fuzz (nightly),
# starting from the committed seed corpora (copied, so runs do not grow them) and
# printing the executions per target. A crash fails the script and leaves its input in
# fuzz/artifacts/TARGET/. With FUZZ_RUNS=N in the environment each target runs N
# executions instead (SECONDS then bounds nothing).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_RUNS=10000000 scripts/fuzz.sh 0 [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
seconds="${1:-15}"
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build --release
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "$work/$target"
    cp -r "corpus/$target/." "$work/$target/" 2>/dev/null || true
    log="$work/$target.log"
    if [[ -n "${FUZZ_RUNS:-}" ]]; then
        bound=(-runs="$FUZZ_RUNS")
    else
        bound=(-max_total_time="$seconds")
    fi
    started=$SECONDS
    if ! cargo +nightly fuzz run --release "$target" "$work/$target" -- \
        "${bound[@]}" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz target $target failed" >&2
        exit 1
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')"
    echo "$target: $runs executions in $((SECONDS - started)) s, no crash"
done
