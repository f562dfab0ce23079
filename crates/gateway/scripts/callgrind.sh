#!/usr/bin/env bash
# User-space instructions per proxied request: `muster gateway` (release,
# one worker) under valgrind's callgrind, in front of three upstream
# instances (crates/gateway/examples/upstream.rs) registered in a real etcd,
# loaded by `wrk -t1 -c8`. Instrumentation is switched on only for the wrk
# run, so start-up and discovery are not counted. The figure is exact for a
# given build, independent of the machine's load (httparse takes its scalar
# path under valgrind).
#
# Usage: crates/gateway/scripts/callgrind.sh    (env: DURATION (10s) CONNS (8) NO_BUILD KEEP=1: keep the profile)
# Needs: valgrind, wrk, etcd, curl.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
DURATION=${DURATION:-10s}
CONNS=${CONNS:-8}
cd "$ROOT"
for tool in valgrind callgrind_control wrk etcd curl; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: $tool is missing" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/muster-gw-callgrind.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build_binaries
start_registry_and_upstreams
GP=$(free_port)
RUST_LOG=warn valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/callgrind.out" \
    "$MUSTER" gateway --workers 1 --endpoints "127.0.0.1:$EP" --listen "127.0.0.1:$GP" --route /=bench \
    >"$WORK/gateway.log" 2>&1 &
GW=$!
PIDS+=($GW)
wait_http "http://127.0.0.1:$GP/healthz" "muster gateway"
for _ in $(seq 1 600); do
    [[ "$(curl -s "http://127.0.0.1:$GP/" 2>/dev/null)" == ok* ]] && break; sleep 0.1
done
wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$GP/" >/dev/null # warm up (pools filled)
callgrind_control -i on "$GW" >/dev/null
wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$GP/" >"$WORK/wrk.out"
callgrind_control -i off "$GW" >/dev/null
callgrind_control -d "$GW" >/dev/null
kill -INT "$GW" 2>/dev/null || true
wait "$GW" 2>/dev/null || true
REQS=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
# The dump taken with instrumentation on (the file whose name ends in a number).
IR=0
for f in "$WORK"/callgrind.out*; do
    n=$(awk '/^totals:/ {print $2}' "$f")
    [[ -n "$n" && "$n" -gt "$IR" ]] && IR=$n && OUT=$f
done
echo "requests: $REQS  instructions: $IR  per request: $((IR / REQS))"
grep -E "Non-2xx|Socket errors" "$WORK/wrk.out" || true
if [[ -n "${KEEP:-}" ]]; then
    echo "profile: $OUT"
    callgrind_annotate --inclusive=no "$OUT" 2>/dev/null | sed -n 1,60p
fi
