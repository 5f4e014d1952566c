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
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from conftest import gateway_config
from peers import STEP_TIMEOUT, read_response_head, until, upgrade_request
from test_operations import GatewayProcess, Samples, connect, echo_messages

from wsgate.config import Config, Limits, Shutdown, load_config

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
                await until(pinged_both_legs)
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


# -- every file parses ---------------------------------------------------------------------


def deploy_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in suffixes)


def test_every_yaml_and_json_file_under_deploy_parses() -> None:
    files = deploy_files(".yml", ".yaml", ".json")
    assert {p.parent.name for p in files} >= {"prometheus", "grafana", "kubernetes"}
    for path in files:
        text = path.read_text()
        documents = [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))
        assert documents and all(isinstance(d, dict) for d in documents), path


# -- Kubernetes ---------------------------------------------------------------------------

KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes the manifests are for (a preStop `sleep` needs 1.30), and the newest schema known.
KUBERNETES_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


def kubernetes_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object kustomization.yaml lists, by (kind, name)."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    objects = {}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / resource).read_text()):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in objects, key
            objects[key] = document
    return objects


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    kinds = {kind for kind, _ in kubernetes_objects()}
    assert kinds == {
        "Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
        "ServiceMonitor",
    }


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_objects_validate(version: str) -> None:
    problems = []
    for (kind, name), document in kubernetes_objects().items():
        if kind == "ServiceMonitor":
            continue  # a custom resource: no schema offline; checked field by field below
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{kind} {name}: {exc.message} at {'.'.join(map(str, exc.path))}")
    assert problems == []


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl not found: the kustomization is not rendered"
)
def test_kubectl_renders_the_kustomization() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBERNETES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout)]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == set(kubernetes_objects())
    for document in rendered:
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "wsgate", document["metadata"]


def gateway_container() -> dict[str, Any]:
    pod = kubernetes_objects()["Deployment", "wsgate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def container_port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def configmap_text() -> str:
    return kubernetes_objects()["ConfigMap", "wsgate-config"]["data"]["wsgate.yaml"]


def deployment_environment() -> dict[str, str]:
    """Stand-ins for what the Deployment's env gives the gateway in a pod."""
    stand_ins = {"metadata.namespace": "wsgate", "limits.cpu": "2"}
    environment = {}
    for variable in gateway_container()["env"]:
        source = variable.get("valueFrom", {})
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        elif "fieldRef" in source:
            environment[variable["name"]] = stand_ins[source["fieldRef"]["fieldPath"]]
        else:
            environment[variable["name"]] = stand_ins[source["resourceFieldRef"]["resource"]]
    return environment


@pytest.fixture
def configmap_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The ConfigMap's config, as the gateway loads it in a pod."""
    for name, value in deployment_environment().items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "configmap.yaml"
    path.write_text(configmap_text())
    return load_config(path)


def test_the_configmap_passes_wsgate_check_with_the_deployments_environment(tmp_path: Path) -> None:
    path = tmp_path / "wsgate.yaml"
    path.write_text(configmap_text())
    needed = set(re.findall(r"\$\{(\w+)\}", configmap_text()))
    assert needed and needed <= set(deployment_environment()), needed
    result = subprocess.run(
        [sys.executable, "-m", "wsgate", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, **deployment_environment()},
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_probes_ports_and_selectors_agree_with_the_config(configmap_config: Config) -> None:
    config = configmap_config
    objects = kubernetes_objects()
    deployment = objects["Deployment", "wsgate"]
    pod = deployment["spec"]["template"]
    container = gateway_container()
    # The mounted file is the one the container runs, and the one the image's default command names.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["args"] == ["run", "-c", f"{mount['mountPath']}/wsgate.yaml"]
    assert f'"{mount["mountPath"]}/wsgate.yaml"' in (REPO / "Dockerfile").read_text()
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == "wsgate-config"
    # Probes on the admin port, at the paths the admin server answers.
    assert container_port(container, "admin") == config.admin.port
    assert container_port(container, "ws") == config.listeners[0].port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # Time to drain before the kubelet kills: the preStop pause plus the config's grace period.
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + config.shutdown.grace_period
    assert config.workers == int(deployment_environment()["WSGATE_WORKERS"])
    # With several workers the supervisor writes its snapshot to /tmp, on a read-only root.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "limits" in container["resources"] and "requests" in container["resources"]
    # Selectors find the gateway's pods; target ports are ports the container names.
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = objects["Service", "wsgate"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"ws", "admin"}
    budget = objects["PodDisruptionBudget", "wsgate"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items() and budget["maxUnavailable"] == 1
    hpa = objects["HorizontalPodAutoscaler", "wsgate"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "wsgate"}
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    assert deployment["spec"]["replicas"] == hpa["minReplicas"] == 3
    monitor = objects["ServiceMonitor", "wsgate"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "15s"}]
    # The job Prometheus gives the ServiceMonitor's targets (the Service's name) is the one the alerts name.
    assert service["metadata"]["name"] == "wsgate" and 'job="wsgate"' in ALERTS.read_text()


def test_the_example_backend_is_the_headless_service_the_config_resolves(configmap_config: Config) -> None:
    objects = kubernetes_objects()
    (backend,) = configmap_config.routes[0].backends
    name, port = backend.dns.rsplit(":", 1)
    assert name == "echo-backend.wsgate.svc.cluster.local"
    service = objects["Service", "echo-backend"]["spec"]
    assert service["clusterIP"] == "None"
    assert [p["port"] for p in service["ports"]] == [int(port)]
    pods = objects["Deployment", "echo-backend"]["spec"]["template"]
    assert service["selector"].items() <= pods["metadata"]["labels"].items()
    (container,) = pods["spec"]["containers"]
    assert container_port(container, service["ports"][0]["targetPort"]) == int(port)
    # The gateway's image, as its built-in echo server on that port, on every address of the pod.
    assert container["image"] == gateway_container()["image"]
    args = container["args"]
    assert args[0] == "echo-backend" and args[args.index("--port") + 1] == port
    assert args[args.index("--host") + 1] == "0.0.0.0"


# -- systemd ------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "wsgate.service"


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_the_systemd_unit_runs_checks_reloads_and_waits_for_the_drain() -> None:
    unit = unit_settings()
    config = "/etc/wsgate/wsgate.yaml"
    assert unit["ExecStartPre"] == f"/usr/local/bin/wsgate check -c {config}"
    assert unit["ExecStart"] == f"/usr/local/bin/wsgate run -c {config}"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["KillMode"] == "mixed"  # SIGTERM to the supervisor alone, which forwards it
    assert int(unit["TimeoutStopSec"]) > Shutdown().grace_period
    assert unit["RestartPreventExitStatus"] == "2"  # the exit status of an invalid config
    assert int(unit["LimitNOFILE"]) >= 2 * Limits().max_connections
    assert unit["PrivateTmp"] == "yes" and unit["NoNewPrivileges"] == "yes"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not found")
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    # verify wants the commands to exist: point them at an executable that does.
    unit = tmp_path / "wsgate.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/wsgate", sys.executable))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (0, "")


# -- the container image -------------------------------------------------------------------

DOCKERFILE = REPO / "Dockerfile"
CONTAINER_CONFIG = DEPLOY / "container" / "wsgate.yaml"


def test_the_container_config_passes_wsgate_check_and_binds_admin_beyond_loopback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "wsgate", "check", "-c", str(CONTAINER_CONFIG)],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("WSGATE_")},
    )
    assert result.returncode == 0, result.stderr
    config = load_config(CONTAINER_CONFIG)
    assert (config.admin.host, config.admin.port) == ("0.0.0.0", 9090)


def test_the_dockerfile_exposes_the_ports_the_container_config_and_the_configmap_bind(
    configmap_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WSGATE_PORT", "WSGATE_ADMIN_PORT"):
        monkeypatch.delenv(name, raising=False)
    container = load_config(CONTAINER_CONFIG)
    text = DOCKERFILE.read_text()
    (exposed,) = re.findall(r"^EXPOSE (.*)$", text, re.MULTILINE)
    for config in (container, configmap_config):
        assert sorted(map(int, exposed.split())) == sorted([config.listeners[0].port, config.admin.port])
    assert "COPY deploy/container/wsgate.yaml /etc/wsgate/wsgate.yaml" in text
    # The HEALTHCHECK's default port is the admin port.
    assert f"'WSGATE_ADMIN_PORT', '{container.admin.port}'" in text


def test_the_dockerfile_has_the_base_images_as_arguments_and_a_fixed_non_root_user() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG BUILD_IMAGE=python:3.12\n" in text and "ARG RUNTIME_IMAGE=python:3.12-slim\n" in text
    assert re.findall(r"^FROM (\S+)", text, re.MULTILINE) == ["${BUILD_IMAGE}", "${RUNTIME_IMAGE}", "${RUNTIME_IMAGE}"]
    pod = kubernetes_objects()["Deployment", "wsgate"]["spec"]["template"]["spec"]["securityContext"]
    assert f"USER {pod['runAsUser']}:{pod['runAsGroup']}\n" in text
    assert '\nENTRYPOINT ["wsgate"]\n' in text and '\nCMD ["run", "-c", "/etc/wsgate/wsgate.yaml"]\n' in text
    licence = re.search(r'^license = "(.*)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert f'org.opencontainers.image.licenses="{licence}"' in text


def test_the_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else() -> None:
    rules = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert rules[0] == "*"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.*) \S+$", DOCKERFILE.read_text(), re.MULTILINE):
        copied.update(sources.split())
    assert copied == allowed


# -- Compose --------------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose"


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())["services"]


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Each bind mount's target in the container, with its source on the host."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        mounts[target] = (COMPOSE / source).resolve()
    return mounts


def compose_gateway_config(monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.delenv("WSGATE_PORT", raising=False)
    return load_config(bind_mounts(compose_services()["wsgate"])["/etc/wsgate/wsgate.yaml"])


def test_every_file_compose_mounts_or_builds_from_exists() -> None:
    services = compose_services()
    for name, service in services.items():
        for target, source in bind_mounts(service).items():
            assert source.is_file(), f"{name}: {source} (mounted at {target})"
        if "build" in service:
            context = (COMPOSE / service["build"]["context"]).resolve()
            assert context == REPO and (context / service["build"]["dockerfile"]).is_file(), name
    assert {"wsgate", "prometheus", "grafana", "load"} <= set(services)


def test_the_compose_gateway_config_passes_wsgate_check() -> None:
    path = bind_mounts(compose_services()["wsgate"])["/etc/wsgate/wsgate.yaml"]
    result = subprocess.run(
        [sys.executable, "-m", "wsgate", "check", "-c", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_compose_services_agree_on_names_ports_and_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose_services()
    config = compose_gateway_config(monkeypatch)
    gateway = services["wsgate"]
    assert gateway["ports"] == [f"{config.listeners[0].port}:{config.listeners[0].port}",
                                f"{config.admin.port}:{config.admin.port}"]
    assert gateway.get("command") is None  # the image's own: run -c /etc/wsgate/wsgate.yaml
    assert int(gateway["stop_grace_period"].removesuffix("s")) > config.shutdown.grace_period
    # Every backend of the route is an echo-backend service of the same image, on the port the URL names.
    (route,) = config.routes
    backends = [backend.url.removeprefix("ws://").split(":") for backend in route.backends]
    assert len(backends) == 3 and set(gateway["depends_on"]) == {host for host, _ in backends}
    for host, port in backends:
        echo = services[host]
        assert echo["image"] == gateway["image"] and echo["build"] == gateway["build"]
        command = echo["command"]
        assert command[0] == "echo-backend" and command[command.index("--port") + 1] == port
        assert command[command.index("--host") + 1] == "0.0.0.0"
    # The load goes to the gateway's listener.
    load = services["load"]
    assert load["image"] == gateway["image"]
    assert load["command"][load["command"].index("--url") + 1] == f"ws://wsgate:{config.listeners[0].port}/"
    assert bind_mounts(load)[load["entrypoint"][1]] == COMPOSE / "load.py"
    # Prometheus scrapes the admin port as job wsgate, with the alert rules it mounts.
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["job_name"] == "wsgate" and 'job="wsgate"' in ALERTS.read_text()
    assert job["static_configs"] == [{"targets": [f"wsgate:{config.admin.port}"]}]
    mounts = bind_mounts(services["prometheus"])
    assert mounts["/etc/prometheus/prometheus.yml"] == COMPOSE / "prometheus.yml"
    assert {mounts[path] for path in prometheus["rule_files"]} == {ALERTS}
    # Grafana: the data source is that Prometheus, the dashboard the one under deploy/grafana.
    grafana = bind_mounts(services["grafana"])
    datasource_file = next(s for t, s in grafana.items() if t.startswith("/etc/grafana/provisioning/datasources/"))
    (datasource,) = yaml.safe_load(datasource_file.read_text())["datasources"]
    assert datasource["url"] == "http://prometheus:9090" and datasource["isDefault"] is True
    assert datasource["type"] == "prometheus"
    provider_file = next(s for t, s in grafana.items() if t.startswith("/etc/grafana/provisioning/dashboards/"))
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    dashboards = {t: s for t, s in grafana.items() if t.startswith(provider["options"]["path"] + "/")}
    assert list(dashboards.values()) == [DASHBOARD]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home in dashboards


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not found: install the Debian package prometheus (scripts/test.sh does)",
)
def test_promtool_accepts_the_compose_prometheus_config(tmp_path: Path) -> None:
    # The rule file where the container has it, for promtool to read here.
    config = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        ["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_compose_load_script_echoes_through_a_gateway(tmp_path: Path, ws_backend: Any) -> None:
    gateway = await GatewayProcess.start(tmp_path, gateway_config([ws_backend.url], route={"hash_key": "query:room"}))
    load = None
    try:
        load = await asyncio.create_subprocess_exec(
            sys.executable, str(COMPOSE / "load.py"), "--url", gateway.ws_url + "/", "--connections", "3",
            "--rate", "20", "--duration", "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(STEP_TIMEOUT):
            output, errors = await load.communicate()
        assert load.returncode == 0, output.decode() + errors.decode()
        summary = re.fullmatch(
            r"load: (\d+) connections, (\d+) messages echoed, 0 mismatched, 0 failed connections\n", output.decode()
        )
        assert summary, output.decode()
        assert int(summary.group(1)) == 3 == ws_backend.connections
        assert int(summary.group(2)) == len(ws_backend.messages) > 0
        assert {request[":path"] for request in ws_backend.requests} == {f"/?room={n}" for n in range(3)}
    finally:
        if load is not None and load.returncode is None:
            load.kill()
            await load.wait()
        await gateway.stop()


EXAMPLES = KUBERNETES / "examples"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_connections_autoscaler_validates_and_scales_what_the_cpu_one_does(version: str) -> None:
    example = yaml.safe_load((EXAMPLES / "hpa-connections.yaml").read_text())
    kubernetes_validate.validate(example, version, strict=True)
    cpu = kubernetes_objects()["HorizontalPodAutoscaler", "wsgate"]
    # It takes the CPU one's place: the same name and target.
    assert example["metadata"]["name"] == cpu["metadata"]["name"]
    assert example["spec"]["scaleTargetRef"] == cpu["spec"]["scaleTargetRef"]
    assert example["spec"]["behavior"] == cpu["spec"]["behavior"]


async def test_the_adapter_rule_serves_the_metric_the_autoscaler_names_from_an_exported_gauge(
    scraped: Exported,
) -> None:
    example = yaml.safe_load((EXAMPLES / "hpa-connections.yaml").read_text())
    (pods,) = [m["pods"] for m in example["spec"]["metrics"] if m["type"] == "Pods"]
    (rule,) = yaml.safe_load((EXAMPLES / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == pods["metric"]["name"]
    (selector,) = read_promql(rule["seriesQuery"]).selectors
    assert re.fullmatch(rule["name"]["matches"], selector.metric)
    assert selector.metric in scraped.labels
    # namespace and pod come from the ServiceMonitor's targets, the way the rule maps them.
    assert {label for label, _, _ in selector.matchers} == set(rule["resources"]["overrides"]) == {"namespace", "pod"}
