#!/usr/bin/env bash
# Gateway TLS benchmark: wrk over HTTPS on loopback against
#   gateway  `muster gateway` (release) terminating TLS (--tls-cert/--tls-key)
#            and routing / to three plaintext upstream instances;
#   nginx    nginx terminating TLS (`listen ... ssl`) on the same certificate,
#            with the same three instances as an upstream block (keepalive
#            to the upstreams, access log off);
# in the same run, in rounds alternating the targets, as bench.sh does. The
# certificate (ECDSA P-256, signed by a throwaway CA) is written by
# `muster certs`; the upstreams are
# crates/gateway/examples/upstream.rs, registered in a real etcd. Both
# servers negotiate the same TLS 1.3 suite with wrk (printed below).
#
# Two loads:
#   keep-alive  $CONNS (64) connections, $THREADS wrk threads, $DURATION each:
#               requests/s and latency on established TLS connections (the
#               cost of encrypting, decrypting and proxying);
#   handshake   $CLOSE_CONNS (16) connections sending `Connection: close`:
#               a full TLS handshake for every request.
#
# Usage: crates/gateway/scripts/bench-tls.sh    (env: DURATION ROUNDS CONNS THREADS CLOSE_CONNS NO_BUILD)
# Needs: wrk, nginx (with ssl), etcd, curl (apt-get install -y wrk nginx-light etcd-server curl).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
CLOSE_CONNS=${CLOSE_CONNS:-16}
cd "$ROOT"

for tool in wrk nginx etcd curl; do
    command -v "$tool" >/dev/null || { echo "bench-tls.sh: $tool is missing (apt-get install -y wrk nginx-light etcd-server curl)" >&2; exit 1; }
done

if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release -q -p muster-cli --bin muster
    cargo build --release -q -p muster-gateway --example upstream
fi
MUSTER="$ROOT/target/release/muster"
UPSTREAM="$ROOT/target/release/examples/upstream"

WORK=$(mktemp -d /tmp/muster-gw-tls-bench.XXXXXX)
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

wait_http() { # url what [curl args...]
    local url=$1 what=$2
    shift 2
    for _ in $(seq 1 200); do
        curl -fsS -o /dev/null "$@" "$url" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "bench-tls.sh: $what did not come up ($url)" >&2
    exit 1
}

# --- certificate --------------------------------------------------------------
"$MUSTER" certs --dir "$WORK/tls" >/dev/null
CA="$WORK/tls/ca.pem"; CERT="$WORK/tls/server.pem"; KEY="$WORK/tls/server-key.pem"

# --- registry -----------------------------------------------------------------
EP=$(free_port); PP=$(free_port)
etcd --name bench --data-dir "$WORK/etcd" \
    --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
    --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
    --initial-cluster "bench=http://127.0.0.1:$PP" >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$EP/health" etcd

# --- three upstreams ------------------------------------------------------------
ADDRS=()
for i in 1 2 3; do
    "$UPSTREAM" --service bench --id "u-$i" --endpoints "http://127.0.0.1:$EP" >"$WORK/u$i.out" 2>"$WORK/u$i.err" &
    PIDS+=($!)
    for _ in $(seq 1 200); do grep -q listening "$WORK/u$i.out" 2>/dev/null && break; sleep 0.05; done
    addr=$(sed -n 's|^listening on http://||p' "$WORK/u$i.out")
    [[ -n "$addr" ]] || { echo "bench-tls.sh: upstream $i did not start" >&2; cat "$WORK/u$i.err" >&2; exit 1; }
    ADDRS+=("$addr")
done

# --- muster gateway with TLS ------------------------------------------------------
GP=$(free_port); GA=$(free_port)
RUST_LOG=warn "$MUSTER" gateway --endpoints "127.0.0.1:$EP" --listen "127.0.0.1:$GP" --route /=bench \
    --tls-cert "$CERT" --tls-key "$KEY" --admin-listen "127.0.0.1:$GA" \
    >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$GA/healthz" "muster gateway (admin)"
wait_http "https://127.0.0.1:$GP/" "muster gateway" --cacert "$CA"

# --- nginx with ssl ---------------------------------------------------------------
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
        # h2 offered by ALPN like the gateway (wrk speaks HTTP/1.1 either way).
        listen 127.0.0.1:$NP ssl http2;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.2 TLSv1.3;
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
wait_http "https://127.0.0.1:$NP/" nginx --cacert "$CA"

declare -A URL=(
    [gateway]="https://127.0.0.1:$GP/"
    [nginx]="https://127.0.0.1:$NP/"
)
TARGETS=(gateway nginx)

# wrk's latency figures in ms.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v=v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v=v*1000 } printf "%.3f", v }'; }
pct() { grep -E "^ +$1%" "$2" | awk '{print $2}' | to_ms; }
rps() { awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$1"; }
errors() { awk '/Non-2xx|Socket errors/ {print}' "$1" | tr '\n' ' '; }

echo "# machine: $(nproc) cores, $(uptime | sed 's/.*load average/load average/')"
echo "# wrk over HTTPS: ${CONNS}c/${THREADS}t keep-alive and ${CLOSE_CONNS}c/${THREADS}t Connection: close, ${DURATION} each, ${ROUNDS} rounds"
for t in "${TARGETS[@]}"; do
    # What wrk's OpenSSL negotiates (curl uses the same library).
    curl -sS -o /dev/null --cacert "$CA" --http1.1 -v "${URL[$t]}" 2>&1 |
        sed -n "s|^\* SSL connection using \(.*\)|# $t: \1|p"
done
for t in "${TARGETS[@]}"; do wrk -t1 -c8 -d2s "${URL[$t]}" >/dev/null; done # warm up

for round in $(seq 1 "$ROUNDS"); do
    for t in "${TARGETS[@]}"; do
        wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "${URL[$t]}" >"$WORK/keep.$t.$round" 2>&1
        wrk -t"$THREADS" -c"$CLOSE_CONNS" -d"$DURATION" --latency -H "Connection: close" "${URL[$t]}" \
            >"$WORK/close.$t.$round" 2>&1
    done
done

printf '\n| load | target | round | req/s | p50 ms | p90 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|---|\n'
for load in keep close; do
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
declare -A MRPS
for load in keep close; do
    for t in "${TARGETS[@]}"; do
        r=$(for round in $(seq 1 "$ROUNDS"); do rps "$WORK/$load.$t.$round"; echo; done | median)
        p50=$(for round in $(seq 1 "$ROUNDS"); do pct 50 "$WORK/$load.$t.$round"; echo; done | median)
        p99=$(for round in $(seq 1 "$ROUNDS"); do pct 99 "$WORK/$load.$t.$round"; echo; done | median)
        MRPS[$load.$t]=$r
        printf '| %s | %s | %s | %s | %s |\n' "$load" "$t" "$r" "$p50" "$p99"
    done
done
echo
awk -v g="${MRPS[keep.gateway]}" -v n="${MRPS[keep.nginx]}" 'BEGIN { printf "gateway/nginx over HTTPS, keep-alive: %.2fx\n", g/n }'
awk -v g="${MRPS[close.gateway]}" -v n="${MRPS[close.nginx]}" 'BEGIN { printf "gateway/nginx over HTTPS, a handshake per request: %.2fx\n", g/n }'
