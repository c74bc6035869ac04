#!/usr/bin/env bash
# Whole-proxy load benchmark: builds Skua in release mode and runs the shared harness
# (../shared/bench) with Skua beside nginx, Varnish and Traffic Server in one run, each
# pinned to one core; skua-disk is Skua with every hit from its disk tier
# (config/bench-disk.toml). Needs (Debian, as root): nginx-light libnginx-mod-http-echo varnish
# squid trafficserver wrk. Results land in benches/results/<UTC time>/report.md.
#
#   benches/load.sh                 # every scenario, 3 interleaved reps (~8 min)
#   benches/load.sh --quick         # smoke run
#   benches/load.sh --scenarios hit1k,manykeys
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS="${SKUA_BENCH_HARNESS:-$ROOT/../shared/bench}"
cd "$ROOT"
cargo build --release
BIN="$ROOT/benches/results/skua-under-test"
mkdir -p "$ROOT/benches/results"
# The harness runs the proxy while we may rebuild: benchmark a copy.
cp target/release/skua "$BIN"
# The figures are only those of the layout build.rs promises while its list still matches.
"$ROOT/benches/hot-code-check.sh" "$BIN"
OUT="$ROOT/benches/results/$(date -u +%Y%m%dT%H%M%SZ)"
exec "$HARNESS/run.sh" --targets limit,nginx,varnish,ats,skua,skua-disk --out "$OUT" \
    --proxy "skua:28050:$BIN serve --config $ROOT/config/bench.toml" \
    --proxy "skua-disk:28051:$ROOT/benches/harness-serve.sh --disk $BIN" "$@"
