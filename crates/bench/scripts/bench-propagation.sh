#!/usr/bin/env bash
# How long a change takes to reach every caller: `muster bench propagation`
# against three registries in the same run, each on free loopback ports in
# a temporary directory:
#
#   - muster-mem:  `muster serve --in-memory`
#   - muster-disk: `muster serve --data-dir DIR` (fsync before every ack)
#   - etcd:        etcd 3.4 (Debian's /usr/bin/etcd), its defaults
#
# For each registry, callers placement and load, one sweep over CALLERS
# (1, 10, 100 and 1000 callers following one service, each with its own
# discovery, connection and watch stream), ROUNDS registrations and
# deregistrations, one change at a time; registries alternate within each
# (placement, load) so that drifting background load hits all alike. The
# table shows, per row, the time from the registrar's call returning to
# the last caller's table showing the change (stamped when its discovery
# published that table; p50/p99/max over changes),
# to each caller (p50/p99 over every (caller, change) pair), and from the
# call's start to the last caller (p99: what a change costs end to end,
# whichever way the registry orders its reply and its watch events), and
# the registry's CPU time over the run per (caller, change) delivered (from
# /proc; one `muster bench` run per callers value): what the fan-out costs
# the registry itself, the figure that carries over to callers on other
# machines. Everything, registries and callers, shares this machine's
# cores.
#
# Usage (from anywhere in the repository):
#   crates/bench/scripts/bench-propagation.sh
# Environment:
#   CALLERS=1,10,100,1000   the sweep
#   ROUNDS=200              registrations (each followed by its deregistration)
#   PLACEMENTS="0 4"        callers in this process (0) and/or in N child
#                           processes (`--caller-processes N`)
#   LOADS="0 8"             put clients on other keys meanwhile
#   PER_CONNECTION=1        callers sharing one connection
#   SERVERS="muster-mem muster-disk etcd"
#   ETCD=/usr/bin/etcd      the etcd binary (3.4+)
#   MUSTER=/path            the muster binary (default: build
#                           target/release/muster first)
#   SKIP_BUILD=1            use the existing target/release/muster
#   KEEP=1                  keep the data directories, logs and JSON reports
# Needs: cargo, etcd, bash, sed, awk.
set -euo pipefail

CALLERS=${CALLERS:-1,10,100,1000}
ROUNDS=${ROUNDS:-200}
PLACEMENTS=${PLACEMENTS:-0 4}
LOADS=${LOADS:-0 8}
PER_CONNECTION=${PER_CONNECTION:-1}
SERVERS=${SERVERS:-muster-mem muster-disk etcd}
ETCD=${ETCD:-/usr/bin/etcd}
[[ -x $ETCD ]] || ETCD=$(command -v etcd || true)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
die() {
    echo "bench-propagation: $*" >&2
    exit 1
}
log() { echo "== $*" >&2; }

[[ -n $ETCD && -x $ETCD ]] || die "no etcd binary; set ETCD=/path/to/etcd (apt-get install etcd-server)"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_muster
# 1000 callers in one process are 1000 sockets, and as many on the server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

WORK=$(mktemp -d /tmp/muster-propagation.XXXXXX)
declare -A PID=()
cleanup() {
    for s in "${!PID[@]}"; do
        kill -KILL "${PID[$s]}" 2>/dev/null || true
        wait "${PID[$s]}" 2>/dev/null || true
    done
    remove_work bench-propagation
}
trap cleanup EXIT


declare -A PORT=()
start() {
    local s=$1 port http peer
    port=$(free_port)
    http=$(free_port)
    PORT[$s]=$port
    case $s in
    muster-mem)
        "$MUSTER" serve --in-memory --listen "127.0.0.1:$port" --http-listen "127.0.0.1:$http" \
            2>>"$WORK/$s.log" &
        ;;
    muster-disk)
        "$MUSTER" serve --data-dir "$WORK/$s-data" --listen "127.0.0.1:$port" \
            --http-listen "127.0.0.1:$http" 2>>"$WORK/$s.log" &
        ;;
    etcd)
        peer=$(free_port)
        "$ETCD" --name bench --data-dir "$WORK/etcd-data" \
            --listen-client-urls "http://127.0.0.1:$port" \
            --advertise-client-urls "http://127.0.0.1:$port" \
            --listen-peer-urls "http://127.0.0.1:$peer" \
            --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
            --initial-cluster "bench=http://127.0.0.1:$peer" >>"$WORK/etcd.log" 2>&1 &
        ;;
    *) die "unknown server $s (muster-mem, muster-disk, etcd)" ;;
    esac
    PID[$s]=$!
    "$MUSTER" bench --endpoints "127.0.0.1:$port" ready --ready-timeout 60s >/dev/null ||
        die "$s did not come up: $(tail -5 "$WORK/$s.log" 2>/dev/null)"
}

for s in $SERVERS; do
    log "starting $s"
    start "$s"
done
ETCD_VERSION=$("$ETCD" --version | sed -n 's/^etcd Version: //p')

# CPU time (user + system, in clock ticks) a process has used so far.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# The reports: one JSON line per (placement, load, server, callers), and
# beside it the server's CPU time over that run (callers' setup included).
for placement in $PLACEMENTS; do
    for load in $LOADS; do
        for callers in ${CALLERS//,/ }; do
            for s in $SERVERS; do
                log "$s: $callers callers, processes $placement, load $load, $ROUNDS rounds"
                out=$WORK/$s.p$placement.l$load.json
                before=$(cpu_ticks "${PID[$s]}")
                "$MUSTER" bench --endpoints "127.0.0.1:${PORT[$s]}" -o json propagation \
                    --callers "$callers" --rounds "$ROUNDS" --caller-processes "$placement" \
                    --callers-per-connection "$PER_CONNECTION" --load-clients "$load" >>"$out" ||
                    echo "bench-propagation: $s ($callers callers, processes $placement, load $load) failed; see $out" >&2
                echo $(($(cpu_ticks "${PID[$s]}") - before)) >>"$out.cpu"
            done
        done
    done
done

# jnum LINE KEY [OBJECT]: the number under KEY (inside OBJECT) in a JSON line.
jnum() {
    local line=$1 key=$2 object=${3:-}
    if [[ -n $object ]]; then
        sed -n "s/.*\"$object\":{[^}]*\"$key\":\([-0-9.e]*\).*/\1/p" <<<"$line"
    else
        sed -n "s/.*\"$key\":\([-0-9.e]*\).*/\1/p" <<<"$line"
    fi
}
ms() { [[ -n $1 ]] && printf '%.2f' "$1" || printf -- '-'; }

echo "# muster bench propagation: $ROUNDS registrations + $ROUNDS deregistrations per row,"
echo "# one change at a time; $(nproc) cores shared by the registry and every caller;"
echo "# etcd $ETCD_VERSION; $PER_CONNECTION caller(s) per connection; times in ms"
echo "# ack: the registrar's call returned; call: it started; last: the last caller per change"
echo "# srv µs/seen: the server's CPU time over the run per (caller, change) delivered"
echo "# (the callers' setup, and the load's puts when load > 0, included)"
printf '%-11s %7s %-9s %4s %5s | %9s %9s %9s | %9s %9s | %9s %9s | %9s | %s\n' \
    server callers placement load conns "ack→last" p99 max "ack→each" p99 "call→last" "reg.call" "srv µs" note
printf '%-11s %7s %-9s %4s %5s | %9s %9s %9s | %9s %9s | %9s %9s | %9s |\n' \
    "" "" "" "" "" p50 "" "" p50 "" p99 p50 "/seen"
for placement in $PLACEMENTS; do
    for load in $LOADS; do
        for s in $SERVERS; do
            out=$WORK/$s.p$placement.l$load.json
            [[ -s $out ]] || continue
            row=0
            while IFS= read -r line; do
                row=$((row + 1))
                ticks=$(sed -n "${row}p" "$out.cpu")
                callers=$(jnum "$line" callers)
                conns=$(jnum "$line" caller_connections)
                where=in-proc
                ((placement > 0)) && where="${placement}-procs"
                note=""
                failure=$(sed -n 's/.*"failure":"\([^"]*\)".*/\1/p' <<<"$line")
                [[ -n $failure ]] && note="FAILED: $failure"
                seen=$(jnum "$line" sightings)
                expected=$(jnum "$line" expected)
                [[ $seen != "$expected" ]] && note="$note $seen/$expected seen"
                per_seen=-
                if [[ -n $ticks && -n $seen && $seen -gt 0 ]]; then
                    per_seen=$(awk -v t="$ticks" -v hz="$TICK" -v n="$seen" \
                        'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
                fi
                printf '%-11s %7s %-9s %4s %5s | %9s %9s %9s | %9s %9s | %9s %9s | %9s | %s\n' \
                    "$s" "$callers" "$where" "$load" "$conns" \
                    "$(ms "$(jnum "$line" p50 last_caller_latency_ms)")" \
                    "$(ms "$(jnum "$line" p99 last_caller_latency_ms)")" \
                    "$(ms "$(jnum "$line" max last_caller_latency_ms)")" \
                    "$(ms "$(jnum "$line" p50 each_caller_latency_ms)")" \
                    "$(ms "$(jnum "$line" p99 each_caller_latency_ms)")" \
                    "$(ms "$(jnum "$line" p99 last_caller_since_call_ms)")" \
                    "$(ms "$(jnum "$line" p50 registrar_latency_ms)")" \
                    "$per_seen" "$note"
            done <"$out"
        done
    done
done
