#!/usr/bin/env bash
# DNS throughput of muster-dns: `muster serve --in-memory --dns-listen` with
# 100 registered instances (10 services of 10, at documentation addresses:
# answered, never dialed), queried with A and SRV (EDNS 1232) for random
# services, by dnsperf (open loop, up to 100 queries outstanding) and by
# `muster bench dns` (closed loop, one query in flight per socket).
# With PIN=1 (default) the server runs on CPU 0 and the load generator on
# CPU 1 (taskset), so the figures are those of one server core.
# Usage: crates/bench/scripts/bench-dns.sh   (DURATION=10 seconds,
# SOCKETS=16, PIN=1, MUSTER=target/release/muster; needs etcdctl and dnsperf)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
M=${MUSTER:-$ROOT/target/release/muster}
[ -x "$M" ] || { echo "bench-dns: build it first: cargo build --release -p muster-cli" >&2; exit 1; }
command -v dnsperf >/dev/null || { echo "bench-dns: needs dnsperf (apt-get install dnsperf)" >&2; exit 1; }
DURATION=${DURATION:-10}
SOCKETS=${SOCKETS:-16}
if [ "${PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  SERVER_CPU="taskset -c 0"; LOAD_CPU="taskset -c 1"
else
  SERVER_CPU=""; LOAD_CPU=""
fi
W=$(mktemp -d /tmp/dnsbench.XXXX)
pids=()
trap 'kill ${pids[@]} 2>/dev/null; rm -rf $W' EXIT
GRPC=23891 HTTP=23892 DNS=23893
$SERVER_CPU $M serve --in-memory --listen 127.0.0.1:$GRPC --http-listen 127.0.0.1:$HTTP \
  --dns-listen 127.0.0.1:$DNS >$W/serve.log 2>&1 & pids+=($!)
$M bench ready --endpoints 127.0.0.1:$GRPC >/dev/null
for s in $(seq 0 9); do
  for i in $(seq 0 9); do
    etcdctl --endpoints=127.0.0.1:$GRPC put /muster/services/svc-$s/i-$i \
      "{\"schema\":1,\"addr\":\"http://198.51.100.$((s * 10 + i + 1)):80$s$i\",\"weight\":100,\"status\":\"serving\"}" >/dev/null
  done
done
dig @127.0.0.1 -p $DNS +short svc-0.service.muster | wc -l | grep -qx 10 \
  || { echo "bench-dns: the DNS server does not answer 10 instances" >&2; exit 1; }
names=$(seq -s, -f 'svc-%g.service.muster' 0 9)
for t in A SRV; do
  for s in $(seq 0 9); do echo "svc-$s.service.muster $t"; done >$W/queries-$t
done

echo "# 100 instances in 10 services; ${DURATION}s per run; server: ${SERVER_CPU:-any CPU}, load: ${LOAD_CPU:-any CPU}"
for t in A SRV; do
  out=$($LOAD_CPU dnsperf -s 127.0.0.1 -p $DNS -d $W/queries-$t -l $DURATION -e -q 100 -c 4 -T 1 2>&1)
  qps=$(echo "$out" | sed -n 's/.*Queries per second: *\([0-9.]*\).*/\1/p')
  avg=$(echo "$out" | sed -n 's/.*Average Latency (s): *\([0-9.]*\).*/\1/p')
  lost=$(echo "$out" | sed -n 's/.*Queries lost: *\([0-9]*\).*/\1/p')
  printf 'dnsperf %-3s qps %8.0f  avg latency %.3f ms  lost %s\n' "$t" "$qps" "$(awk "BEGIN { print $avg * 1000 }")" "$lost"
done
for t in a srv; do
  json=$($LOAD_CPU $M bench dns --dns-server 127.0.0.1:$DNS --dns-name "$names" --dns-type $t \
    --dns-edns 1232 --clients $SOCKETS --duration ${DURATION}s -o json)
  qps=$(echo "$json" | sed -n 's/.*"ops_per_sec":\([0-9.]*\).*/\1/p')
  p50=$(echo "$json" | sed -n 's/.*"p50":\([0-9.]*\).*/\1/p')
  p99=$(echo "$json" | sed -n 's/.*"p99":\([0-9.]*\).*/\1/p')
  errors=$(echo "$json" | sed -n 's/.*"errors":\([0-9]*\).*/\1/p')
  printf 'muster bench dns %-3s (%s sockets) qps %8.0f  p50 %s ms  p99 %s ms  errors %s\n' \
    "${t^^}" "$SOCKETS" "$qps" "$p50" "$p99" "$errors"
done
curl -s 127.0.0.1:$HTTP/metrics | grep -E '^muster_dns_(queries_total|truncated_total|dropped_total)' || true
