#!/usr/bin/env bash
# Gateway benchmark: wrk over loopback against
#   direct   one upstream instance, no proxy;
#   gateway  `muster gateway` (release) routing / to three upstream instances;
#   nginx    nginx with the same three instances as an upstream block
#            (keepalive to the upstreams, access log off);
# in the same run, in rounds alternating the targets, so the figures share
# the machine's state. The upstreams are crates/gateway/examples/upstream.rs
# (hyper, answers "ok"), registered in a real etcd.
#
# Two loads:
#   saturation  $CONNS (64) connections, $THREADS wrk threads, $DURATION each:
#               requests/s and latency percentiles at full load;
#   light       $LIGHT_CONNS (4) connections, 1 wrk thread: the latency a
#               request pays when nothing queues (the added-p99 figure).
#
# Usage: crates/gateway/scripts/bench.sh        (env: DURATION ROUNDS CONNS THREADS LIGHT_CONNS NO_BUILD)
# Needs: wrk, nginx, etcd (apt-get install -y wrk nginx-light etcd-server).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
LIGHT_CONNS=${LIGHT_CONNS:-4}
cd "$ROOT"

for tool in wrk nginx etcd curl; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing (apt-get install -y wrk nginx-light etcd-server curl)" >&2; exit 1; }
done

if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release -q -p muster-cli --bin muster
    cargo build --release -q -p muster-gateway --example upstream
fi
MUSTER="$ROOT/target/release/muster"
UPSTREAM="$ROOT/target/release/examples/upstream"

WORK=$(mktemp -d /tmp/muster-gw-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [[ -f "$WORK/nginx.pid" ]] && kill "$(cat "$WORK/nginx.pid" 2>/dev/null)" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_http() { # url what
    for _ in $(seq 1 200); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "bench.sh: $2 did not come up ($1)" >&2
    exit 1
}

# --- registry ---------------------------------------------------------------
EP=$(free_port); PP=$(free_port)
etcd --name bench --data-dir "$WORK/etcd" \
    --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
    --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
    --initial-cluster "bench=http://127.0.0.1:$PP" >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EP/health" etcd

# --- three upstreams ----------------------------------------------------------
ADDRS=()
for i in 1 2 3; do
    "$UPSTREAM" --service bench --id "u-$i" --endpoints "http://127.0.0.1:$EP" >"$WORK/u$i.out" 2>"$WORK/u$i.err" &
    PIDS+=($!)
    for _ in $(seq 1 200); do grep -q listening "$WORK/u$i.out" 2>/dev/null && break; sleep 0.05; done
    addr=$(sed -n 's|^listening on http://||p' "$WORK/u$i.out")
    [[ -n "$addr" ]] || { echo "bench.sh: upstream $i did not start" >&2; cat "$WORK/u$i.err" >&2; exit 1; }
    ADDRS+=("$addr")
done

# --- muster gateway -----------------------------------------------------------
GP=$(free_port)
RUST_LOG=warn "$MUSTER" gateway --endpoints "127.0.0.1:$EP" --listen "127.0.0.1:$GP" --route /=bench \
    >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$GP/healthz" "muster gateway"
for _ in $(seq 1 200); do curl -fsS -o /dev/null "http://127.0.0.1:$GP/" 2>/dev/null && break; sleep 0.05; done

# --- nginx --------------------------------------------------------------------
NP=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    upstream bench {
        server ${ADDRS[0]};
        server ${ADDRS[1]};
        server ${ADDRS[2]};
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NP;
        location / {
            proxy_pass http://bench;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" >"$WORK/nginx.out" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$NP/" nginx

declare -A URL=(
    [direct]="http://${ADDRS[0]}/"
    [gateway]="http://127.0.0.1:$GP/"
    [nginx]="http://127.0.0.1:$NP/"
)
TARGETS=(direct gateway nginx)

# wrk's latency figures in ms.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v=v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v=v*1000 } printf "%.3f", v }'; }
pct() { grep -E "^ +$1%" "$2" | awk '{print $2}' | to_ms; }
rps() { awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$1"; }
errors() { awk '/Non-2xx|Socket errors/ {print}' "$1" | tr '\n' ' '; }

echo "# machine: $(nproc) cores, $(uptime | sed 's/.*load average/load average/')"
echo "# wrk ${CONNS}c/${THREADS}t for ${DURATION} (saturation) and ${LIGHT_CONNS}c/1t (light), ${ROUNDS} rounds"
for t in "${TARGETS[@]}"; do wrk -t1 -c8 -d2s "${URL[$t]}" >/dev/null; done # warm up

for round in $(seq 1 "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "${URL[$t]}" >"$WORK/sat.$t.$round" 2>&1
        wrk -t1 -c"$LIGHT_CONNS" -d"$DURATION" --latency "${URL[$t]}" >"$WORK/light.$t.$round" 2>&1
    done
done

printf '\n| load | target | round | req/s | p50 ms | p90 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|---|\n'
for load in sat light; do
    for t in "${TARGETS[@]}"; do
        for round in $(seq 1 "$ROUNDS"); do
            f="$WORK/$load.$t.$round"
            printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$load" "$t" "$round" "$(rps "$f")" \
                "$(pct 50 "$f")" "$(pct 90 "$f")" "$(pct 99 "$f")" "$(errors "$f")"
        done
    done
done

# Medians over rounds.
median() { sort -n | awk '{a[NR]=$1} END { if (NR%2) print a[(NR+1)/2]; else printf "%.3f", (a[NR/2]+a[NR/2+1])/2 }'; }
printf '\n| load | target | median req/s | median p50 ms | median p99 ms |\n|---|---|---|---|---|\n'
declare -A MRPS MP99
for load in sat light; do
    for t in "${TARGETS[@]}"; do
        r=$(for round in $(seq 1 "$ROUNDS"); do rps "$WORK/$load.$t.$round"; echo; done | median)
        p50=$(for round in $(seq 1 "$ROUNDS"); do pct 50 "$WORK/$load.$t.$round"; echo; done | median)
        p99=$(for round in $(seq 1 "$ROUNDS"); do pct 99 "$WORK/$load.$t.$round"; echo; done | median)
        MRPS[$load.$t]=$r; MP99[$load.$t]=$p99
        printf '| %s | %s | %s | %s | %s |\n' "$load" "$t" "$r" "$p50" "$p99"
    done
done
echo
awk -v g="${MRPS[sat.gateway]}" -v n="${MRPS[sat.nginx]}" 'BEGIN { printf "gateway/nginx throughput (saturation): %.2fx (target >= 0.9x)\n", g/n }'
awk -v g="${MP99[light.gateway]}" -v d="${MP99[light.direct]}" 'BEGIN { printf "added p99 over direct (light load): %.3f ms (target <= 1 ms)\n", g-d }'
awk -v g="${MP99[sat.gateway]}" -v d="${MP99[sat.direct]}" 'BEGIN { printf "added p99 over direct (saturation): %.3f ms\n", g-d }'
