"""The files under deploy/: they parse, they validate, and what they query is what wsgate exports.

The alert rules and the dashboard are checked against a scrape of a real
`wsgate run` after traffic that gives every series they use at least one
sample. Their PromQL is read by the small reader below, which knows only what
these files need: selectors, label matchers, aggregations with `by`, and
function calls.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import gateway_config
from peers import STEP_TIMEOUT, read_response_head, upgrade_request
from test_operations import GatewayProcess, Samples, connect, echo_messages, poll

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "wsgate.json"

# Labels Prometheus adds to every series it scrapes, and the series it makes itself.
TARGET_LABELS = {"job", "instance"}
PROMETHEUS_SERIES = {"up"}


# -- a minimal PromQL reader -------------------------------------------------------------


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]  # (label, operator, value)
    position: int  # token index, to tell which aggregation it is inside


@dataclass
class Grouping:
    """`by (labels)` or `without (labels)` of one aggregation, and the selectors it aggregates."""

    labels: list[str]
    selectors: list[Selector] = field(default_factory=list)


@dataclass
class Query:
    selectors: list[Selector]
    groupings: list[Grouping]


_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<range>\[[^\]]*\])
      | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[smhdwy]?)
      | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
      | (?P<punct>[(){},])
      | (?P<operator>=~|!~|!=|==|>=|<=|[-+*/%^<>=])
    """,
    re.VERBOSE,
)
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values",
}
_GROUPING_WORDS = {"by", "without"}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "on", "ignoring", "group_left", "group_right"}


def _tokens(expression: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        assert match, f"cannot read {expression[position:]!r} in {expression!r}"
        position = match.end()
        if match.lastgroup != "space":
            tokens.append((match.lastgroup, match.group()))
    return tokens


def _closing(tokens: list[tuple[str, str]], opening: int) -> int:
    """The index of the parenthesis that closes the one at `opening`."""
    depth = 0
    for index in range(opening, len(tokens)):
        depth += {"(": 1, ")": -1}.get(tokens[index][1], 0)
        if depth == 0:
            return index
    raise AssertionError(f"unbalanced parentheses in {' '.join(t for _, t in tokens)}")


def _label_list(tokens: list[tuple[str, str]], opening: int) -> tuple[list[str], int]:
    """The names in `(a, b)` at `opening`, and the index after its `)`."""
    closing = _closing(tokens, opening)
    return [text for kind, text in tokens[opening + 1:closing] if kind == "name"], closing + 1


def read_promql(expression: str) -> Query:
    """The selectors and groupings of `expression`."""
    tokens = _tokens(expression)
    selectors: list[Selector] = []
    groupings: list[tuple[Grouping, int, int]] = []  # each with the token span it aggregates
    index = 0

    def at(i: int) -> str:
        return tokens[i][1] if i < len(tokens) else ""

    while index < len(tokens):
        kind, text = tokens[index]
        if kind != "name":
            assert text != "{", f"a selector without a metric name in {expression!r}"
            index += 1
        elif text in _GROUPING_WORDS or (text in _KEYWORDS and at(index + 1) == "("):
            _, index = _label_list(tokens, index + 1)  # on/ignoring/group_* lists: not used here
        elif text in _AGGREGATIONS:
            labels: list[str] = []
            index += 1
            if at(index) in _GROUPING_WORDS:
                labels, index = _label_list(tokens, index + 1)
            closing = _closing(tokens, index)
            if at(closing + 1) in _GROUPING_WORDS:
                labels, _ = _label_list(tokens, closing + 2)
            groupings.append((Grouping(labels), index, closing))
            index += 1
        elif text in _KEYWORDS or at(index + 1) == "(":
            index += 1  # a keyword, or a function's name
        else:
            matchers = []
            index += 1
            if at(index) == "{":
                index += 1
                while at(index) != "}":
                    label, operator, value = (t for _, t in tokens[index:index + 3])
                    assert tokens[index + 2][0] == "string", f"a matcher's value is a string: {expression!r}"
                    matchers.append((label, operator, json.loads(value)))
                    index += 3
                    if at(index) == ",":
                        index += 1
                index += 1
            selectors.append(Selector(text, matchers, index))
    for grouping, start, end in groupings:
        grouping.selectors = [s for s in selectors if start < s.position <= end]
    return Query(selectors, [g for g, _, _ in groupings])


# -- what the gateway exports ------------------------------------------------------------


class Exported:
    """Sample names in a scrape, each with its labels and the values seen for them."""

    def __init__(self, samples: Samples) -> None:
        self.labels: dict[str, dict[str, set[str]]] = {}
        for sample in samples.samples:
            seen = self.labels.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                seen.setdefault(label, set()).add(value)

    def label_names(self, metric: str) -> set[str]:
        return set(self.labels.get(metric, {})) | TARGET_LABELS

    def problems(self, expression: str, shown_labels: list[str] = ()) -> list[str]:
        """What in `expression` (and in the labels its legend or annotations show) is not exported."""
        query = read_promql(expression)
        found = []
        for selector in query.selectors:
            metric = selector.metric
            if metric in PROMETHEUS_SERIES:
                unknown = [label for label, _, _ in selector.matchers if label not in TARGET_LABELS]
                found += [f"{metric}: no label {label}" for label in unknown]
                continue
            if metric not in self.labels:
                found.append(f"{metric}: not exported")
                continue
            for label, operator, value in selector.matchers:
                if label not in self.label_names(metric):
                    found.append(f"{metric}: no label {label}")
                elif label not in TARGET_LABELS and "$" not in value:
                    # A typo in an exact value (or a plain a|b list) would match nothing, silently.
                    wanted = [value] if operator in ("=", "!=") else value.split("|")
                    if operator in ("=~", "!~") and not re.fullmatch(r"\w+(\|\w+)*", value):
                        wanted = []
                    seen = self.labels[metric][label]
                    found += [f"{metric}: {label}={one!r} never seen" for one in wanted if one not in seen]
        for grouping in query.groupings:
            for label in grouping.labels:
                for metric in {s.metric for s in grouping.selectors} - PROMETHEUS_SERIES:
                    if label not in self.label_names(metric):
                        found.append(f"{metric}: no label {label} to aggregate by")
        names = set().union(*(self.label_names(s.metric) for s in query.selectors))
        missing = [label for label in shown_labels if label not in names]
        found += [f"{expression!r} shows label {label}, which it has not" for label in missing]
        return found


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str, list[str]]]:
    """(where, expression, labels the legend shows) for every panel target and template variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            shown = re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", ""))
            queries.append((f"panel {panel['title']!r}", target["expr"], shown))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"]["query"])
            assert match, variable
            queries.append((f"variable {variable['name']}", match.group(1), [match.group(2)]))
    return queries


@pytest.mark.parametrize(
    ("expression", "selectors", "groupings"),
    [
        ('up{job="wsgate"} == 0', [("up", [("job", "=", "wsgate")])], []),
        (
            'sum by (route) (rate(a_total{x=~"p|q", y!="z"}[5m]))'
            " / sum(rate(b_total[$__rate_interval])) by (le)",
            [("a_total", [("x", "=~", "p|q"), ("y", "!=", "z")]), ("b_total", [])],
            [(["route"], ["a_total"]), (["le"], ["b_total"])],
        ),
        (
            "histogram_quantile(0.99, sum without (le, instance) (rate(h_bucket[5m]))) > 1",
            [("h_bucket", [])],
            [(["le", "instance"], ["h_bucket"])],
        ),
        ("process_open_fds / process_max_fds > 0.8", [("process_open_fds", []), ("process_max_fds", [])], []),
        ('count by (version) (info{a="}", b=~"$v"})', [("info", [("a", "=", "}"), ("b", "=~", "$v")])],
         [(["version"], ["info"])]),
    ],
)
def test_the_promql_reader_finds_metrics_matchers_and_groupings(
    expression: str, selectors: list[Any], groupings: list[Any]
) -> None:
    query = read_promql(expression)
    assert [(s.metric, s.matchers) for s in query.selectors] == selectors
    assert [(g.labels, [s.metric for s in g.selectors]) for g in query.groupings] == groupings


def test_the_check_names_what_a_scrape_does_not_have() -> None:
    samples = Samples(
        '# TYPE wsgate_connections counter\nwsgate_connections_total{route="a",outcome="upgraded"} 1\n'
    )
    exported = Exported(samples)
    assert exported.problems('sum by (route) (rate(wsgate_connections_total{outcome="upgraded"}[5m]))') == []
    assert exported.problems(
        'sum by (backend) (wsgate_connections_total{outcome="upgrade", side="x"}) + wsgate_nope', ["code"]
    ) == [
        "wsgate_connections_total: outcome='upgrade' never seen",
        "wsgate_connections_total: no label side",
        "wsgate_nope: not exported",
        "wsgate_connections_total: no label backend to aggregate by",
        "'sum by (backend) (wsgate_connections_total{outcome=\"upgrade\", side=\"x\"}) + wsgate_nope'"
        " shows label code, which it has not",
    ]


# -- the alert rules and the dashboard against a real scrape -----------------------------


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not found: install the Debian package prometheus (scripts/test.sh does)",
)
def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@pytest.fixture
async def scraped(
    tmp_path: Path, ws_backend: Any, raw_backend: Any, closed_port: int
) -> AsyncIterator[Exported]:
    """A scrape of `wsgate run` after traffic that gives each series the deploy files use a sample."""

    async def forbid(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    refusing = await raw_backend(forbid)
    config = gateway_config(
        [ws_backend.url],
        route={"name": "echo", "match": {"path_prefix": "/echo"}},
        extra_routes=[
            {"name": "down", "match": {"path_prefix": "/down"}, "retries": 0,
             "backends": [{"url": f"ws://127.0.0.1:{closed_port}"}], "passive_ejection": {"failures": 1}},
            {"name": "refusing", "match": {"path_prefix": "/refusing"}, "backends": [{"url": refusing.url}]},
        ],
        heartbeat={"interval": "50ms", "timeout": "5s"},
    )
    gateway = await GatewayProcess.start(tmp_path, config)
    session = aiohttp.ClientSession()

    async def scrape() -> Samples:
        async with session.get(gateway.admin_url + "/metrics") as response:
            assert response.status == 200
            return Samples(await response.text())

    async def pinged_both_legs() -> bool:
        rtts = [s for s in (await scrape()).samples if s.name == "wsgate_heartbeat_rtt_seconds_count"]
        return {"client", "backend"} <= {s.labels["side"] for s in rtts}

    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            host, port = gateway.ws_url.removeprefix("ws://").rsplit(":", 1)
            for path, status in (("/nowhere", 404), ("/down", 502), ("/refusing", 403)):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(upgrade_request(path=path))
                assert (await read_response_head(reader))[0] == status
                writer.close()
            async with connect(gateway.ws_url + "/echo") as ws:
                await echo_messages(ws, 10)
                await poll(pinged_both_legs)
            # A refused reload, then one that succeeds.
            config_file = tmp_path / "wsgate.yaml"
            for text, answer in (("listeners: []\n", 400), (config_file.read_text(), 200)):
                config_file.write_text(text)
                async with session.post(gateway.admin_url + "/reload") as response:
                    assert response.status == answer, await response.text()
            yield Exported(await scrape())
    finally:
        await session.close()
        await gateway.stop()


async def test_every_alert_uses_metrics_and_labels_the_gateway_exports(scraped: Exported) -> None:
    problems = []
    for rule in alert_rules():
        annotations = " ".join(rule.get("annotations", {}).values())
        shown = re.findall(r"\$labels\.(\w+)", annotations)
        problems += [f"{rule['alert']}: {p}" for p in scraped.problems(rule["expr"], shown)]
    assert problems == []


async def test_every_dashboard_query_uses_metrics_and_labels_the_gateway_exports(scraped: Exported) -> None:
    problems = []
    for where, expression, shown in dashboard_queries():
        problems += [f"{where}: {p}" for p in scraped.problems(expression, shown)]
    assert problems == []
