"""Benchmarks of wsgate, run from the repository root.

`python -m bench` (or `./scripts/bench.sh`) measures wsgate against nginx,
HAProxy, Caddy, a hand-written aiohttp proxy and direct connections, and
wsgate over TLS (nginx over TLS on request); its modules are __main__,
scenarios, loadgen, echo_backend, naive_proxy, targets, procstat, report and
wire.
"""
