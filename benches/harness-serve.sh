#!/usr/bin/env bash
# Starts Skua the way ../shared/bench/run.sh starts a proxy: config/bench.toml listening on
# $PORT (admin on $PORT + 9), and, in runs with a TLS scenario, HTTPS and HTTP/2 on $TLS_PORT
# with the harness's certificate ($TLS_CERT_FILE, $TLS_KEY_FILE). With a second argument, the
# [[rule]]s of that config too (their pools all at the harness's origin).
#
#   ../shared/bench/run.sh --targets limit,nginx,skua --scenarios tls1k,tlsnew,h2hit1k \
#       --proxy "skua:28050:$PWD/benches/harness-serve.sh $PWD/target/release/skua"
#   ../shared/bench/run.sh --targets skua,rules --scenarios hit1k,manykeys \
#       --proxy "skua:28050:$PWD/benches/harness-serve.sh $PWD/target/release/skua" \
#       --proxy "rules:28060:$PWD/benches/harness-serve.sh $PWD/target/release/skua $PWD/config/mediawiki.toml"
#
# With --disk first, config/bench-disk.toml instead: a disk tier in the run's $WORKDIR and a
# memory tier too small for the benchmark's objects, so every hit is a disk hit.
#
#   ../shared/bench/run.sh --targets nginx,skua-disk --scenarios hit1k,manykeys,hit256k \
#       --proxy "skua-disk:28051:$PWD/benches/harness-serve.sh --disk $PWD/target/release/skua"
set -euo pipefail
BASE=bench.toml
if [ "${1:-}" = "--disk" ]; then
    BASE=bench-disk.toml
    shift
fi
BIN="${1:?usage: harness-serve.sh [--disk] SKUA_BINARY [RULES_CONFIG]}"
RULES="${2:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${PORT:-28050}"
CONFIG="$(mktemp --suffix=.toml)"
DISK="${WORKDIR:-$(mktemp -d)}/skua-disk"
sed -e "s/127.0.0.1:2805[01]\"/127.0.0.1:$PORT\"/" -e "s/127.0.0.1:2805[89]\"/127.0.0.1:$((PORT + 9))\"/" \
    -e "s|^path = \"/tmp/skua-bench-disk\"|path = \"$DISK\"|" \
    "$ROOT/config/$BASE" >"$CONFIG"
if [ -n "${TLS_PORT:-}" ]; then
    # A subtable of [server]: TOML lets it follow the other tables.
    cat >>"$CONFIG" <<TOML

[server.tls]
listen = ["127.0.0.1:$TLS_PORT"]

[[server.tls.certificate]]
chain = "$TLS_CERT_FILE"
key = "$TLS_KEY_FILE"
TOML
fi
if [ -n "$RULES" ]; then
    PYTHONPATH="$ROOT/benches" python3 -c 'import sys, benchlib; print(benchlib.rules_from(sys.argv[1], sys.argv[2]))' \
        "$RULES" "${ORIGIN_HOST:-127.0.0.1}:${ORIGIN_PORT:-28080}" >>"$CONFIG"
fi
exec "$BIN" serve --config "$CONFIG"
