#!/usr/bin/env bash
# Fails when a release binary no longer holds most of the functions build/hot-code.txt lays
# out first. The list names symbols with the compiler's hashes, which change with the
# toolchain, the lock file and the code, and the linker silently skips names it cannot find:
# without this check the layout (build.rs, benches/README.md section 3) stops working unseen.
# Run by benches/load.sh before every harness run; rerun benches/hot-code.sh when it fails.
#
#   benches/hot-code-check.sh [target/release/skua] [minimum percent, default 90]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${1:-$ROOT/target/release/skua}"
MIN="${2:-90}"
LIST="$ROOT/build/hot-code.txt"
listed=$(sort -u "$LIST" | wc -l)
found=$(comm -12 <(sort -u "$LIST") <(nm "$BIN" | awk '{print $NF}' | sort -u) | wc -l)
percent=$((100 * found / listed))
echo "hot-code layout: $found of $listed listed functions are in $BIN ($percent %)"
if [ "$percent" -lt "$MIN" ]; then
    echo "below $MIN %: the layout has gone stale; rerun benches/hot-code.sh" >&2
    exit 1
fi
