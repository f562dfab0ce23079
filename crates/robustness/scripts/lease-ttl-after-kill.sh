#!/bin/bash
# Lease TTL bound across kill -9: grant TTL 3 s, attach a key, kill -9 the
# server 1 s later, restart at once, and time when the key is gone.
set -u
export ETCDCTL_API=3
BIN=${MUSTER:-target/release/muster}
D=$(mktemp -d); P=$((20000 + RANDOM % 20000)); H=$((P+1))
E="--endpoints=127.0.0.1:$P"
start() { $BIN serve --data-dir $D/data --listen 127.0.0.1:$P --http-listen 127.0.0.1:$H >>$D/log 2>&1 & PID=$!; for i in $(seq 100); do etcdctl $E endpoint health >/dev/null 2>&1 && break; sleep 0.05; done; }
start
T0=$(date +%s.%N)
L=$(ETCDCTL_API=3 etcdctl $E lease grant 3 | awk '{print $2}')
ETCDCTL_API=3 etcdctl $E put --lease=$L ttl-key v >/dev/null
sleep 1
kill -9 $PID; wait $PID 2>/dev/null
start
T1=$(date +%s.%N)
while ETCDCTL_API=3 etcdctl $E get ttl-key --print-value-only 2>/dev/null | grep -q v; do sleep 0.05; done
T2=$(date +%s.%N)
echo "restart at +$(echo "$T1-$T0" | bc) s, key gone at +$(echo "$T2-$T0" | bc) s after grant (TTL 3 s)"
kill -9 $PID; rm -rf $D
