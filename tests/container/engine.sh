#!/usr/bin/env bash
# A Docker engine for the container tests (and for anyone without one running):
#   eval "$(tests/container/engine.sh start)"   # exports DOCKER_HOST: the running engine, or one started here
#                                               # (then also CONVNETS_ENGINE_STARTED=its PID: whoever sees it stops it)
#   tests/container/engine.sh stop              # stops the engine this script started (by its PID), nothing else
# Docker rather than podman: dockerd runs the images' HEALTHCHECKs itself (podman schedules them with systemd timers,
# which a machine or CI runner without systemd does not have), and the README's commands are docker's.
# The engine started here keeps its images in STATE_DIR (default /var/lib/convnets-ci), so the base image and the
# build cache survive between runs; it uses overlay2, host networking only (no iptables, no bridge) and its own
# socket, so it never touches another engine on the machine. Needs root and Debian's docker.io.
set -euo pipefail

STATE_DIR=${STATE_DIR:-/var/lib/convnets-ci}
RUN_DIR=${RUN_DIR:-/run/convnets-ci}
SOCKET=unix://$RUN_DIR/docker.sock
PIDFILE=$RUN_DIR/dockerd.pid

running() { docker ${1:+-H "$1"} info >/dev/null 2>&1; }

case ${1:-} in
  start)
    if running "${DOCKER_HOST:-}"; then
      echo "echo 'using the running Docker engine ${DOCKER_HOST:-(default socket)}' >&2"
      exit 0
    fi
    if running "$SOCKET"; then
      echo "export DOCKER_HOST=$SOCKET"
      exit 0
    fi
    command -v dockerd >/dev/null || { echo "no dockerd: apt-get install docker.io (make setup does)" >&2; exit 1; }
    [[ $(id -u) == 0 ]] || { echo "starting dockerd needs root" >&2; exit 1; }
    mkdir -p "$STATE_DIR/docker" "$RUN_DIR"
    nohup dockerd --iptables=false --ip6tables=false --bridge=none --storage-driver=overlay2 \
      --data-root "$STATE_DIR/docker" --exec-root "$RUN_DIR/exec" --pidfile "$PIDFILE" -H "$SOCKET" \
      >"$RUN_DIR/dockerd.log" 2>&1 &
    for _ in $(seq 100); do
      running "$SOCKET" && { echo "export DOCKER_HOST=$SOCKET CONVNETS_ENGINE_STARTED=$(cat "$PIDFILE")"; exit 0; }
      sleep 0.2
    done
    tail -n 20 "$RUN_DIR/dockerd.log" >&2
    exit 1
    ;;
  stop)
    [[ -f $PIDFILE ]] || exit 0
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    # dockerd stops its containers and its containerd, then removes the pidfile.
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.2; done
    echo "dockerd $pid did not stop within 30 s" >&2
    exit 1
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
