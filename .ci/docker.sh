#!/usr/bin/env bash
# A Docker engine for CI, from Debian's packages:
#   .ci/docker.sh start   install docker.io, docker-compose and debootstrap when missing, start
#                         dockerd in the background (log: $DOCKERD_LOG) unless an engine already
#                         answers, wait for it with a deadline, then build the local images
#                         (.ci/images/build.sh);
#   .ci/docker.sh stop    remove containers the tests left (Ryuk is off), stop the dockerd that
#                         `start` started (by its pid), if any.
# DOCKERD_FLAGS adds daemon flags (e.g. "--storage-driver=vfs" where overlayfs is unavailable).
set -euo pipefail
cd "$(dirname "$0")/.."

STATE_DIR=${DOCKER_CI_STATE_DIR:-/tmp/payment-ci-docker}
DOCKERD_LOG=${DOCKERD_LOG:-$STATE_DIR/dockerd.log}
PID_FILE=$STATE_DIR/dockerd.pid
START_TIMEOUT_SECONDS=60
STOP_TIMEOUT_SECONDS=30

log() { printf '== docker: %s\n' "$*"; }

install_packages() {
    local missing=()
    command -v dockerd > /dev/null || missing+=(docker.io)
    command -v docker-compose > /dev/null || missing+=(docker-compose)
    command -v debootstrap > /dev/null || missing+=(debootstrap)
    command -v iptables > /dev/null || missing+=(iptables)
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        > "$STATE_DIR/apt.log" 2>&1 || { tail -n 30 "$STATE_DIR/apt.log" >&2; return 1; }
}

engine_answers() { docker info > /dev/null 2>&1; }

start_engine() {
    if engine_answers; then
        log "an engine already answers; using it"
        return
    fi
    log "starting dockerd ${DOCKERD_FLAGS:-} (log: $DOCKERD_LOG)"
    # shellcheck disable=SC2086  # DOCKERD_FLAGS is a list of flags
    nohup dockerd ${DOCKERD_FLAGS:-} > "$DOCKERD_LOG" 2>&1 < /dev/null &
    local pid=$!
    echo "$pid" > "$PID_FILE"
    local deadline=$((SECONDS + START_TIMEOUT_SECONDS))
    until engine_answers; do
        if ! kill -0 "$pid" 2> /dev/null; then
            log "dockerd exited; the end of its log:"
            tail -n 40 "$DOCKERD_LOG" >&2
            rm -f "$PID_FILE"
            return 1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "dockerd did not answer within ${START_TIMEOUT_SECONDS} s; the end of its log:"
            tail -n 40 "$DOCKERD_LOG" >&2
            return 1
        fi
        sleep 0.5
    done
    log "dockerd $(docker version --format '{{.Server.Version}}') is up (pid $pid," \
        "storage $(docker info --format '{{.Driver}}'))"
}

stop_engine() {
    if engine_answers; then
        local leftovers
        leftovers=$(docker ps -aq --filter label=org.testcontainers.lang=python)
        # shellcheck disable=SC2086  # one id per word
        [ -z "$leftovers" ] || docker rm -f $leftovers > /dev/null
    fi
    [ -f "$PID_FILE" ] || return 0
    local pid
    pid=$(cat "$PID_FILE")
    rm -f "$PID_FILE"
    kill -0 "$pid" 2> /dev/null || return 0
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    local deadline=$((SECONDS + STOP_TIMEOUT_SECONDS))
    while kill -0 "$pid" 2> /dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            kill -KILL "$pid" 2> /dev/null || true
            break
        fi
        sleep 0.2
    done
}

mkdir -p "$STATE_DIR"
case "${1:-}" in
    start)
        install_packages
        start_engine
        .ci/images/build.sh
        ;;
    stop) stop_engine ;;
    *)
        echo "usage: $0 start|stop" >&2
        exit 2
        ;;
esac
