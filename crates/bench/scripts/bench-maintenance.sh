#!/usr/bin/env bash
# Snapshot, restore and defragmentation of a large store: `muster serve`
# next to etcd on this machine, with the same data and the same tool
# (etcdctl, which both serve) where both can be driven by it.
#
# For each server, on a fresh persistent data directory:
#   1. populate KEYS keys (VALUE_SIZE-byte values, `muster bench populate`);
#   2. snapshot: `etcdctl snapshot save` from the running server: time,
#      file size, and the server's peak resident memory while it streams
#      (VmRSS sampled every 20 ms; its resident memory before, for
#      reference);
#   3. restore the file into a new directory (etcd: `etcdctl snapshot
#      restore`; muster: `muster snapshot restore`): time and the restoring
#      tool's peak resident memory (`/usr/bin/time`); then serve the
#      restored directory and count its keys (must be KEYS);
#   4. defragment after a large delete: delete every key, compact at the
#      current revision, then `etcdctl defrag`: time and the database file
#      size before and after (etcd: member/snap/db; muster: muster.redb).
#
# Usage (from anywhere in the repository):
#   crates/bench/scripts/bench-maintenance.sh
# Environment:
#   KEYS=1000000 VALUE_SIZE=1000   the store (about 1 GiB of values)
#   CLIENTS=64                     populate's concurrent clients
#   ETCD=etcd ETCDCTL=etcdctl      etcd 3.4+
#   MUSTER=/path SKIP_BUILD=1      as bench-compare.sh
#   KEEP=1                         keep data, logs and snapshots
# Needs: cargo, etcd, etcdctl, bash, awk, /usr/bin/time; Linux (/proc).
set -euo pipefail

KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-1000}
CLIENTS=${CLIENTS:-64}
ETCD=${ETCD:-etcd}
ETCDCTL=${ETCDCTL:-etcdctl}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
die() {
    echo "bench-maintenance: $*" >&2
    exit 1
}
log() { echo "== $*" >&2; }

command -v "$ETCD" >/dev/null || die "no etcd binary ($ETCD) on PATH"
command -v "$ETCDCTL" >/dev/null || die "no etcdctl binary ($ETCDCTL) on PATH"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (apt-get install time)"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
find_muster

WORK=$(mktemp -d /tmp/muster-maint.XXXXXX)
PID=""
stop() {
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
        kill "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    PID=""
}
cleanup() {
    stop
    remove_work bench-maintenance
}
trap cleanup EXIT

# serve SERVER DIR PORT: starts SERVER on DIR, waits until it answers.
serve() {
    local s=$1 dir=$2 port=$3
    case $s in
    muster)
        "$MUSTER" serve --data-dir "$dir" --listen "127.0.0.1:$port" \
            --http-listen "127.0.0.1:$(free_port)" 2>>"$WORK/muster.log" &
        ;;
    etcd)
        local peer
        peer=$(free_port)
        "$ETCD" --name bench --data-dir "$dir" \
            --listen-client-urls "http://127.0.0.1:$port" \
            --advertise-client-urls "http://127.0.0.1:$port" \
            --listen-peer-urls "http://127.0.0.1:$peer" \
            --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
            --initial-cluster "bench=http://127.0.0.1:$peer" >>"$WORK/etcd.log" 2>&1 &
        ;;
    esac
    PID=$!
    for _ in $(seq 1 600); do
        ctl "$port" endpoint health >/dev/null 2>&1 && return
        kill -0 "$PID" 2>/dev/null || die "$s on $dir exited (see $WORK/$s.log)"
        sleep 0.1
    done
    die "$s on $dir did not answer within 60 s"
}

ctl() {
    local port=$1
    shift
    ETCDCTL_API=3 "$ETCDCTL" --endpoints "127.0.0.1:$port" --command-timeout=600s "$@"
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }
rss_kib() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
bytes_mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
db_file() {
    case $1 in
    muster) echo "$2/muster.redb" ;;
    etcd) echo "$2/member/snap/db" ;;
    esac
}

declare -A OUT
for s in muster etcd; do
    port=$(free_port)
    data=$WORK/$s-data
    serve "$s" "$data" "$port"
    log "$s: populate $KEYS keys of $VALUE_SIZE bytes"
    "$MUSTER" bench --endpoints "http://127.0.0.1:$port" populate --keys "$KEYS" \
        --value-size "$VALUE_SIZE" --clients "$CLIENTS" -o json >"$WORK/$s.populate.json"

    log "$s: snapshot save"
    before=$(rss_kib "$PID")
    peak=$before
    ctl "$port" snapshot save "$WORK/$s.snap" >>"$WORK/etcdctl.log" 2>&1 &
    saver=$!
    t0=$(now_ms)
    while kill -0 "$saver" 2>/dev/null; do
        r=$(rss_kib "$PID")
        ((r > peak)) && peak=$r
        sleep 0.02
    done
    wait "$saver" || die "$s: snapshot save failed: $(tail -3 "$WORK/etcdctl.log")"
    t1=$(now_ms)
    OUT[$s.save_s]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1000 }')
    OUT[$s.snap_mib]=$(bytes_mib "$(stat -c %s "$WORK/$s.snap")")
    OUT[$s.rss_before]=$(mib "$before")
    OUT[$s.rss_peak]=$(mib "$peak")

    log "$s: defragment after deleting every key and compacting"
    file=$(db_file "$s" "$data")
    OUT[$s.db_full]=$(bytes_mib "$(stat -c %s "$file")")
    ctl "$port" del --prefix bench/ >/dev/null
    rev=$(ctl "$port" endpoint status -w json | sed -n 's/.*"revision":\([0-9]*\).*/\1/p')
    ctl "$port" compaction --physical "$rev" >/dev/null
    OUT[$s.db_before]=$(bytes_mib "$(stat -c %s "$file")")
    t0=$(now_ms)
    ctl "$port" defrag >>"$WORK/etcdctl.log" 2>&1 || die "$s: defrag failed: $(tail -3 "$WORK/etcdctl.log")"
    t1=$(now_ms)
    OUT[$s.defrag_s]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1000 }')
    OUT[$s.db_after]=$(bytes_mib "$(stat -c %s "$file")")
    stop

    log "$s: restore"
    restored=$WORK/$s-restored
    case $s in
    muster) restore=("$MUSTER" snapshot restore "$WORK/$s.snap" --data-dir "$restored") ;;
    etcd) restore=(env ETCDCTL_API=3 "$ETCDCTL" snapshot restore "$WORK/$s.snap" --data-dir "$restored") ;;
    esac
    /usr/bin/time -f "%e %M" -o "$WORK/$s.restore.time" "${restore[@]}" >>"$WORK/restore.log" 2>&1 ||
        die "$s: restore failed: $(tail -3 "$WORK/restore.log")"
    read -r secs kib <"$WORK/$s.restore.time"
    OUT[$s.restore_s]=$secs
    OUT[$s.restore_rss]=$(mib "$kib")
    port=$(free_port)
    t0=$(now_ms)
    serve "$s" "$restored" "$port"
    t1=$(now_ms)
    OUT[$s.start_s]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", (b - a) / 1000 }')
    OUT[$s.keys]=$(ctl "$port" get --prefix bench/ --limit 1 -w json | sed -n 's/.*"count":\([0-9]*\).*/\1/p')
    stop
    [[ ${OUT[$s.keys]} == "$KEYS" ]] || die "$s: the restored store has ${OUT[$s.keys]} keys, not $KEYS"
done

echo "# $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg); $KEYS keys of $VALUE_SIZE bytes"
echo
echo "| measure | muster | etcd |"
echo "|---|---|---|"
row() { echo "| $1 | ${OUT[muster.$2]} | ${OUT[etcd.$2]} |"; }
row "snapshot save (s)" save_s
row "snapshot file (MiB)" snap_mib
row "server RSS before the snapshot (MiB)" rss_before
row "server peak RSS during the snapshot (MiB)" rss_peak
row "restore (s)" restore_s
row "restore peak RSS (MiB)" restore_rss
row "first answer of the restored server (s)" start_s
row "keys in the restored server" keys
row "db file with every key (MiB)" db_full
row "db file before defrag, after delete + compact (MiB)" db_before
row "defrag (s)" defrag_s
row "db file after defrag (MiB)" db_after
