#!/usr/bin/env bash
# Gateway benchmark: wrk over loopback against
#   direct   one upstream instance, no proxy;
#   gateway  `muster gateway` (release) routing / to three upstream instances;
#   nginx    nginx with the same three instances as an upstream block
#            (keepalive to the upstreams, access log off);
# in the same run, in rounds alternating the targets (in reverse order every
# other round), so the figures share the machine's state; the saturation
# ratio is given per round too. The upstreams are crates/gateway/examples/upstream.rs
# (hyper, answers "ok"), registered in a real etcd. Both proxies run one
# worker per core (the gateway's default --workers, nginx's
# worker_processes auto).
#
# Two loads:
#   saturation  $CONNS (64) connections, $THREADS wrk threads, $DURATION each:
#               requests/s and latency percentiles at full load;
#   light       $LIGHT_CONNS (4) connections, 1 wrk thread: the latency a
#               request pays when nothing queues (the added-p99 figure).
#
# TLS=1: both proxies terminate TLS on the same certificate (ECDSA P-256,
# from `muster certs`: gateway --tls-cert/--tls-key, nginx `listen ...
# ssl http2`), wrk over HTTPS, no direct target (the
# upstreams stay plaintext), and instead of the light load:
#   handshake   $CLOSE_CONNS (16) connections sending `Connection: close`:
#               a full TLS handshake for every request.
#
# Usage: crates/gateway/scripts/bench.sh        (env: DURATION ROUNDS CONNS THREADS LIGHT_CONNS CLOSE_CONNS TLS NO_BUILD)
# Needs: wrk, nginx (with ssl for TLS=1), etcd, curl (apt-get install -y wrk nginx-light etcd-server curl).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
LIGHT_CONNS=${LIGHT_CONNS:-4}
CLOSE_CONNS=${CLOSE_CONNS:-16}
TLS=${TLS:-}
cd "$ROOT"

for tool in wrk nginx etcd curl; do
    command -v "$tool" >/dev/null || { echo "bench.sh: $tool is missing (apt-get install -y wrk nginx-light etcd-server curl)" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/muster-gw-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [[ -f "$WORK/nginx.pid" ]] && kill "$(cat "$WORK/nginx.pid" 2>/dev/null)" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
build_binaries

# --- TLS (TLS=1) ------------------------------------------------------------
SCHEME=http
CURL_TLS=()
GATEWAY_TLS=()
NGINX_LISTEN=""
if [[ -n "$TLS" ]]; then
    "$MUSTER" certs --dir "$WORK/tls" >/dev/null
    CA="$WORK/tls/ca.pem"; CERT="$WORK/tls/server.pem"; KEY="$WORK/tls/server-key.pem"
    SCHEME=https
    CURL_TLS=(--cacert "$CA")
    GATEWAY_TLS=(--tls-cert "$CERT" --tls-key "$KEY")
    # h2 offered by ALPN like the gateway (wrk speaks HTTP/1.1 either way).
    NGINX_LISTEN="ssl http2;
        ssl_certificate $CERT;
        ssl_certificate_key $KEY;
        ssl_protocols TLSv1.2 TLSv1.3"
fi

# --- registry and three upstreams -------------------------------------------
start_registry_and_upstreams

# --- muster gateway -----------------------------------------------------------
GP=$(free_port)
RUST_LOG=warn "$MUSTER" gateway --endpoints "127.0.0.1:$EP" --listen "127.0.0.1:$GP" --route /=bench \
    "${GATEWAY_TLS[@]}" >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_http "$SCHEME://127.0.0.1:$GP/healthz" "muster gateway" "${CURL_TLS[@]}"
wait_http "$SCHEME://127.0.0.1:$GP/" "muster gateway's route" "${CURL_TLS[@]}"

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
        listen 127.0.0.1:$NP $NGINX_LISTEN;
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
wait_http "$SCHEME://127.0.0.1:$NP/" nginx "${CURL_TLS[@]}"

declare -A URL=(
    [direct]="http://${ADDRS[0]}/"
    [gateway]="$SCHEME://127.0.0.1:$GP/"
    [nginx]="$SCHEME://127.0.0.1:$NP/"
)
TARGETS=(direct gateway nginx)
LOADS=(sat light)
if [[ -n "$TLS" ]]; then
    TARGETS=(gateway nginx)
    LOADS=(sat close)
fi

# wrk's latency figures in ms.
to_ms() { awk '{ v=$1; if (v ~ /us$/) { sub(/us$/,"",v); v=v/1000 } else if (v ~ /ms$/) { sub(/ms$/,"",v) } else if (v ~ /s$/) { sub(/s$/,"",v); v=v*1000 } printf "%.3f", v }'; }
pct() { grep -E "^ +$1%" "$2" | awk '{print $2}' | to_ms; }
rps() { awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$1"; }
errors() { awk '/Non-2xx|Socket errors/ {print}' "$1" | tr '\n' ' '; }

echo "# machine: $(nproc) cores, $(uptime | sed 's/.*load average/load average/')"
if [[ -n "$TLS" ]]; then
    echo "# wrk over HTTPS: ${CONNS}c/${THREADS}t (saturation, keep-alive) and ${CLOSE_CONNS}c/${THREADS}t Connection: close, ${DURATION} each, ${ROUNDS} rounds"
    for t in "${TARGETS[@]}"; do
        # What wrk's OpenSSL negotiates (curl uses the same library).
        curl -sS -o /dev/null "${CURL_TLS[@]}" --http1.1 -v "${URL[$t]}" 2>&1 |
            sed -n "s|^\* SSL connection using \(.*\)|# $t: \1|p"
    done
else
    echo "# wrk ${CONNS}c/${THREADS}t for ${DURATION} (saturation) and ${LIGHT_CONNS}c/1t (light), ${ROUNDS} rounds"
fi
for t in "${TARGETS[@]}"; do wrk -t1 -c8 -d2s "${URL[$t]}" >/dev/null; done # warm up

for round in $(seq 1 "$ROUNDS"); do
    # Every other round runs the targets in reverse order, so neither
    # proxy always follows the same one (the machine's state after a run,
    # the upstreams' warm connections, go to each in turn).
    order=("${TARGETS[@]}")
    if (( round % 2 == 0 )); then
        order=()
        for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do order+=("${TARGETS[$i]}"); done
    fi
    for t in "${order[@]}"; do
        wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "${URL[$t]}" >"$WORK/sat.$t.$round" 2>&1
        if [[ -n "$TLS" ]]; then
            wrk -t"$THREADS" -c"$CLOSE_CONNS" -d"$DURATION" --latency -H "Connection: close" "${URL[$t]}" \
                >"$WORK/close.$t.$round" 2>&1
        else
            wrk -t1 -c"$LIGHT_CONNS" -d"$DURATION" --latency "${URL[$t]}" >"$WORK/light.$t.$round" 2>&1
        fi
    done
done

printf '\n| load | target | round | req/s | p50 ms | p90 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|---|\n'
for load in "${LOADS[@]}"; do
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
for load in "${LOADS[@]}"; do
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
printf 'gateway/nginx throughput (saturation) by round:'
for round in $(seq 1 "$ROUNDS"); do
    awk -v g="$(rps "$WORK/sat.gateway.$round")" -v n="$(rps "$WORK/sat.nginx.$round")" 'BEGIN { printf " %.2fx", (n > 0 ? g / n : 0) }'
done
echo
if [[ -n "$TLS" ]]; then
    awk -v g="${MRPS[close.gateway]}" -v n="${MRPS[close.nginx]}" 'BEGIN { printf "gateway/nginx throughput (a TLS handshake per request): %.2fx\n", g/n }'
    exit 0
fi
awk -v g="${MP99[light.gateway]}" -v d="${MP99[light.direct]}" 'BEGIN { printf "added p99 over direct (light load): %.3f ms (target <= 1 ms)\n", g-d }'
awk -v g="${MP99[sat.gateway]}" -v d="${MP99[sat.direct]}" 'BEGIN { printf "added p99 over direct (saturation): %.3f ms\n", g-d }'
