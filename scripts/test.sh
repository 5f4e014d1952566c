#!/usr/bin/env bash
# Installs wsgate and its test tools into .venv, Node's ws into tests/node,
# then runs the whole test suite (arguments are passed on to pytest).
# Under CI the property tests run deeper.
WSGATE_EXTRAS=test source "$(dirname "$0")/bootstrap.sh"
if ! command -v npm >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
npm ci --prefix tests/node --no-audit --no-fund --silent
[ -x /usr/sbin/dnsmasq ] || command -v dnsmasq >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsmasq-base >/dev/null; }
# promtool checks deploy/prometheus/alerts.yml; Debian ships it in the prometheus package.
command -v promtool >/dev/null || { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
# The browser tests drive Debian's headless Chromium through its chromedriver (tests/test_browser.py).
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
# tests/test_image.py builds the Dockerfile with podman (runc as its runtime) on a debootstrapped base.
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || { apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc debootstrap >/dev/null; break; }
done
command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
if [ -n "${CI:-}" ]; then
    export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
fi
exec .venv/bin/python -m pytest "$@"
