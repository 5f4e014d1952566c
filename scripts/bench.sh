#!/usr/bin/env bash
# Installs wsgate with the bench extra into .venv, installs nginx, HAProxy and
# Caddy from the system's packages when one is missing, then runs the
# benchmark (arguments are passed on: --quick, --reps N, --targets, --scenarios).
WSGATE_EXTRAS=bench source "$(dirname "$0")/bootstrap.sh"

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have nginx || ! have haproxy || ! have caddy; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bench: nginx, haproxy or caddy is missing; run as root to install them with apt-get" \
             "(the benchmark reports the missing ones as n/a)" >&2
    elif command -v apt-get >/dev/null 2>&1; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx-light haproxy caddy
    else
        echo "bench: nginx, haproxy or caddy is missing and there is no apt-get; install them by hand" >&2
    fi
fi
exec .venv/bin/python -m bench "$@"
