# Sourced by bench.sh and callgrind.sh, after they set ROOT, WORK and the
# PIDS array (their cleanup kills what is in it): the release binaries,
# free ports, readiness waits, and the registry with three upstream
# instances that both scripts measure the gateway in front of.

SCRIPT=${0##*/}

# Builds `muster` and the upstream example unless NO_BUILD is set; sets
# MUSTER and UPSTREAM to their paths.
build_binaries() {
    if [[ -z "${NO_BUILD:-}" ]]; then
        (cd "$ROOT" && cargo build --release -q -p muster-cli --bin muster)
        (cd "$ROOT" && cargo build --release -q -p muster-gateway --example upstream)
    fi
    MUSTER="$ROOT/target/release/muster"
    UPSTREAM="$ROOT/target/release/examples/upstream"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_http URL WHAT [curl args...]: until URL answers 2xx (up to 60 s:
# a gateway under valgrind starts slowly).
wait_http() {
    local url=$1 what=$2
    shift 2
    for _ in $(seq 1 600); do
        curl -fsS -o /dev/null "$@" "$url" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$SCRIPT: $what did not come up ($url)" >&2
    exit 1
}

# Starts etcd (its client port in EP) and three upstream instances of
# service `bench` registered in it (their addresses in ADDRS).
start_registry_and_upstreams() {
    EP=$(free_port)
    local pp
    pp=$(free_port)
    etcd --name bench --data-dir "$WORK/etcd" \
        --listen-client-urls "http://127.0.0.1:$EP" --advertise-client-urls "http://127.0.0.1:$EP" \
        --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
        --initial-cluster "bench=http://127.0.0.1:$pp" >"$WORK/etcd.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$EP/health" etcd
    ADDRS=()
    local i addr
    for i in 1 2 3; do
        "$UPSTREAM" --service bench --id "u-$i" --endpoints "http://127.0.0.1:$EP" >"$WORK/u$i.out" 2>"$WORK/u$i.err" &
        PIDS+=($!)
        for _ in $(seq 1 200); do grep -q listening "$WORK/u$i.out" 2>/dev/null && break; sleep 0.05; done
        addr=$(sed -n 's|^listening on http://||p' "$WORK/u$i.out")
        [[ -n "$addr" ]] || { echo "$SCRIPT: upstream $i did not start" >&2; cat "$WORK/u$i.err" >&2; exit 1; }
        ADDRS+=("$addr")
    done
}
