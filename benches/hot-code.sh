#!/usr/bin/env bash
# Records which functions a running Skua executes and writes them to build/hot-code.txt, the
# layout build.rs hands the linker (see build.rs and benches/README.md section 3), and
# build/hot-code.recorded (the toolchain, lock file and dependency features the names' hashes
# follow from). Rerun it
# when the request path changes much, or when tests/hot_code.rs says the list is stale.
#
# Runs the release binary under valgrind's callgrind in front of the shared harness's origin
# (../shared/bench/origin: nginx with the echo module) with config/bench.toml, and sends it
# what the benchmark and an operator send: hits of every size, HEAD, Range and conditional
# requests, a page fill, misses on the slow path, a purge, the metrics and the dashboard.
# Needs (Debian, as root): valgrind nginx-light libnginx-mod-http-echo wrk.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HARNESS="${SKUA_BENCH_HARNESS:-$ROOT/../shared/bench}"
WORK="$(mktemp -d)"
ORIGIN_PGID="" SKUA=""
cleanup() {
    if [ -n "$SKUA" ]; then kill "$SKUA" 2>/dev/null || true; fi
    if [ -n "$ORIGIN_PGID" ]; then kill -- "-$ORIGIN_PGID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$ROOT"
# Profiled as the compiler laid it out, so that the list keeps the compiler's order rather
# than the order of the list before it. The last step links the new layout.
SKUA_HOT_CODE_LAYOUT=off cargo build --release
cp target/release/skua "$WORK/skua"

python3 - "$WORK/objects" <<'PY'
import os, sys
root = sys.argv[1]
for d in ("obj", "pages"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
for name, size in {"1k.bin": 1024, "4k.bin": 4096, "16k.bin": 16384, "256k.bin": 262144}.items():
    open(os.path.join(root, "obj", name), "wb").write(os.urandom(size))
for i in range(10000):
    open(os.path.join(root, "pages", "p%05d.html" % i), "wb").write(os.urandom(4096))
PY

PORT=28080 WORKDIR="$WORK/origin" DOCROOT="$WORK/objects" PEER_DIR="$HARNESS/origin" \
    ORIGIN_PORT=0 setsid bash "$HARNESS/origin/start.sh" >"$WORK/origin.log" 2>&1 </dev/null &
ORIGIN_PGID=$!
valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
    --dump-instr=yes --dump-line=no --compress-pos=no --compress-strings=no \
    "$WORK/skua" serve --config config/bench.toml >"$WORK/skua.log" 2>&1 </dev/null &
SKUA=$!
for _ in $(seq 1 100); do
    curl -sf -o /dev/null http://127.0.0.1:28059/metrics && break
    sleep 0.5
done

P=http://127.0.0.1:28050
for obj in 1k 4k 16k 256k; do
    u="$P/obj/$obj.bin"
    curl -s -o /dev/null "$u"
    curl -s -o /dev/null "$u"
    curl -s -o /dev/null -I "$u"
    curl -s -o /dev/null -H 'Range: bytes=0-99' "$u"
    curl -s -o /dev/null -H 'If-None-Match: "x"' "$u"
done
wrk -t1 -c16 -d5s "$P/obj/1k.bin" >/dev/null
wrk -t1 -c16 -d5s "$P/obj/256k.bin" >/dev/null
BENCH_LUA_DIR="$HARNESS/lua" BENCH_NPAGES=10000 \
    wrk -t1 -c32 -d40s -s "$HARNESS/lua/manykeys.lua" "$P/" >/dev/null
BENCH_LUA_DIR="$HARNESS/lua" BENCH_MISS_PREFIX="hot$RANDOM" BENCH_MISS_PATH=/slow/4k.bin \
    wrk -t1 -c64 -d5s -s "$HARNESS/lua/miss.lua" "$P/" >/dev/null
curl -s -o /dev/null http://127.0.0.1:28059/metrics
curl -s -o /dev/null http://127.0.0.1:28059/
curl -s -o /dev/null -X PURGE "$P/obj/4k.bin"
kill -INT "$SKUA"
wait "$SKUA" || true

# callgrind records the address of every instruction that ran; each is mapped to the symbol
# that contains it. The list keeps the compiler's order (callers near their callees), with the
# functions that did most of the work first, so the request path shares as few pages and TLB
# entries as it can.
python3 - "$WORK/callgrind.out" "$WORK/skua" build/hot-code.txt <<'PY'
import bisect, collections, subprocess, sys
profile, binary, out = sys.argv[1:]
symbols = []
for line in subprocess.run(["nm", "-n", "-S", "--defined-only", binary],
                           capture_output=True, text=True, check=True).stdout.splitlines():
    f = line.split()
    if len(f) == 4 and f[2] in "tTwW" and int(f[1], 16) > 0:
        symbols.append((int(f[0], 16), int(f[1], 16), f[3]))
starts = [s[0] for s in symbols]
by_name = {s[2]: s[0] for s in symbols}
ours, after_call, fn = False, False, None
costs, first_seen = collections.Counter(), {}
for line in open(profile, errors="replace"):
    line = line.rstrip("\n")
    if line.startswith("ob="):
        ours = line[3:] == binary
    elif line.startswith("fn="):
        fn, after_call = line[3:], False
    elif line.startswith("calls="):
        after_call = True
    elif line.startswith("0x"):
        if after_call:
            after_call = False  # the call's inclusive cost, not this function's own
            continue
        if ours:
            addr, ir = line.split()[:2]
            costs[int(addr, 16)] += int(ir)
            first_seen.setdefault(fn, int(addr, 16))
# A position-independent binary runs at a load address: the one most functions agree on.
names = {readable.split(" ", 2)[-1]: raw.split(" ", 2)[-1] for raw, readable in zip(
    subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True).stdout.splitlines(),
    subprocess.run(["nm", "-C", "--defined-only", binary], capture_output=True, text=True).stdout.splitlines())}
deltas = collections.Counter((at - by_name[names[f]]) & ~0xFFF for f, at in first_seen.items()
                             if f in names and names[f] in by_name)
base = deltas.most_common(1)[0][0] if deltas else 0
cost = collections.Counter()
for addr, ir in costs.items():
    i = bisect.bisect_right(starts, addr - base) - 1
    if i >= 0 and addr - base < symbols[i][0] + symbols[i][1]:
        cost[i] += ir
total = sum(cost.values())
hot = sorted(i for i in cost if cost[i] * 10000 >= total)   # at least 0.01 % of the work
rest = sorted(i for i in cost if cost[i] * 10000 < total)
order = [symbols[i][2] for i in hot + rest]
open(out, "w").write("\n".join(dict.fromkeys(order)) + "\n")
print("load address %#x; %d functions ran (%d hot, %.1f KiB); %d symbols written to %s" % (
    base, len(cost), len(hot), sum(symbols[i][1] for i in hot) / 1024, len(order), out))
PY
# What the names' hashes follow from, for tests/hot_code.rs to check without a release build.
# The features each dependency is built with change its symbol hashes as the lock file does.
# A path package is named with its directory, which says nothing about its symbols: left out.
FEATURES="$(cargo tree --offline --locked --edges normal,build --prefix none --format '{p} {f}' |
    sed -E 's/ \(\/[^)]*\)//' | LC_ALL=C sort -u | sha256sum | cut -d' ' -f1)"
printf 'toolchain %s\nCargo.lock %s\nfeatures %s\n' "$(rustc -V)" \
    "$(sha256sum Cargo.lock | cut -d' ' -f1)" "$FEATURES" >build/hot-code.recorded
cargo build --release
