#!/usr/bin/env bash
# Creates .venv beside the sources (once) and installs wsgate into it, editable,
# with the extras named in WSGATE_EXTRAS. The other scripts source it; it also runs
# on its own (./scripts/bootstrap.sh) to prepare the environment.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${WSGATE_EXTRAS:+[$WSGATE_EXTRAS]}"
