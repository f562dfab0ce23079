# Sourced by the bench scripts (which define `die`, `log`, ROOT and WORK).

# find_muster: MUSTER, or target/release/muster built first (unless
# SKIP_BUILD is set); dies if it is not there.
find_muster() {
    if [[ -z ${MUSTER:-} ]]; then
        MUSTER=$ROOT/target/release/muster
        if [[ -z ${SKIP_BUILD:-} ]]; then
            log "building muster (release)"
            (cd "$ROOT" && cargo build --release -p muster-cli) >&2
        fi
    fi
    [[ -x $MUSTER ]] || die "$MUSTER is missing; build it with: cargo build --release -p muster-cli"
}

# free_port prints a loopback TCP port that nothing listens on and that
# this script has not handed out yet (calls `die` when none is found in
# 200 tries).
USED_PORTS=" "
free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        [[ $USED_PORTS == *" $port "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            USED_PORTS+="$port "
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

# remove_work NAME: removes WORK, or with KEEP set, says where it is kept.
remove_work() {
    if [[ -z ${KEEP:-} ]]; then
        rm -rf "$WORK"
    else
        echo "$1: data, logs and reports kept in $WORK" >&2
    fi
}
