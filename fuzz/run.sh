#!/usr/bin/env bash
# Runs every fuzz target, built without optimisation (it builds in a third of the time, and
# debug assertions stay on), from its committed seed corpus (fuzz/corpus/<target>) for a bounded
# time: `fuzz/run.sh [seconds per target]` (default 60). New inputs go to a temporary
# directory, so the committed corpus stays as it is. Needs cargo-fuzz; on stable Rust its
# -Z flags need RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
[ -n "$targets" ] || { echo "no fuzz targets" >&2; exit 1; }
cargo fuzz build --dev -s none
for target in $targets; do
    [ -d "corpus/$target" ] && [ -n "$(ls -A "corpus/$target")" ] ||
        { echo "fuzz/corpus/$target: no seed inputs" >&2; exit 1; }
    mkdir -p "$work/$target"
    echo "-- $target: ${seconds}s"
    status=0
    cargo fuzz run --dev -s none "$target" "$work/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$work/$target.log" 2>&1 || status=$?
    grep -E '^stat::(number_of_executed_units|new_units_added)' "$work/$target.log" || true
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$work/$target.log" >&2
        echo "$target: failed (inputs that crash are in fuzz/artifacts/$target)" >&2
        exit 1
    fi
done
