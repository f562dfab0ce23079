#!/usr/bin/env bash
# The cost of auth on put throughput, same run: four servers side by side
# (muster serve and etcd, each without and with auth: a `bench` user with
# readwrite on `bench/`, bcrypt cost 10), 64 clients of `muster bench put`;
# each round runs all four in turn, the order reversed every other round.
# Usage: crates/bench/scripts/bench-auth.sh   (ROUNDS=4 DURATION=5s
# MUSTER=target/release/muster by default; needs etcd and etcdctl on PATH)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
M=${MUSTER:-$ROOT/target/release/muster}
[ -x "$M" ] || { echo "bench-auth: build it first: cargo build --release -p muster-cli" >&2; exit 1; }
W=$(mktemp -d /tmp/authbench.XXXX)
pids=()
trap 'kill ${pids[@]} 2>/dev/null; rm -rf $W' EXIT
start_muster() { $M serve --listen 127.0.0.1:$1 --http-listen 127.0.0.1:$2 --data-dir $W/m$1 >$W/m$1.log 2>&1 & pids+=($!); }
start_etcd() {
  etcd --name e$1 --data-dir $W/e$1 --listen-client-urls http://127.0.0.1:$1 --advertise-client-urls http://127.0.0.1:$1 \
    --listen-peer-urls http://127.0.0.1:$2 --initial-advertise-peer-urls http://127.0.0.1:$2 \
    --initial-cluster e$1=http://127.0.0.1:$2 >$W/e$1.log 2>&1 & pids+=($!)
}
start_muster 23791 23801; start_muster 23792 23802
start_etcd 23793 23803; start_etcd 23794 23804
for p in 23791 23792 23793 23794; do $M bench ready --endpoints 127.0.0.1:$p >/dev/null; done
for p in 23792 23794; do
  C="etcdctl --endpoints=127.0.0.1:$p"
  $C user add root:rootpw >/dev/null; $C user grant-role root root >/dev/null
  $C user add bench:benchpw >/dev/null; $C role add bench >/dev/null
  $C role grant-permission bench --prefix=true readwrite bench/ >/dev/null
  $C user grant-role bench bench >/dev/null; $C auth enable >/dev/null
done
run() { # label port extra...
  local label=$1 port=$2; shift 2
  local ops
  ops=$($M bench put --duration ${DURATION:-5s} --clients 64 --endpoints 127.0.0.1:$port "$@" -o json | sed -n 's/.*"ops_per_sec":\([0-9.]*\).*/\1/p' | head -1)
  echo "$label $ops"
}
for r in $(seq ${ROUNDS:-4}); do
  if (( r % 2 )); then
    run "muster-off" 23791; run "muster-on" 23792 --user bench:benchpw; run "etcd-off" 23793; run "etcd-on" 23794 --user bench:benchpw
  else
    run "etcd-on" 23794 --user bench:benchpw; run "etcd-off" 23793; run "muster-on" 23792 --user bench:benchpw; run "muster-off" 23791
  fi
done | tee $W/results
# Medians per server, and what auth costs each.
sort -k1,1 -k2,2n $W/results | awk '
  { v[$1] = v[$1] " " $2; n[$1]++ }
  END {
    for (k in v) { split(substr(v[k], 2), a, " "); m = n[k]; med[k] = (m % 2) ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2 }
    for (s in med) if (s ~ /-off$/) { b = substr(s, 1, length(s) - 4)
      printf "%s put ops/s median: auth off %.0f, on %.0f (%+.1f%%)\n", b, med[s], med[b "-on"], 100 * (med[b "-on"] / med[s] - 1) }
  }'
