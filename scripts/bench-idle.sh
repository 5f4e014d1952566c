#!/usr/bin/env bash
# Installs wsgate with the bench extra into .venv, then holds many idle
# connections through one wsgate process with heartbeats on and reports its
# memory and CPU (arguments are passed on: --conns, --heartbeat, --window).
# 100,000 connections need `ulimit -n 200500` or more in this shell.
WSGATE_EXTRAS=bench source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m bench.idle "$@"
