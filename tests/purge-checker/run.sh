#!/usr/bin/env bash
# Runs the randomised purge checker (check.py) against Skua in one setup, for a while: readers
# ask for pages in many shapes while an editor edits them at a versioned origin and purges
# each edit through Skua in one of every way it takes; any answer older than an acknowledged
# purge is printed as STALE. Exits 1 if there was one. Needs python3 (standard library only)
# and openssl (the HTTPS listener of node, rules and upgrades);
# the fleet setup needs nats-server. Loopback only. Not part of CI: each setup loads every
# core for as long as it runs.
#
#   tests/purge-checker/run.sh SETUP [seconds] [path/to/skua]   (default 60 s, target/release/skua)
#
# SETUP:
#   node        one node, memory over a disk tier, HTCP as well, HTTPS (openssl makes its
#               certificate) beside HTTP
#   restarts    the same, with a small memory tier and 3,000 pages (disk hits), killed (-9)
#               or stopped and started again every few seconds; `after_restart = "serve"`
#               (the disk's copies trusted as they are) unless AFTER_RESTART says otherwise
#   rules       one node as `node`, with the page-title and tracking-parameter rules of
#               config/mediawiki.toml and a host alias: pages are MediaWiki titles, asked for
#               and purged in every spelling those make one object, under three host names
#   upgrades    as `restarts`, replaced by zero-downtime upgrades instead (skua serve --upgrade,
#               then SIGQUIT to the old process), with HTCP and HTTPS as in `node`
#   two-tiers   a frontend in front of a backend with a disk tier, each purge sent to both
#               in a random order, as MediaWiki sends one to every cache it knows
#   fleet       a frontend over two backends by consistent hash, over a purge bus
#               (nats-server), each purge sent to one node; SLACK (default 0.05 s) is how
#               long after its acknowledgement a purge may still be on its way to the others
# PURGE_CHECKER_PORT: the first of the twelve loopback ports used (default 28400).
# KEEP=1: keep the temporary directory (configs, node logs) and print its path.
# ACCESS_LOG=1: each node writes a JSON access log there (access-NAME.log; with KEEP=1).
# DISK_SIZE: bytes of each disk tier (default 256 MiB; a small one evicts all the time).
# CHAOS_NODES=0 RELOADS=1 with `node` or `rules`: SIGHUP every few seconds.
# NATS_CHAOS=1 with `fleet`: nats-server stopped (-9 or TERM) for 1 to 3 s every 4 to 9 s; a
# purge acknowledged during an outage counts from REJOIN (default 3) s after it ends.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
setup=${1:?setup: node, rules, restarts, upgrades, two-tiers or fleet}
seconds=${2:-60}
skua=$(realpath "${3:-$here/../../target/release/skua}")
base=${PURGE_CHECKER_PORT:-28400}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

origin=$((base + 9))
python3 "$here/origin.py" "$origin" > "$work/origin.log" 2>&1 &
pids+=($!)

# node NAME PORT [lines...]: a config listening on PORT (admin PORT+1) in front of UPSTREAMS.
node() {
    local name=$1 port=$2
    shift 2
    cat > "$work/$name.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
admin = "127.0.0.1:$((port + 1))"
name = "skua-$name"
upgrade_sock = "$work/$name.sock"
trusted_proxies = ["127.0.0.1/32"]
[[origin]]
name = "up"
addresses = [$UPSTREAMS]
$ORIGIN_LINES
[purge]
allow = ["127.0.0.0/8"]
EOF
    for line in "$@"; do printf '%s\n' "$line" >> "$work/$name.toml"; done
    if [ -n "${ACCESS_LOG:-}" ]; then
        printf '[log]\naccess = "%s"\nformat = "json"\n' "$work/access-$name.log" >> "$work/$name.toml"
    fi
}
no_health='[origin.health_check]
enabled = false'
skua_health='[origin.health_check]
path = "/_skua/health"
interval = "1s"'
# tls: an HTTPS listener on PURGE_CHECKER_PORT + 7 with a self-signed certificate.
tls() {
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=wiki.test \
        -addext subjectAltName=DNS:wiki.test,DNS:www.wiki.test \
        -keyout "$work/key.pem" -out "$work/cert.pem" 2> /dev/null
    printf '[server.tls]\nlisten = ["127.0.0.1:%s"]\n[[server.tls.certificate]]\nchain = "%s"\nkey = "%s"' \
        $((base + 7)) "$work/cert.pem" "$work/key.pem"
}
disk() {
    mkdir -p "$work/disk-$1"
    printf '[cache.disk]\npath = "%s"\nsize = %s\n%s' "$work/disk-$1" "${DISK_SIZE:-268435456}" "${2:-}"
}

export LOG_DIR=$work
case $setup in
node)
    UPSTREAMS="\"127.0.0.1:$origin\"" ORIGIN_LINES=$no_health
    node a "$base" "[cache]" "memory_size = 67108864" "$(disk a)" "$(tls)" \
        "[purge.htcp]" "listen = \"127.0.0.1:$((base + 2))\"" "allow = [\"127.0.0.0/8\"]"
    export NODES=$base:$((base + 1)) CONFIGS=$work/a.toml HTCP=127.0.0.1:$((base + 2))
    export TLS=$((base + 7))
    ;;
rules)
    UPSTREAMS="\"127.0.0.1:$origin\"" ORIGIN_LINES=$no_health
    node a "$base" "[cache]" "memory_size = 67108864" \
        'host_aliases = { "www.wiki.test" = "wiki.test" }' "$(disk a)" "$(tls)" \
        "[purge.htcp]" "listen = \"127.0.0.1:$((base + 2))\"" "allow = [\"127.0.0.0/8\"]" \
        "[[rule]]" 'match = { host = ["wiki.test"], path_prefix = ["/wiki/"] }' \
        'normalize_path = "mediawiki"' \
        "[[rule]]" 'match = { host = ["wiki.test"] }' \
        'normalize_query = { drop = ["utm_*", "fbclid"], sort = true }'
    export NODES=$base:$((base + 1)) CONFIGS=$work/a.toml HTCP=127.0.0.1:$((base + 2))
    export STYLE=wiki HOSTS=wiki.test,www.wiki.test,WIKI.Test TLS=$((base + 7))
    ;;
restarts)
    UPSTREAMS="\"127.0.0.1:$origin\"" ORIGIN_LINES=$no_health
    node a "$base" "[cache]" "memory_size = 8388608" \
        "$(disk a "after_restart = \"${AFTER_RESTART:-serve}\"")"
    export NODES=$base:$((base + 1)) CONFIGS=$work/a.toml CHAOS_NODES=0 NPAGES=${NPAGES:-3000}
    ;;
upgrades)
    UPSTREAMS="\"127.0.0.1:$origin\"" ORIGIN_LINES=$no_health
    node a "$base" "[cache]" "memory_size = 8388608" "$(disk a)" "$(tls)" \
        "[purge.htcp]" "listen = \"127.0.0.1:$((base + 2))\"" "allow = [\"127.0.0.0/8\"]"
    export NODES=$base:$((base + 1)) CONFIGS=$work/a.toml HTCP=127.0.0.1:$((base + 2))
    export TLS=$((base + 7)) CHAOS_NODES=0 UPGRADES=1 NPAGES=${NPAGES:-3000}
    ;;
two-tiers)
    UPSTREAMS="\"127.0.0.1:$origin\"" ORIGIN_LINES=$no_health
    node be $((base + 3)) "[cache]" "memory_size = 8388608" "$(disk be)"
    UPSTREAMS="\"127.0.0.1:$((base + 3))\"" ORIGIN_LINES=$skua_health
    node fe "$base" "[cache]" "memory_size = 8388608"
    # Started in this order, the backend first; readers ask the frontend mostly.
    export CONFIGS=$work/be.toml,$work/fe.toml PURGE_ALL=1
    export NODES=$((base + 3)):$((base + 4)),$base:$((base + 1)) READ_NODES=1,1,1,0
    ;;
fleet)
    command -v nats-server > /dev/null || { echo "the fleet setup needs nats-server" >&2; exit 2; }
    nats=$((base + 8))
    if [ -n "${NATS_CHAOS:-}" ]; then
        # check.py starts it, and stops it now and then.
        export NATS_CMD="nats-server -js -a 127.0.0.1 -p $nats -sd $work/nats"
    else
        nats-server -js -a 127.0.0.1 -p "$nats" -sd "$work/nats" > "$work/nats.log" 2>&1 &
        pids+=($!)
    fi
    bus() { printf '[purge.bus]\nservers = ["nats://127.0.0.1:%s"]\nnode = "%s"' "$nats" "$1"; }
    UPSTREAMS="\"127.0.0.1:$origin\"" ORIGIN_LINES=$no_health
    node be1 $((base + 3)) "[cache]" "memory_size = 8388608" "$(disk be1)" "$(bus be1)"
    node be2 $((base + 5)) "[cache]" "memory_size = 8388608" "$(disk be2)" "$(bus be2)"
    UPSTREAMS="\"127.0.0.1:$((base + 3))\", \"127.0.0.1:$((base + 5))\""
    ORIGIN_LINES="balance = \"consistent\"
$skua_health"
    node fe "$base" "[cache]" "memory_size = 8388608" "$(bus fe)" "outbox_dir = \"$work/outbox-fe\""
    export NODES=$((base + 3)):$((base + 4)),$((base + 5)):$((base + 6)),$base:$((base + 1))
    export CONFIGS=$work/be1.toml,$work/be2.toml,$work/fe.toml READ_NODES=2,2,2,0,1
    export SLACK=${SLACK:-0.05} NPAGES=${NPAGES:-300}
    ;;
*)
    echo "unknown setup $setup: node, rules, restarts, upgrades, two-tiers or fleet" >&2
    exit 2
    ;;
esac
sleep 1
status=0
python3 "$here/check.py" "$origin" "$skua" "$seconds" || status=$?
if [ "$status" != 0 ]; then
    grep -h "WARN\|ERROR" "$work"/node-*.log | tail -20 || true
fi
exit "$status"
