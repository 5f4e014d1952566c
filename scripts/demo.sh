#!/usr/bin/env bash
# Installs wsgate into .venv and runs `wsgate demo` (arguments are passed on).
source "$(dirname "$0")/bootstrap.sh"
exec .venv/bin/wsgate demo "$@"
