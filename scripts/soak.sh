#!/usr/bin/env bash
# Installs wsgate with the bench extra into .venv, then runs the abuse soak: one
# wsgate process, good clients echoing throughout, attack phases one after another
# (arguments are passed on: --good, --scale, --phases, --handshake-timeout, --out). About 70 s.
WSGATE_EXTRAS=bench source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/python -m bench.soak "$@"
