"""Medians, the Markdown table, the JSON file and the charts."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .scenarios import BY_NAME, Metric, Scenario
from .targets import PEERS, Target

# runs[scenario][target] is a list with one record per repetition:
# {"rep": r, "ok": True, <metrics>...}, {"rep": r, "ok": False, "error": why} or {"rep": r, "na": why}.
Runs = dict[str, dict[str, list[dict[str, Any]]]]
Stat = tuple[float, float, float]  # median, min, max
# Extra ratio columns, numerator ÷ denominator, shown when both targets were selected:
# each proxy over TLS against itself over plain TCP, then wsgate against nginx, both over TLS.
TLS_RATIOS = (("wsgate-tls", "wsgate"), ("nginx-tls", "nginx"), ("wsgate-tls", "nginx-tls"))


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info(targets: list[Target], fd_limit: int, procs: int) -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass

    def sysctl(name: str) -> str:
        try:
            return Path("/proc/sys/" + name.replace(".", "/")).read_text().strip()
        except OSError:
            return "?"

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "uvloop": _package("uvloop"),
        "aiohttp": _package("aiohttp"),
        "loadavg_at_start": os.getloadavg(),
        "rlimit_nofile": fd_limit,
        "generator_processes": procs,
        "ip_local_port_range": sysctl("net.ipv4.ip_local_port_range"),
        "tcp_tw_reuse": sysctl("net.ipv4.tcp_tw_reuse"),
        "versions": {t.name: t.version() for t in targets},
    }


def stats(runs: Runs) -> dict[str, dict[str, dict[str, Stat]]]:
    """Median, min and max over the repetitions, per scenario, target and metric."""
    out: dict[str, dict[str, dict[str, Stat]]] = {}
    for scenario, by_target in runs.items():
        for target, records in by_target.items():
            good = [r for r in records if r.get("ok")]
            for metric in BY_NAME[scenario].metrics:
                values = [r[metric.key] for r in good if isinstance(r.get(metric.key), (int, float))]
                if values:
                    out.setdefault(scenario, {}).setdefault(target, {})[metric.key] = (
                        statistics.median(values), min(values), max(values))
        # Latency added by a proxy: its median minus the median of direct connections.
        if scenario == "latency" and "direct" in out.get(scenario, {}):
            direct = out[scenario]["direct"]
            for target, metrics in out[scenario].items():
                for key in ("p50", "p99"):
                    if target != "direct" and f"{key}_us" in metrics and f"{key}_us" in direct:
                        value = metrics[f"{key}_us"][0] - direct[f"{key}_us"][0]
                        metrics[f"added_{key}_us"] = (value, value, value)
    return out


def _cell(runs: Runs, medians: dict[str, Any], scenario: str, target: str, metric: Metric) -> str:
    records = runs.get(scenario, {}).get(target, [])
    if target == "direct" and metric.proxy_only:
        return "n/a"
    if any("na" in r for r in records):
        return "n/a"
    value = medians.get(scenario, {}).get(target, {}).get(metric.key)
    if value is not None:
        return metric.fmt.format(value[0])
    if any(r.get("ok") is False for r in records):
        return "failed"
    return "–"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b) or a * b < 0:
        return "–"
    return f"{a / b:.2f}"


def markdown(runs: Runs, target_names: list[str], scenarios: list[Scenario]) -> str:
    medians = stats(runs)
    tls_ratios = [(a, b) for a, b in TLS_RATIOS if a in target_names and b in target_names]
    head = ["scenario", "metric", *target_names, "wsgate/nginx", "wsgate/best peer", "wsgate/direct",
            *(f"{a}/{b}" for a, b in tls_ratios)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for scenario in scenarios:
        for metric in scenario.metrics:
            by_target = medians.get(scenario.name, {})

            def value(name: str, key: str = metric.key, by_target: dict[str, Any] = by_target) -> float | None:
                stat = by_target.get(name, {}).get(key)
                return stat[0] if stat else None

            arrow = "↑" if metric.higher_is_better else "↓"
            cells = [_cell(runs, medians, scenario.name, t, metric) for t in target_names]
            peers = [(v, p) for p in PEERS if (v := value(p)) is not None]
            best = ""
            if peers:
                chosen = (max if metric.higher_is_better else min)(peers)
                ratio = _ratio(value("wsgate"), chosen[0])
                best = f"{ratio} ({chosen[1]})" if ratio != "–" else "–"
            versus_direct = "–" if metric.proxy_only else _ratio(value("wsgate"), value("direct"))
            row = [scenario.name, f"{metric.label} {arrow}", *cells,
                   _ratio(value("wsgate"), value("nginx")), best or "–", versus_direct,
                   *(_ratio(value(a), value(b)) for a, b in tls_ratios)]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Cells are medians over the repetitions. Ratios are wsgate ÷ the other: for ↑ metrics "
                 "above 1 favours wsgate, for ↓ metrics below 1 does. Best peer is the best of "
                 + ", ".join(PEERS) + ". GB/s = 10^9 bytes of message payload received by the clients "
                 "per second (for echoes: the echoed messages only, one direction). Latency added over direct "
                 "is the target's median minus direct's; within the noise it can come out negative.")
    if any(name.endswith("-tls") for name in target_names):
        lines.append("")
        lines.append("The -tls targets terminate TLS from the clients (the backend leg stays plain ws://): "
                     "every connection makes a full handshake (no session resumption) with the same test "
                     "certificate, and handshakes/s and sessions/s include it. The load generator speaks TLS "
                     "too, so it shares the CPUs with the proxy and may become the limit (see the warnings).")
    if tls_ratios:
        lines.append("X-tls/X is the proxy over TLS ÷ itself over plain TCP: for ↑ metrics the share of its "
                     "plain-TCP rate it keeps, for ↓ metrics (CPU, memory) the factor TLS multiplies its cost by."
                     + (" wsgate-tls/nginx-tls reads like wsgate/nginx, both over TLS."
                        if ("wsgate-tls", "nginx-tls") in tls_ratios else ""))
    return "\n".join(lines)


def problems(runs: Runs) -> list[str]:
    """Failures and n/a reasons one per line, then warnings: one line per scenario and kind.

    A warning line lists each target's figures over its repetitions, for example
    `small_pipelined: warning: machine at N of all CPUs: wsgate 99%/95%, nginx 92%`.
    """
    lines: list[str] = []
    grouped: dict[tuple[str, str], dict[str, list[str]]] = {}
    first_detail: dict[tuple[str, str], str] = {}
    for scenario, by_target in runs.items():
        for target, records in by_target.items():
            reasons = {r["na"] for r in records if "na" in r}
            lines += [f"{scenario}/{target}: n/a: {why}" for why in sorted(reasons)]
            for r in records:
                if r.get("ok") is False:
                    lines.append(f"{scenario}/{target} rep {r['rep'] + 1}: FAILED: {r['error']}")
                for warning in r.get("warnings", []):
                    text, _, detail = warning.partition(" (")
                    kind = re.sub(r"\d[\d,.]*%?", "N", text)
                    figure = (re.findall(r"\d+%", text) or re.findall(r"\d[\d,]*", text) or ["?"])[-1]
                    grouped.setdefault((scenario, kind), {}).setdefault(target, []).append(figure)
                    if detail:
                        first_detail.setdefault((scenario, kind), detail.rstrip(")"))
    for (scenario, kind), figures_by_target in grouped.items():
        where = ", ".join(f"{target} {'/'.join(figures)}" for target, figures in figures_by_target.items())
        detail = f" (first: {first_detail[(scenario, kind)]})" if (scenario, kind) in first_detail else ""
        lines.append(f"{scenario}: warning: {kind}: {where}{detail}")
    return lines


def write_json(path: Path, info: dict[str, Any], settings: dict[str, Any], runs: Runs) -> None:
    """results.json with every sample and the medians; latency samples go to latency_samples.json."""
    samples: dict[str, Any] = {}
    slim: Runs = {}
    for scenario, by_target in runs.items():
        for target, records in by_target.items():
            kept = []
            for r in records:
                r = dict(r)
                if "latencies_us" in r:
                    samples.setdefault(target, {})[f"rep{r['rep'] + 1}"] = r.pop("latencies_us")
                kept.append(r)
            slim.setdefault(scenario, {})[target] = kept
    medians = {s: {t: {k: {"median": v[0], "min": v[1], "max": v[2]} for k, v in m.items()}
                   for t, m in by_t.items()} for s, by_t in stats(runs).items()}
    document = {"machine": info, "settings": settings, "medians": medians, "runs": slim}
    path.write_text(json.dumps(document, indent=1, default=str))
    if samples:
        (path.parent / "latency_samples.json").write_text(json.dumps(samples))


def charts(folder: Path, runs: Runs, target_names: list[str], caption: str) -> list[str]:
    """PNG charts of the medians (min-max as error bars); returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        print("matplotlib is not installed: no charts (pip install matplotlib)")
        return []
    medians = stats(runs)
    colours = {name: f"C{i}" for i, name in enumerate(target_names)}
    written = []

    def finish(fig: Any, ax: Any, name: str, title: str, ylabel: str, log: bool) -> None:
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        else:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.6g}"))
        ax.grid(axis="y", alpha=0.3)
        fig.text(0.01, 0.01, caption, fontsize="x-small", color="0.4")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(name)

    def per_target(name: str, title: str, ylabel: str, scenario: str, key: str, fmt: str) -> None:
        """One bar per target, labelled with its value."""
        found = {t: medians.get(scenario, {}).get(t, {}).get(key) for t in target_names}
        rows = [(t, stat) for t, stat in found.items() if stat is not None]
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        bars = ax.bar([t for t, _ in rows], [s[0] for _, s in rows], color=[colours[t] for t, _ in rows],
                      yerr=[[s[0] - s[1] for _, s in rows], [s[2] - s[0] for _, s in rows]], capsize=3)
        ax.bar_label(bars, labels=[fmt.format(s[0]) for _, s in rows], fontsize="small", padding=2)
        finish(fig, ax, name, title, ylabel, log=False)

    def grouped(name: str, title: str, ylabel: str, groups: list[tuple[str, str, str]], log: bool = False) -> None:
        """groups: (label, scenario, metric key); one cluster per group, one bar per target."""
        present = [g for g in groups if medians.get(g[1])]
        if not present:
            return
        fig, ax = plt.subplots(figsize=(max(7.5, 2.2 * len(present)), 4.5))
        width = 0.8 / len(target_names)
        for i, target in enumerate(target_names):
            xs: list[float] = []
            heights: list[float] = []
            errors: list[list[float]] = [[], []]
            for j, (_, scenario, key) in enumerate(present):
                stat = medians[scenario].get(target, {}).get(key)
                if stat is None:
                    continue
                xs.append(j + (i - (len(target_names) - 1) / 2) * width)
                heights.append(stat[0])
                errors[0].append(stat[0] - stat[1])
                errors[1].append(stat[2] - stat[0])
            if xs:
                ax.bar(xs, heights, width, yerr=errors, capsize=2, label=target, color=colours[target])
        ax.set_xticks(range(len(present)), [g[0] for g in present])
        ax.legend(fontsize="small")
        finish(fig, ax, name, title, ylabel, log)

    per_target("small_pipelined.png", "32 B pipelined echo, 50 connections x 16 in flight", "echoed messages/s",
               "small_pipelined", "msg_per_s", "{:,.0f}")
    grouped("throughput.png", "Large messages: payload bytes received by the clients", "GB/s",
            [(s, s, "gb_per_s") for s in ("echo_64k", "echo_1m", "push_64k", "push_1m")])
    grouped("latency.png", "32 B round trip at 2,000 msg/s", "µs (log scale)",
            [("p50", "latency", "p50_us"), ("p99", "latency", "p99_us"), ("p99.9", "latency", "p999_us")], log=True)
    grouped("connections.png", "New connections", "per second",
            [("handshakes", "handshakes", "per_s"), ("sessions", "sessions", "per_s")])
    per_target("idle_rss.png", "Proxy RSS per idle WebSocket connection", "KiB", "idle_rss", "kib_per_conn",
               "{:,.1f}")
    return written


def write_run(out: Path, kind: str, result: dict[str, Any]) -> Path:
    """`result` as `<out>/<kind>-<UTC time>.json`, for a run that has a table of its own."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
