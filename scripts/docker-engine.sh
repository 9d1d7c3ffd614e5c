#!/usr/bin/env bash
# Start or stop a private Docker engine under DIR, with the only flags allowed on these machines
# (DESIGN.md §5): no bridge, no iptables/ip6tables rules, no forwarding or masquerading, state and
# socket under DIR. Nothing is ever pulled; tests build their images offline.
#
#   scripts/docker-engine.sh start DIR   # prints nothing; DOCKER_HOST=unix://DIR/docker.sock
#   scripts/docker-engine.sh stop DIR    # kills the daemon by its PID and waits for it
#
# START_TIMEOUT (seconds, default 30) bounds the wait for the daemon to answer.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
(($# == 2)) || usage
action=$1
dir=$2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
sock="$dir/docker.sock"
pidfile="$dir/pid"
log="$dir/dockerd.log"

running_pid() {
    # The PID from the pidfile, only if that process is alive and is a dockerd.
    [[ -s $pidfile ]] || return 1
    local pid
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == dockerd ]] || return 1
    echo "$pid"
}

answers() {
    docker -H "unix://$sock" info >/dev/null 2>&1
}

start() {
    command -v dockerd >/dev/null || {
        echo "dockerd is not installed (apt-get install -y docker.io)" >&2
        exit 1
    }
    if running_pid >/dev/null && answers; then
        return 0
    fi
    mkdir -p "$dir/data" "$dir/exec"
    # setsid: the daemon outlives this script and is not hit by the caller's job-control signals.
    setsid dockerd \
        --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
        --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$pidfile" \
        -H "unix://$sock" >"$log" 2>&1 </dev/null &
    local launched=$! deadline=$((SECONDS + ${START_TIMEOUT:-30}))
    until answers; do
        if ! kill -0 "$launched" 2>/dev/null; then
            echo "dockerd exited during start-up; last lines of $log:" >&2
            tail -n 20 "$log" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "dockerd did not answer on $sock within ${START_TIMEOUT:-30}s; see $log" >&2
            kill "$launched" 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
}

stop() {
    local pid
    pid=$(running_pid) || return 0
    kill "$pid"
    # dockerd stops its containers first (up to their stop timeouts), so allow some time.
    for _ in $(seq 1 150); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    echo "dockerd ($pid) did not stop within 30s; sending SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
}

case $action in
start) start ;;
stop) stop ;;
*) usage ;;
esac
