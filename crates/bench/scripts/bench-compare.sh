#!/usr/bin/env bash
# Compares `muster serve` with etcd on this machine, end to end, with
# `muster bench` (the muster-bench crate's load generator, in the `muster`
# binary; it reads the keys of its `-o json` reports):
#
#   - resident memory (VmRSS) after populating 100k keys (32 B / 256 B);
#   - restart time with those keys: kill -9, then from spawning the server
#     to its first successful Range;
#   - range, put, txn and keepalive throughput (64 concurrent clients);
#   - one put reaching 1000 watchers: latency from just before each put to
#     each watcher receiving its event (p50/p99/max over every pair).
#
# Both servers run side by side (an idle one costs nothing), on free
# loopback ports, each with a fresh persistent data directory under /tmp
# (muster: fsync on every commit; etcd: its defaults). Every workload runs
# ROUNDS times, alternating servers (muster first in odd rounds, etcd first
# in even ones) so that drifting background load hits both alike; the
# table shows medians (and the range over rounds for throughput). The load
# generator runs on the same machine: on 2 cores it takes a good part of
# the CPU, and anything else running skews everything (the script reports
# how busy the machine was during the put runs).
#
# Usage (from anywhere in the repository):
#   crates/bench/scripts/bench-compare.sh
# Environment:
#   ROUNDS=3         runs of each workload per server
#   DURATION=6s      length of each put/range/txn/keepalive run
#   CLIENTS=64       concurrent clients (and keep-alive streams)
#   KEYS=100000      keys populated (memory, restart, range keyspace)
#   WATCHERS=1000 PUTS=200 PUT_INTERVAL=20ms   each watch run
#   ETCD=etcd        the etcd binary (3.4+)
#   MUSTER=/path     the muster binary to measure (default: build
#                    target/release/muster first)
#   SKIP_BUILD=1     use the existing target/release/muster
#   KEEP=1           keep the data directories, logs and JSON reports
#   TLS=1            both servers with mutual TLS (certificates from
#                    `muster certs`; etcd's --cert-file/--key-file/
#                    --trusted-ca-file/--client-cert-auth and the same flags
#                    for muster serve), the clients with --cacert/--cert/--key
#   AUTH=1           both servers with etcd's auth enabled (simple tokens),
#                    set up with etcdctl once both are up: a `root` user
#                    with the root role, a `bench` user whose role may read
#                    and write the bench's keys (prefix bench/: keyspace,
#                    watched key, probe); every `muster bench` then runs
#                    with --user bench:PASSWORD (one login per endpoint and
#                    run, the token on every request). The restart time
#                    then includes that login (bcrypt, cost 10 on both).
#                    Combines with TLS=1.
#   ETCDCTL=etcdctl  the etcdctl binary (3.4+), for AUTH=1
# Needs: cargo, etcd, bash, sed, awk, sort; Linux (/proc); etcdctl for AUTH=1.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-6s}
CLIENTS=${CLIENTS:-64}
KEYS=${KEYS:-100000}
WATCHERS=${WATCHERS:-1000}
PUTS=${PUTS:-200}
PUT_INTERVAL=${PUT_INTERVAL:-20ms}
ETCD=${ETCD:-etcd}
ETCDCTL=${ETCDCTL:-etcdctl}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)

die() {
    echo "bench-compare: $*" >&2
    exit 1
}
log() { echo "== $*" >&2; }

command -v "$ETCD" >/dev/null || die "no etcd binary ($ETCD) on PATH; set ETCD=/path/to/etcd"
if [[ -n ${AUTH:-} ]]; then
    command -v "$ETCDCTL" >/dev/null || die "AUTH=1 needs etcdctl ($ETCDCTL) on PATH; set ETCDCTL=/path/to/etcdctl"
fi
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_muster

WORK=$(mktemp -d /tmp/muster-bench.XXXXXX)
SCHEME=http
SERVER_TLS=()
CLIENT_TLS=()
if [[ -n ${TLS:-} ]]; then
    "$MUSTER" certs --dir "$WORK/certs" >/dev/null
    SCHEME=https
    SERVER_TLS=(--cert-file "$WORK/certs/server.pem" --key-file "$WORK/certs/server-key.pem"
        --trusted-ca-file "$WORK/certs/ca.pem" --client-cert-auth)
    CLIENT_TLS=(--cacert "$WORK/certs/ca.pem" --cert "$WORK/certs/client.pem"
        --key "$WORK/certs/client-key.pem")
fi
# AUTH=1: the bench's login (the key prefix is muster bench's default).
CLIENT_AUTH=()
BENCH_PREFIX=bench/
if [[ -n ${AUTH:-} ]]; then
    ROOT_PASSWORD=root-$RANDOM$RANDOM
    BENCH_PASSWORD=bench-$RANDOM$RANDOM
    CLIENT_AUTH=(--user "bench:$BENCH_PASSWORD")
fi
declare -A PID=([muster]="" [etcd]="")
stop() {
    local s=$1 signal=${2:-TERM}
    if [[ -n ${PID[$s]} ]] && kill -0 "${PID[$s]}" 2>/dev/null; then
        kill "-$signal" "${PID[$s]}" 2>/dev/null || true
        wait "${PID[$s]}" 2>/dev/null || true
    fi
    PID[$s]=""
}
cleanup() {
    stop muster KILL
    stop etcd KILL
    remove_work bench-compare
}
trap cleanup EXIT

# Free loopback ports (common.sh's free_port) for both servers.
declare -A PORT HTTP_PORT PEER_PORT
for s in muster etcd; do
    PORT[$s]=$(free_port)
    HTTP_PORT[$s]=$(free_port)
    PEER_PORT[$s]=$(free_port)
done

start() {
    local s=$1
    case $s in
    muster)
        "$MUSTER" serve --data-dir "$WORK/muster-data" --listen "127.0.0.1:${PORT[$s]}" \
            --http-listen "127.0.0.1:${HTTP_PORT[$s]}" "${SERVER_TLS[@]}" 2>>"$WORK/muster.log" &
        ;;
    etcd)
        "$ETCD" --name bench --data-dir "$WORK/etcd-data" \
            --listen-client-urls "$SCHEME://127.0.0.1:${PORT[$s]}" \
            --advertise-client-urls "$SCHEME://127.0.0.1:${PORT[$s]}" "${SERVER_TLS[@]}" \
            --listen-peer-urls "http://127.0.0.1:${PEER_PORT[$s]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${PEER_PORT[$s]}" \
            --initial-cluster "bench=http://127.0.0.1:${PEER_PORT[$s]}" >>"$WORK/etcd.log" 2>&1 &
        ;;
    esac
    PID[$s]=$!
}

# bench SERVER ARGS...: muster bench against SERVER (logged in, with
# AUTH=1, once auth is enabled: before, the login finds auth disabled and
# the bench runs without a token, as etcd's client does).
bench() {
    local s=$1
    shift
    "$MUSTER" bench --endpoints "$SCHEME://127.0.0.1:${PORT[$s]}" "${CLIENT_TLS[@]}" \
        "${CLIENT_AUTH[@]}" "$@"
}

# ctl SERVER ARGS...: etcdctl against SERVER (etcd or muster serve alike).
ctl() {
    local s=$1
    shift
    ETCDCTL_API=3 "$ETCDCTL" --endpoints "$SCHEME://127.0.0.1:${PORT[$s]}" "${CLIENT_TLS[@]}" "$@" \
        >>"$WORK/etcdctl.log" 2>&1 || die "etcdctl $* against $s failed: $(tail -3 "$WORK/etcdctl.log")"
}

# enable_auth SERVER: the root and bench users, then auth on.
enable_auth() {
    local s=$1
    ctl "$s" user add "root:$ROOT_PASSWORD"
    ctl "$s" user grant-role root root
    ctl "$s" role add bench
    ctl "$s" role grant-permission bench --prefix=true readwrite "$BENCH_PREFIX"
    ctl "$s" user add "bench:$BENCH_PASSWORD"
    ctl "$s" user grant-role bench bench
    ctl "$s" auth enable
    # Auth is on: a request without a login is refused (with TLS=1 the
    # client certificate's name is a login).
    if [[ -z ${TLS:-} ]] && ETCDCTL_API=3 "$ETCDCTL" --endpoints "$SCHEME://127.0.0.1:${PORT[$s]}" \
        get "${BENCH_PREFIX}probe" >/dev/null 2>&1; then
        die "$s still answers without a login after auth enable"
    fi
}

# jnum FILE KEY [OBJECT]: the number under KEY (inside OBJECT if given) in
# the one-line JSON report FILE.
jnum() {
    local file=$1 key=$2 object=${3:-}
    if [[ -n $object ]]; then
        sed -n "s/.*\"$object\":{[^}]*\"$key\":\([-0-9.e]*\).*/\1/p" "$file"
    else
        sed -n "s/.*\"$key\":\([-0-9.e]*\).*/\1/p" "$file"
    fi
}
rss_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# "busy total" CPU ticks of the whole machine.
machine_ticks() { awk '/^cpu /{ print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat; }
now_ns() { date +%s%N; }
CLK_TCK=$(getconf CLK_TCK)

busy_pct() {
    local a b
    a=$(machine_ticks)
    sleep 1
    b=$(machine_ticks)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = y[2] - x[2]; p = 0; if (t > 0) p = 100 * (y[1] - x[1]) / t; printf "%.0f", p }'
}
BUSY_BEFORE=$(busy_pct)
if ((BUSY_BEFORE > 10)); then
    echo "bench-compare: warning: the machine is already ${BUSY_BEFORE}% busy; figures will be skewed" >&2
fi

# ---------------------------------------------------------------------------
# Memory and restart

for s in muster etcd; do
    log "$s on 127.0.0.1:${PORT[$s]}"
    start "$s"
    bench "$s" ready --ready-timeout 60s -o json >"$WORK/$s.ready.json"
done
if [[ -n ${AUTH:-} ]]; then
    for s in muster etcd; do
        log "$s: users root and bench, auth enable"
        enable_auth "$s"
    done
fi
for s in muster etcd; do
    log "$s: populate $KEYS keys, then resident memory"
    bench "$s" populate --keys "$KEYS" --clients "$CLIENTS" -o json >"$WORK/$s.populate.json"
done
sleep 2
for s in muster etcd; do
    {
        echo "rss_kib=$(rss_kib "${PID[$s]}" VmRSS)"
        echo "rss_anon_kib=$(rss_kib "${PID[$s]}" RssAnon)"
        echo "rss_file_kib=$(rss_kib "${PID[$s]}" RssFile)"
    } >"$WORK/$s.mem"
done
for s in muster etcd; do
    log "$s: kill -9, restart, time to the first successful Range"
    stop "$s" KILL
    t0=$(now_ns)
    start "$s"
    bench "$s" ready --ready-timeout 60s -o json >"$WORK/$s.restart.json"
    echo "restart_ms=$((($(jnum "$WORK/$s.restart.json" ready_unix_ns) - t0) / 1000000))" >>"$WORK/$s.mem"
done

# ---------------------------------------------------------------------------
# Throughput and watch latency, ROUNDS times, servers alternating

order() { if (($1 % 2)); then echo muster etcd; else echo etcd muster; fi; }
for round in $(seq 1 "$ROUNDS"); do
    for workload in range put txn keepalive; do
        for s in $(order "$round"); do
            log "round $round/$ROUNDS: $s $workload ($CLIENTS clients, $DURATION)"
            out=$WORK/$s.$workload.$round
            case $workload in
            keepalive) args=(--clients "$CLIENTS" --leases 1000) ;;
            *) args=(--keys "$KEYS" --clients "$CLIENTS") ;;
            esac
            c0=$(cpu_ticks "${PID[$s]}")
            m0=$(machine_ticks)
            bench "$s" "$workload" "${args[@]}" --duration "$DURATION" -o json >"$out.json"
            c1=$(cpu_ticks "${PID[$s]}")
            m1=$(machine_ticks)
            echo "$((c1 - c0)) $m0 $m1" >"$out.cpu"
        done
    done
    for s in $(order "$round"); do
        log "round $round/$ROUNDS: $s watch ($WATCHERS watchers, $PUTS puts every $PUT_INTERVAL)"
        bench "$s" watch --watchers "$WATCHERS" --puts "$PUTS" --put-interval "$PUT_INTERVAL" \
            -o json >"$WORK/$s.watch.$round.json"
    done
done
stop muster
stop etcd
BUSY_AFTER=$(busy_pct)

# ---------------------------------------------------------------------------
# The table

# values SERVER WORKLOAD KEY [OBJECT]: KEY over the rounds, one a line.
values() {
    local s=$1 w=$2 key=$3 object=${4:-} round
    for round in $(seq 1 "$ROUNDS"); do
        jnum "$WORK/$s.$w.$round.json" "$key" "$object"
    done
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
spread() { sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.0f-%.0f", lo, hi }'; }
sum() { awk '{ s += $1 } END { print s + 0 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
fmt0() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }
fmt2() { awk -v a="$1" 'BEGIN { printf "%.2f", a }'; }
mib() { awk -v a="$1" 'BEGIN { printf "%.1f", a / 1024 }'; }
mem() { sed -n "s/^$2=//p" "$WORK/$1.mem"; }
row() { echo "| $1 | $2 | $3 | $4 | $5 |"; }

ops_row() {
    local label=$1 w=$2 target=${3:-} m e
    m=$(values muster "$w" ops_per_sec | median)
    e=$(values etcd "$w" ops_per_sec | median)
    row "$label" "$(fmt0 "$m") ($(values muster "$w" ops_per_sec | spread))" \
        "$(fmt0 "$e") ($(values etcd "$w" ops_per_sec | spread))" "$(ratio "$m" "$e")" "$target"
}
lat_row() {
    local label=$1 w=$2 object=$3 key=$4 target=${5:-} m e
    m=$(values muster "$w" "$key" "$object" | median)
    e=$(values etcd "$w" "$key" "$object" | median)
    row "$label" "$(fmt2 "$m")" "$(fmt2 "$e")" "$(ratio "$m" "$e")" "$target"
}
# Server CPU per put (us) in each round.
cpu_per_put() {
    local s=$1 round ticks ops
    for round in $(seq 1 "$ROUNDS"); do
        read -r ticks _ <"$WORK/$s.put.$round.cpu"
        ops=$(jnum "$WORK/$s.put.$round.json" ops)
        awk -v t="$ticks" -v o="$ops" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f\n", t / hz / o * 1e6 }'
    done
}
# muster/etcd throughput of WORKLOAD in each round: the two runs of a round
# are back to back, so their ratio is less exposed to drifting background
# load than the ratio of medians.
round_ratios() {
    local w=$1 round
    for round in $(seq 1 "$ROUNDS"); do
        awk -v a="$(jnum "$WORK/muster.$w.$round.json" ops_per_sec)" \
            -v b="$(jnum "$WORK/etcd.$w.$round.json" ops_per_sec)" \
            'BEGIN { if (b > 0) printf "%.2f\n", a / b; else print 0 }'
    done
}
# Machine CPU busy (%) during each put round, and the server's share.
machine_busy() {
    local s=$1 round ticks b0 t0 b1 t1
    for round in $(seq 1 "$ROUNDS"); do
        read -r ticks b0 t0 b1 t1 <"$WORK/$s.put.$round.cpu"
        awk -v c="$ticks" -v b="$((b1 - b0))" -v t="$((t1 - t0))" \
            'BEGIN { printf "%.0f%% (server %.0f%%)\n", 100 * b / t, 100 * c / t }'
    done
}

ETCD_VERSION=$("$ETCD" --version | sed -n 's/^etcd Version: //p')
echo
TRANSPORT="plaintext"
[[ -n ${TLS:-} ]] && TRANSPORT="mutual TLS (client certificates required, ECDSA P-256)"
[[ -n ${AUTH:-} ]] && TRANSPORT+=", auth enabled (simple tokens; bench user with readwrite on $BENCH_PREFIX)"
echo "muster serve (release, data in /tmp, fsync per commit) vs etcd $ETCD_VERSION (defaults), $TRANSPORT."
echo "$(nproc) cores, load generator on the same machine; $CLIENTS clients; $ROUNDS rounds of $DURATION per"
echo "workload and server (medians; throughput range over rounds in parentheses); $KEYS keys of 32 B / 256 B."
echo "Machine busy with other work: ${BUSY_BEFORE}% before the run, ${BUSY_AFTER}% after."
echo
row "measure" "muster" "etcd" "muster/etcd" "target"
row "---" "---:" "---:" "---:" "---"
ops_row "put, ops/s" put "muster >= 1.5x etcd"
lat_row "put latency p50, ms" put latency_ms p50
lat_row "put latency p99, ms" put latency_ms p99
m=$(cpu_per_put muster | median)
e=$(cpu_per_put etcd | median)
row "server CPU per put, us" "$m" "$e" "$(ratio "$m" "$e")" ""
ops_row "range (linearizable), ops/s" range
lat_row "range latency p99, ms" range latency_ms p99
ops_row "txn (compare version, put), ops/s" txn
ops_row "keepalive, ops/s" keepalive
lat_row "keepalive latency p99, ms" keepalive latency_ms p99
lat_row "watch: put -> each of $WATCHERS watchers, p50, ms" watch watch_latency_ms p50
lat_row "watch: put -> each of $WATCHERS watchers, p99, ms" watch watch_latency_ms p99 "< 5 ms"
lat_row "watch: put -> each of $WATCHERS watchers, max, ms" watch watch_latency_ms max
lat_row "watch: put -> all $WATCHERS watchers, p99, ms" watch all_watchers_latency_ms p99
lat_row "watch: put -> ack, p50, ms" watch put_latency_ms p50
lat_row "watch: put -> ack, p99, ms" watch put_latency_ms p99
m=$(mem muster rss_kib)
e=$(mem etcd rss_kib)
row "VmRSS with $KEYS keys, MiB" "$(mib "$m")" "$(mib "$e")" "$(ratio "$m" "$e")" "muster <= etcd"
row "  of which anonymous / file, MiB" "$(mib "$(mem muster rss_anon_kib)") / $(mib "$(mem muster rss_file_kib)")" \
    "$(mib "$(mem etcd rss_anon_kib)") / $(mib "$(mem etcd rss_file_kib)")" "" ""
m=$(mem muster restart_ms)
e=$(mem etcd restart_ms)
row "restart with $KEYS keys (kill -9), ms" "$m" "$e" "$(ratio "$m" "$e")" "muster < 1000 ms"
m=$(jnum "$WORK/muster.populate.json" seconds)
e=$(jnum "$WORK/etcd.populate.json" seconds)
row "populate $KEYS keys (txns of 128 puts), s" "$(fmt2 "$m")" "$(fmt2 "$e")" "$(ratio "$m" "$e")" ""
echo
for w in put range txn keepalive; do
    r=$(round_ratios "$w")
    echo "$w, muster/etcd in each round: $(paste -sd ' ' <<<"$r")" \
        "(min $(sort -g <<<"$r" | head -n 1), median $(median <<<"$r"), max $(sort -g <<<"$r" | tail -n 1))"
done
for s in muster etcd; do
    echo "$s: machine CPU busy during the put rounds: $(machine_busy "$s" | paste -sd ' ')"
done
for s in muster etcd; do
    n=$(values "$s" watch notifications | sum)
    x=$(values "$s" watch expected | sum)
    echo "$s: watch notifications $n of $x; txn compare failures: $(values "$s" txn compare_failed | paste -sd ' ')"
done
