#!/usr/bin/env bash
# Starts Skua the way ../shared/bench/run.sh starts a proxy: config/bench.toml listening on
# $PORT (admin on $PORT + 9), and, in runs with a TLS scenario, HTTPS and HTTP/2 on $TLS_PORT
# with the harness's certificate ($TLS_CERT_FILE, $TLS_KEY_FILE).
#
#   ../shared/bench/run.sh --targets limit,nginx,skua --scenarios tls1k,tlsnew,h2hit1k \
#       --proxy "skua:28050:$PWD/benches/harness-serve.sh $PWD/target/release/skua"
set -euo pipefail
BIN="${1:?usage: harness-serve.sh SKUA_BINARY}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${PORT:-28050}"
CONFIG="$(mktemp --suffix=.toml)"
sed -e "s/127.0.0.1:28050/127.0.0.1:$PORT/" -e "s/127.0.0.1:28059/127.0.0.1:$((PORT + 9))/" \
    "$ROOT/config/bench.toml" >"$CONFIG"
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
exec "$BIN" serve --config "$CONFIG"
