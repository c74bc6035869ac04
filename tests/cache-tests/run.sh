#!/usr/bin/env bash
# Runs the HTTP cache-tests suite (https://github.com/http-tests/cache-tests, RFC 9111's test
# suite) against Skua in four setups: the memory tier alone, memory over a disk tier, two
# tiers (a frontend with a disk tier in front of a backend), and the memory tier over HTTP/2
# (TLS, a throwaway certificate). Prints how many tests of each kind passed beside the results
# the suite publishes for other caches, and which required and optimal tests did not pass.
# Needs git, Node.js, npm and openssl; loopback only.
#
#   tests/cache-tests/run.sh [path/to/skua]      (default: target/release/skua)
#
# CACHE_TESTS_DIR: a checkout of the suite to use instead of a fresh clone.
# CACHE_TESTS_PORT: the first of the twelve loopback ports used (default 28100).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
skua=$(realpath "${1:-$here/../../target/release/skua}")
base=${CACHE_TESTS_PORT:-28100}
# The suite's commit these figures were taken with (docs/conformance.md).
commit=b55b8bda3dbb8c927c04e85bd8d496a8caa3e4ba
work=$(mktemp -d)
suite=${CACHE_TESTS_DIR:-$work/cache-tests}
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

if [[ ! -d $suite ]]; then
  git clone -q https://github.com/http-tests/cache-tests "$suite"
  git -C "$suite" checkout -q "$commit"
fi
(cd "$suite" && npm install --silent --no-audit --no-fund >/dev/null)

origin=$base
(cd "$suite" && npm_config_protocol=http npm_config_port=$origin \
  npm_config_pidfile="$work/server.pid" exec node test-engine/server/server.mjs \
  >"$work/server.log" 2>&1) &
pids+=($!)

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

# name, listen port, origin port, disk directory ("" for none), TLS port ("" for none)
start() {
  local name=$1 port=$2 upstream=$3 disk=$4 tls=${5:-}
  {
    printf '[server]\nlisten = ["127.0.0.1:%s"]\nadmin = "127.0.0.1:%s"\n' "$port" $((port + 1))
    if [[ -n $tls ]]; then
      printf '[server.tls]\nlisten = ["127.0.0.1:%s"]\n' "$tls"
      printf '[[server.tls.certificate]]\nchain = "%s"\nkey = "%s"\n' "$work/cert.pem" "$work/key.pem"
    fi
    printf '[cache]\nmemory_size = 268435456\n'
    if [[ -n $disk ]]; then printf '[cache.disk]\npath = "%s"\nsize = 268435456\n' "$disk"; fi
    printf '[[origin]]\nname = "o"\naddresses = ["127.0.0.1:%s"]\n' "$upstream"
    printf '[origin.health_check]\nenabled = false\n'
  } >"$work/$name.toml"
  "$skua" check --config "$work/$name.toml" >/dev/null
  "$skua" serve --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  pids+=($!)
}
start memory $((base + 1)) "$origin" ""
start disk $((base + 3)) "$origin" "$work/disk"
start backend $((base + 5)) "$origin" "$work/disk-backend"
start frontend $((base + 7)) $((base + 5)) "$work/disk-frontend"
start http2 $((base + 9)) "$origin" "" $((base + 11))
for port in "$origin" $((base + 1)) $((base + 3)) $((base + 5)) $((base + 7)) $((base + 11)); do
  for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
done

# The suite's client is Node's fetch; over TLS it is made to offer h2 (undici's allowH2) and
# take the throwaway certificate. Its tests of 1xx answers use an HTTP/1.1 client of their own.
cat >"$work/http2.mjs" <<JS
import undici from '$suite/node_modules/undici/index.js'
undici.setGlobalDispatcher(new undici.Agent({ allowH2: true, connect: { rejectUnauthorized: false } }))
JS
runs=()
for setup in memory:http://127.0.0.1:$((base + 1)) disk:http://127.0.0.1:$((base + 3)) \
  two-tiers:http://127.0.0.1:$((base + 7)) http2:https://127.0.0.1:$((base + 11)); do
  name=${setup%%:*}
  options=()
  if [[ $name == http2 ]]; then options=(NODE_OPTIONS="--import $work/http2.mjs" NODE_TLS_REJECT_UNAUTHORIZED=0); fi
  (cd "$suite" && env "${options[@]}" npm run --silent cli --base="${setup#*:}") >"$work/$name.json"
  runs+=("Skua ($name)=$work/$name.json")
done
node "$here/report.mjs" "$suite" "${runs[@]}"
