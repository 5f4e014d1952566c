"""`python -m bench`: runs the scenarios through every target, interleaved and repeated, and reports.

Exit status: 0 when every selected target ran every selected scenario (n/a
counts as ran), 1 when a run failed or the benchmark was interrupted, 2 for
bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from . import report
from .loadgen import LoadGen, WorkerTimeout, worker_count
from .scenarios import (
    DEFAULT_TIMING,
    QUICK_TIMING,
    SCENARIOS,
    CheckFailed,
    Context,
    NotApplicable,
    Scenario,
    run,
)
from .targets import ALL_TARGETS, DEFAULT_TARGETS, REPO, Backend, StartError, Target, make_test_certs
from .wire import raise_nofile


def _names(text: str, known: list[str], what: str) -> list[str]:
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"bench: unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return [n for n in known if n in chosen]  # canonical order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 repetition, short windows, 1,000 idle connections")
    parser.add_argument("--reps", type=int, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (default %(default)s)")
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS),
                        help=f"comma-separated subset of {','.join(s.name for s in SCENARIOS)}")
    parser.add_argument("--procs", type=int, default=worker_count(),
                        help="load generator processes (default %(default)s)")
    parser.add_argument("--warmup", type=float, help="seconds of load before each measured window")
    parser.add_argument("--window", type=float, help="seconds measured per throughput run")
    parser.add_argument("--latency-window", type=float, help="seconds measured per latency run")
    parser.add_argument("--idle-conns", type=int, help="idle connections for idle_rss (default 10,000)")
    parser.add_argument("--out", type=Path, default=REPO / "results", help="results folder (default %(default)s)")
    args = parser.parse_args(argv)
    args.target_names = _names(args.targets, list(ALL_TARGETS), "target")
    args.scenario_names = _names(args.scenarios, [s.name for s in SCENARIOS], "scenario")
    if args.reps is not None and not 1 <= args.reps <= 100:
        parser.error("--reps must be between 1 and 100")
    if not 1 <= args.procs <= 64:
        parser.error("--procs must be between 1 and 64")
    return args


def _sources() -> tuple[str, ...]:
    """Client source addresses 127.0.0.1-8 where the system lets us bind them (Linux does)."""
    usable = []
    for i in range(1, 9):
        address = f"127.0.0.{i}"
        try:
            with socket.socket() as sock:
                sock.bind((address, 0))
            usable.append(address)
        except OSError:
            pass
    return tuple(usable) or ("127.0.0.1",)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same cleanup as Ctrl-C


def _describe(scenario: Scenario, sample: dict[str, Any]) -> str:
    parts = []
    for metric in scenario.metrics:
        if isinstance(sample.get(metric.key), (int, float)):
            parts.append(f"{metric.fmt.format(sample[metric.key])} {metric.label}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timing = QUICK_TIMING if args.quick else DEFAULT_TIMING
    overrides = {"warmup": args.warmup, "window": args.window,
                 "latency_window": args.latency_window, "idle_conns": args.idle_conns}
    timing = dataclasses.replace(timing, **{k: v for k, v in overrides.items() if v is not None})
    reps = args.reps or (1 if args.quick else 3)
    scenarios = [s for s in SCENARIOS if s.name in args.scenario_names]
    signal.signal(signal.SIGTERM, _on_sigterm)

    fd_limit = raise_nofile()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out / stamp
    workdir = Path(tempfile.mkdtemp(prefix="wsgate-bench-"))
    # Fork the generator processes first, while this process holds nothing else.
    pool = LoadGen(args.procs)
    pool.start()
    backend = Backend(fd_limit)
    targets: list[Target] = [ALL_TARGETS[name](fd_limit) for name in args.target_names]
    runs: report.Runs = {}
    # Targets that will not run: a missing program is n/a, a start failure is a failure.
    unavailable: dict[str, dict[str, Any]] = {}
    ctx = Context(pool=pool, backend=backend, timing=timing, sources=_sources(),
                  procs=args.procs, fd_limit=fd_limit)
    interrupted = False
    info: dict[str, Any] = {}
    started = time.monotonic()
    try:
        try:
            backend.launch(0, workdir)
        except StartError as exc:
            print(f"bench: the echo backend did not start: {exc}\n{exc.log}", file=sys.stderr)
            return 1
        missing = {target.name: target.missing() for target in targets}
        if any(target.tls and missing[target.name] is None for target in targets):
            # One certificate for every TLS target, made now (the clients get the CA in their jobs).
            certs = make_test_certs(workdir)
            for target in targets:
                target.certs = certs if target.tls else None
        for target in targets:
            reason = missing[target.name]
            if reason is not None:
                unavailable[target.name] = {"na": reason}
                print(f"bench: {target.name} is n/a: {reason}", file=sys.stderr)
                continue
            try:
                target.launch(backend.port, workdir)
            except StartError as exc:
                unavailable[target.name] = {"ok": False, "error": f"did not start: {exc}"}
                print(f"bench: {target.name} did not start: {exc}\n{exc.log}", file=sys.stderr)
        info = report.machine_info(targets, fd_limit, args.procs)
        print("machine:")
        for key, value in info.items():
            if key != "versions":
                print(f"  {key}: {value}")
        for name, text in info["versions"].items():
            print(f"  {name}: {text}")
        idle = min(timing.idle_conns, (fd_limit - 300) // 2)
        if "idle_rss" in args.scenario_names and idle < timing.idle_conns:
            ctx.notes.append(f"idle_rss: {idle:,} connections instead of {timing.idle_conns:,}: "
                             f"RLIMIT_NOFILE is {fd_limit} and a proxy needs two descriptors per connection")
            print(f"bench: {ctx.notes[-1]}", file=sys.stderr)
        print(f"bench: {reps} repetition(s) of {len(scenarios)} scenario(s) through {len(targets)} target(s); "
              f"results in {out}", flush=True)

        for rep in range(reps):
            # Rotate the order each repetition so no target always runs first.
            order = targets[rep % len(targets):] + targets[: rep % len(targets)]
            for scenario in scenarios:
                for target in order:
                    records = runs.setdefault(scenario.name, {}).setdefault(target.name, [])
                    if target.name in unavailable:
                        records.append({"rep": rep, **unavailable[target.name]})
                        continue
                    try:
                        sample = run(ctx, scenario, target)
                    except NotApplicable as exc:
                        records.append({"rep": rep, "na": str(exc)})
                        continue
                    except (CheckFailed, StartError, RuntimeError, WorkerTimeout, OSError) as exc:
                        records.append({"rep": rep, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
                        print(f"[{rep + 1}/{reps}] {scenario.name:16} {target.name:14} FAILED: {exc}", flush=True)
                        continue
                    records.append({"rep": rep, "ok": True, **sample})
                    flag = "  (!) " + "; ".join(sample["warnings"]) if sample["warnings"] else ""
                    print(f"[{rep + 1}/{reps}] {scenario.name:16} {target.name:14} {_describe(scenario, sample)}{flag}",
                          flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
    finally:
        for target in targets:
            target.stop()
        backend.stop()
        pool.close()
        out.mkdir(parents=True, exist_ok=True)
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        for log in workdir.glob("*.log"):
            shutil.copy(log, logs / log.name)
        for config in ("wsgate.yaml", "wsgate-tls.yaml", "wsgate-h11.yaml", "haproxy.cfg", "Caddyfile",
                       "nginx/nginx.conf", "nginx/error.log", "nginx-tls/nginx.conf", "nginx-tls/error.log"):
            if (workdir / config).exists():
                shutil.copy(workdir / config, logs / config.replace("/", "-"))
        shutil.rmtree(workdir, ignore_errors=True)

    if not runs:
        return 1
    settings = {"reps": reps, "quick": args.quick, "timing": dataclasses.asdict(timing),
                "scenarios": {s.name: s.summary for s in scenarios}, "targets": args.target_names,
                "sources": ctx.sources, "notes": ctx.notes, "interrupted": interrupted,
                "elapsed_s": round(time.monotonic() - started, 1)}
    table = report.markdown(runs, args.target_names, scenarios)
    lines = report.problems(runs) + ctx.notes
    (out / "results.md").write_text(
        f"# wsgate benchmark {stamp}\n\n{table}\n\n" + "".join(f"- {line}\n" for line in lines))
    report.write_json(out / "results.json", info, settings, runs)
    caption = (f"median of {reps} run(s), bars show min-max; {info.get('nproc')} CPUs, {info.get('cpu_model')}, "
               f"{info.get('kernel')}; {stamp}")
    written = report.charts(out, runs, args.target_names, caption)
    latest = args.out / "latest"
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(out, latest)

    print()
    print(table)
    if lines:
        print()
        print("\n".join(lines))
    print(f"\nbench: {settings['elapsed_s']:.0f}s; wrote results.md, results.json"
          f"{', ' + ', '.join(written) if written else ''} to {out} (copied to {latest})")
    failed = any(r.get("ok") is False for by_t in runs.values() for recs in by_t.values() for r in recs)
    return 1 if failed or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
