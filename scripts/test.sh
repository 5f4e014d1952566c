#!/usr/bin/env bash
# Installs wsgate and its test tools into .venv, then runs the whole test suite
# (arguments are passed on to pytest). Under CI the property tests run deeper.
WSGATE_EXTRAS=test source "$(dirname "$0")/bootstrap.sh"
if [ -n "${CI:-}" ]; then
    export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
fi
if command -v npm >/dev/null; then npm install --prefix tests/node --no-audit --no-fund --silent; fi
exec .venv/bin/python -m pytest "$@"
