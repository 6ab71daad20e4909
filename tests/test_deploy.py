"""deploy/ stays true to the gateway: the Kubernetes base, the Grafana dashboard, the alert rules.

* Every PromQL expression (dashboard panels and variables, alert rules) parses with a real
  PromQL parser and names only metrics, labels and label values that a running gateway
  exports: one is started on loopback, driven through each kind of session, and scraped.
* The kustomize base, rendered here without a kustomize binary, validates against the
  Kubernetes schemas offline and agrees with the gateway's config (the ConfigMap's
  gateway.yaml, parsed by `parse_config`) and with the Dockerfile.
* The alert rules carry the migration plan's thresholds (README "Metrics").
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
import shlex
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.service.admin import create_admin_app
from gateway.cli import DEFAULT_CONFIG
from gateway.core.config import RESTART_KEYS, Config, ConfigError
from gateway.service.configfile import load_config
from gateway.core.configparse import parse_config
from gateway.service.reload import Reloader
from gateway.service.runtime import Gateway
from gateway.service.server import start_site

from .helpers import (
    TIMEOUT,
    closed,
    eventually,
    make_token,
    open_client,
    refused_port,
    start_stack,
)

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "ws-gateway.json"
ALERTS = ROOT / "deploy" / "prometheus-alerts.yaml"

OPENED = "ws_gateway_connections_opened_total"
ATTEMPTS = "ws_gateway_connection_attempts_total"
AUTH_FAILURES = "ws_gateway_auth_failures_total"
READY_BUCKETS = "ws_gateway_session_ready_seconds_bucket"
ACTIVE = "ws_gateway_connections_active"

# The migration plan's alert thresholds (README "Metrics": "connection success under 95 %,
# auth failures over 5 %, p95 session-ready time over 2 s, and the guard tripping"): a
# comparison, its number, and the metrics on the other side of it.
PLAN_THRESHOLDS = {
    "connection success under 95 %": ("<", 0.95, {OPENED, ATTEMPTS}),
    "auth failures over 5 %": (">", 0.05, {AUTH_FAILURES, ATTEMPTS}),
    "session-ready time over 2 s": (">", 2.0, {READY_BUCKETS}),
    "guard tripped": ("==", 2.0, {"ws_gateway_guard_state"}),
}

# Labels Prometheus adds to every scraped series (the target's), which the gateway does not export.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "node", "service"})
# Labels whose every value exists from start-up, so a matcher value can be checked against the scrape.
PRECREATED_LABELS = frozenset({"auth_style", "backend", "result", "direction"})
# What the Grafana variables the dashboard uses stand for when an expression is parsed.
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600"}
DASHBOARD_VARIABLE_VALUE = "default"

# Sizing the Deployment is held to (see its comment): base RSS plus RSS per idle session.
BASE_RSS_BYTES = 60_000_000
RSS_PER_SESSION_BYTES = 7 * 1024
DRAIN_MARGIN_SECONDS = 5
OLDEST_KUBERNETES = "1.27"


# -- a running gateway's /metrics ---------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    text: str
    status: dict[str, int]  # admin path -> HTTP status

    @cached_property
    def series(self) -> dict[str, list[dict[str, str]]]:
        """Sample name (as Prometheus stores it: _total, _bucket, ...) -> the label sets exported."""
        found: dict[str, list[dict[str, str]]] = {}
        for family in text_string_to_metric_families(self.text):
            for sample in family.samples:
                found.setdefault(sample.name, []).append(dict(sample.labels))
        return found

    @cached_property
    def names(self) -> set[str]:
        """Every sample name the gateway exports, also for families without a sample yet."""
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("", "_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
        names = set(self.series)
        for family in text_string_to_metric_families(self.text):
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        return names


async def _run_gateway_and_scrape() -> Scrape:
    """A gateway with stub backends and an admin listener on loopback, every kind of outcome
    once (sessions on both backends in both auth styles, an auth failure, a new backend that
    cannot be reached and its fallback), then GET /metrics, /healthz, /readyz."""
    stack = await start_stack()
    admin, admin_port = await start_site(create_admin_app(stack.gateway), "127.0.0.1", 0)
    clients = []
    try:
        async def session(style: str, user: str) -> None:
            ws = await open_client(stack, style, make_token(user))
            clients.append(ws)
            if style == "message":
                assert json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))["type"] == "connected"
            await ws.send(f"hello from {user}")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == f"hello from {user}"

        await session("legacy", "alice")  # legacy -> old
        await session("message", "bob")  # message -> old
        stack.route_to("new")
        await session("legacy", "carol")  # legacy -> new
        await session("message", "dave")  # message -> new

        bad = await open_client(stack, "legacy", make_token("eve", secret="not-the-secret-0123456789-abcdefghij"))
        assert (await asyncio.wait_for(closed(bad), TIMEOUT))[0] == 1008

        async with refused_port() as port:  # the new backend down: falls back to the old one
            config = stack.gateway.config
            down = replace(config.backends["new"], url=f"ws://127.0.0.1:{port}/ws/chat")
            stack.gateway.apply(replace(config, backends={**config.backends, "new": down}))
            await session("message", "frank")

        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{admin_port}"

            async def get(path: str) -> tuple[int, str]:
                async with http.get(base + path) as response:
                    return response.status, await response.text()

            async def complete() -> bool:  # the auth failure is counted when its connection is finished
                return f"{AUTH_FAILURES}{{" in (await get("/metrics"))[1]

            assert await eventually(complete)
            status = {path: (await get(path))[0] for path in ("/healthz", "/readyz", "/metrics")}
            return Scrape((await get("/metrics"))[1], status)
    finally:
        for ws in clients:
            await ws.close()
        await admin.cleanup()
        await stack.close()


@pytest.fixture(scope="module")
def scrape() -> Scrape:
    """Scraped once per module, on a loop of its own thread (these tests are synchronous)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["scrape"] = asyncio.run(asyncio.wait_for(_run_gateway_and_scrape(), 4 * TIMEOUT))
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="scrape-gateway")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["scrape"]


# -- PromQL --------------------------------------------------------------------------------


def parse_promql(expr: str, where: str) -> promql_parser.Expr:
    try:
        return promql_parser.parse(expr)
    except ValueError as exc:
        pytest.fail(f"{where}: does not parse as PromQL ({exc}): {expr}")


def nodes(expr: promql_parser.Expr) -> list[Any]:
    found: list[Any] = []
    promql_parser.walk(expr, found.append)
    return found


def metric_of(selector: promql_parser.VectorSelector) -> str | None:
    if selector.name:
        return str(selector.name)
    for matcher in selector.matchers.matchers:
        if matcher.name == "__name__" and matcher.op == promql_parser.MatchOp.Equal:
            return str(matcher.value)
    return None


def metrics_in(expr: promql_parser.Expr) -> set[str]:
    return {metric_of(n) or "<no metric name>" for n in nodes(expr) if isinstance(n, promql_parser.VectorSelector)}


def groupings(expr: promql_parser.Expr) -> list[tuple[set[str], set[str]]]:
    """(labels of a `by (...)`, metrics aggregated) for every aggregation in `expr`."""
    return [
        (set(n.modifier.labels), metrics_in(n.expr))
        for n in nodes(expr)
        if isinstance(n, promql_parser.AggregateExpr)
        and n.modifier is not None
        and n.modifier.type == promql_parser.AggModifierType.By
    ]


def comparisons(expr: promql_parser.Expr) -> list[tuple[str, float, set[str]]]:
    """(operator, number, metrics on the other side) for every `<vector> op <number>` in `expr`."""
    found = []
    for n in nodes(expr):
        if isinstance(n, promql_parser.BinaryExpr) and isinstance(n.rhs, promql_parser.NumberLiteral):
            found.append((str(n.op).strip(), float(n.rhs.val), metrics_in(n.lhs)))
    return found


def assert_exported(expr: promql_parser.Expr, where: str, scrape: Scrape) -> None:
    """`expr` names only metrics the gateway exports, labels those metrics carry, and values
    they take (for labels whose values all exist from start-up)."""
    series = scrape.series
    names = metrics_in(expr)
    unknown = sorted(names - scrape.names)
    assert not unknown, f"{where}: names metrics the gateway does not export: {unknown} (exports: {sorted(scrape.names)})"
    labels: set[str] = set()
    values: dict[str, set[str]] = {}
    for name in names:
        assert series.get(name), (
            f"{where}: {name} is declared but had no sample in the scrape: either the gateway never records it "
            "yet (then a panel or alert on it shows nothing), or _run_gateway_and_scrape lacks that outcome"
        )
        for label_set in series[name]:
            labels.update(label_set)
            for label, value in label_set.items():
                values.setdefault(label, set()).add(value)
    known = labels | TARGET_LABELS
    for n in nodes(expr):
        used: set[str] = set()
        if isinstance(n, promql_parser.VectorSelector):
            for matcher in n.matchers.matchers:
                if matcher.name == "__name__":
                    continue
                used.add(matcher.name)
                if matcher.name in PRECREATED_LABELS and matcher.op in (promql_parser.MatchOp.Equal, promql_parser.MatchOp.Re):
                    wanted = set(str(matcher.value).split("|")) if matcher.op == promql_parser.MatchOp.Re else {matcher.value}
                    assert wanted <= values.get(matcher.name, set()), (
                        f"{where}: {matcher.name} takes {sorted(values.get(matcher.name, set()))}, not {sorted(wanted)}"
                    )
        elif isinstance(n, promql_parser.AggregateExpr) and n.modifier is not None:
            used.update(n.modifier.labels)
        elif isinstance(n, promql_parser.BinaryExpr) and n.modifier is not None:
            if n.modifier.matching is not None:
                used.update(n.modifier.matching.labels)
            used.update(n.modifier.group_labels or ())
        if "le" in used and not any(name.endswith("_bucket") for name in names):
            pytest.fail(f"{where}: groups by le without a histogram's _bucket series")
        missing = sorted(used - known - {"le"})
        assert not missing, f"{where}: labels {missing} are not on {sorted(names)} (they carry {sorted(labels)})"


# -- the dashboard -------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute_variables(expr: str, variables: set[str]) -> str:
    """The expression as Prometheus receives it from Grafana: variables replaced by values."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        assert name in variables, f"${name} is neither a dashboard variable nor a Grafana built-in"
        return DASHBOARD_VARIABLE_VALUE

    return _VARIABLE.sub(value, expr)


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, promql_parser.Expr, dict[str, Any]]]:
    """(where, parsed expression, panel) for every query of every panel."""
    variables = set(dashboard_variables(dashboard))
    found = []
    for panel in data_panels(dashboard):
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} query {target['refId']}"
            found.append((where, parse_promql(substitute_variables(target["expr"], variables), where), panel))
    return found


def test_dashboard_is_importable_with_a_prometheus_data_source_variable() -> None:
    dashboard = load_dashboard()
    assert dashboard["id"] is None, "an exported id makes import collide with an existing dashboard"
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    variables = dashboard_variables(dashboard)
    data_source = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(data_source) == 1 and data_source[0]["query"] == "prometheus"
    reference = {"type": "prometheus", "uid": f"${{{data_source[0]['name']}}}"}
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in data_panels(dashboard):
        # A data source by variable, never a uid of someone's Grafana: imports as is anywhere.
        assert panel["datasource"] == reference, panel["title"]
        assert panel["targets"] and all(t["datasource"] == reference for t in panel["targets"]), panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    assert "__inputs" not in dashboard, "no import-time inputs: the data source is a dashboard variable"


def test_every_dashboard_panel_says_what_good_looks_like() -> None:
    for panel in data_panels(load_dashboard()):
        description = panel.get("description", "")
        assert "Good:" in description and len(description) > 60, f"{panel['title']!r}: {description!r}"


def test_dashboard_queries_parse_and_name_only_what_the_gateway_exports(scrape: Scrape) -> None:
    dashboard = load_dashboard()
    for where, expr, _ in dashboard_expressions(dashboard):
        assert_exported(expr, where, scrape)
    for variable in dashboard_variables(dashboard).values():
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: expected label_values(<series>, <label>), got {query!r}"
        where = f"variable {variable['name']}"
        assert_exported(parse_promql(match.group(1), where), where, scrape)
        assert match.group(2) in TARGET_LABELS or any(match.group(2) in s for s in scrape.series[match.group(1)])


def test_dashboard_shows_every_signal_of_the_migration_plan_by_backend_and_auth_style() -> None:
    queries = dashboard_expressions(load_dashboard())
    exprs = [expr for _, expr, _ in queries]

    def some(predicate: Callable[[promql_parser.Expr], bool]) -> bool:
        return any(predicate(expr) for expr in exprs)

    def grouped(metric: str, *labels: str) -> Callable[[promql_parser.Expr], bool]:
        return lambda e: any(metric in metrics and set(labels) <= by for by, metrics in groupings(e))

    signals: dict[str, Callable[[promql_parser.Expr], bool]] = {
        "connection success rate": lambda e: {OPENED, ATTEMPTS} <= metrics_in(e),
        "connection success rate by auth style": grouped(ATTEMPTS, "auth_style"),
        "sessions by backend and auth style": grouped(OPENED, "backend", "auth_style"),
        "auth failure rate by reason": lambda e: grouped(AUTH_FAILURES, "reason")(e) and ATTEMPTS in metrics_in(e),
        "old vs new auth method usage": grouped(ATTEMPTS, "auth_style"),
        "session-ready time by backend and auth style": grouped(READY_BUCKETS, "le", "backend", "auth_style"),
        "upstream failures by backend": grouped("ws_gateway_upstream_failures_total", "backend", "reason"),
        "fallbacks": lambda e: "ws_gateway_fallbacks_total" in metrics_in(e),
        "guard state": lambda e: "ws_gateway_guard_state" in metrics_in(e),
        "guard trips": lambda e: "ws_gateway_guard_trips_total" in metrics_in(e),
        "open sessions by backend and auth style": grouped(ACTIVE, "backend", "auth_style"),
        "config reloads by result": grouped("ws_gateway_config_reloads_total", "result"),
    }
    missing = [name for name, predicate in signals.items() if not some(predicate)]
    assert not missing, f"the dashboard does not show: {missing}"
    # Configured and effective percentage side by side, in one panel.
    panels: dict[int, set[str]] = {}
    for _, expr, panel in queries:
        panels.setdefault(panel["id"], set()).update(metrics_in(expr))
    pair = {"ws_gateway_rollout_configured_percent", "ws_gateway_rollout_effective_percent"}
    assert any(pair <= metrics for metrics in panels.values()), "no panel shows configured vs effective percentage"


def test_dashboard_thresholds_are_the_alert_thresholds() -> None:
    queries = dashboard_expressions(load_dashboard())
    for plan, (_, number, metrics) in PLAN_THRESHOLDS.items():
        steps = {
            step["value"]
            for _, expr, panel in queries
            if metrics <= metrics_in(expr)
            for step in panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
        }
        assert number in steps, f"{plan}: no panel on {sorted(metrics)} marks {number} (its steps: {sorted(s for s in steps if s is not None)})"


# -- the alert rules -----------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def test_alert_expressions_parse_and_name_only_what_the_gateway_exports(scrape: Scrape) -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert rule.get("alert") and rule["labels"]["severity"] and rule["annotations"]["summary"], rule
        where = f"alert {rule['alert']}"
        assert_exported(parse_promql(rule["expr"], where), where, scrape)


def test_alert_rules_carry_the_plans_thresholds() -> None:
    found = {
        rule["alert"]: comparisons(parse_promql(rule["expr"], rule["alert"])) for rule in alert_rules()
    }
    for plan, (op, number, metrics) in PLAN_THRESHOLDS.items():
        assert any(
            op == seen_op and number == seen_number and metrics <= seen_metrics
            for rules in found.values()
            for seen_op, seen_number, seen_metrics in rules
        ), f"no alert says {plan}: wanted {sorted(metrics)} {op} {number}; the rules compare {found}"


def test_readme_states_the_thresholds_the_alerts_carry() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sentence = re.search(r"`deploy/prometheus-alerts\.yaml` holds the alerts:(.+?)\n\n", readme, re.DOTALL)
    assert sentence, "README no longer lists the alerts"
    text = " ".join(sentence.group(1).split())
    for phrase in ("success under 95 %", "failures over 5 %", "session-ready time over 2 s", "guard tripping"):
        assert phrase in text, f"README's alert list lacks {phrase!r}: {text!r}"


# -- the Kubernetes base -------------------------------------------------------------------

KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "images", "namespace"}


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize directory` for the plain base this repository keeps: listed files,
    `images` and `namespace`. Anything else is refused, so the base stays plain."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = sorted(set(kustomization) - KUSTOMIZE_KEYS)
    assert not unsupported, f"kustomization.yaml uses {unsupported}: keep the base plain or teach render() them"
    resources: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        path = directory / name
        assert path.is_file(), f"{name}: resources are plain files in the base"
        resources += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    for resource in resources:
        if "namespace" in kustomization:
            resource["metadata"]["namespace"] = kustomization["namespace"]
        for container in containers(resource):
            for image in kustomization.get("images", []):
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    new_tag = image.get("newTag", tag)
                    container["image"] = (
                        f"{new_name}@{image['digest']}" if "digest" in image else f"{new_name}:{new_tag}" if new_tag else new_name
                    )
    return resources


def containers(resource: dict[str, Any]) -> list[dict[str, Any]]:
    template = resource.get("spec", {}).get("template", {}).get("spec", {})
    return list(template.get("containers", [])) + list(template.get("initContainers", []))


@dataclass(frozen=True)
class Base:
    resources: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        found = [r for r in self.resources if r["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.one("Deployment")["spec"]["template"]["spec"]
        return spec

    @property
    def pod_labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.one("Deployment")["spec"]["template"]["metadata"]["labels"]
        return labels

    @property
    def container(self) -> dict[str, Any]:
        (container,) = [c for c in self.pod["containers"] if c["name"] == "ws-gateway"]
        return container

    def container_port(self, port: int | str) -> int:
        """A probe's or Service's port (a number or a container port's name) as a number."""
        if isinstance(port, int):
            return port
        (number,) = [p["containerPort"] for p in self.container["ports"] if p.get("name") == port]
        return int(number)

    def env_from_secrets(self) -> dict[str, dict[str, str]]:
        return {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in self.container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }

    def config_text(self, key: str) -> str:
        text: str = self.one("ConfigMap")["data"][key]
        return text

    def config(self, key: str) -> Config:
        env = {e["name"]: f"value-of-{e['name']}" for e in self.container.get("env", [])}
        return parse_config(yaml.safe_load(self.config_text(key)), env=env)


@pytest.fixture(scope="module")
def base() -> Base:
    return Base(render(K8S))


@dataclass(frozen=True)
class Image:
    """What the Dockerfile sets that the pod relies on."""

    user: str
    expose: set[int]
    env: dict[str, str]
    cmd: list[str]


def dockerfile() -> Image:
    lines = [line for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines() if not line.lstrip().startswith("#")]
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            word, _, rest = text.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))  # type: ignore[misc]
    (user,) = [rest for word, rest in instructions if word == "USER"]
    expose = {int(port.split("/")[0]) for word, rest in instructions if word == "EXPOSE" for port in rest.split()}
    cmd = [json.loads(rest) for word, rest in instructions if word == "CMD"][-1]
    return Image(user, expose, env, cmd)


def effective_config_path(base: Base, image: Image) -> str:
    """The file `ws-gateway serve` reads in the pod: --config, else $GATEWAY_CONFIG, else the default."""
    container = base.container
    argv = list(container.get("command", [])) + list(container.get("args", [])) if "command" in container else (
        list(container["args"]) if "args" in container else image.cmd
    )
    assert argv[:2] == ["ws-gateway", "serve"], f"the container must run `ws-gateway serve`, not {argv}"
    for index, arg in enumerate(argv):
        if arg == "--config":
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    env = {**image.env, **{e["name"]: e["value"] for e in container.get("env", []) if "value" in e}}
    path = env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG
    assert posixpath.isabs(path), f"the config path {path!r} must be absolute: the WORKDIR is the mounted directory"
    return path


def config_mount(base: Base, image: Image) -> tuple[str, dict[str, Any], str]:
    """(the config file's path, its volume mount, the ConfigMap key it is)."""
    path = effective_config_path(base, image)
    directory, key = posixpath.split(path)
    mounts = base.container["volumeMounts"]
    as_file = [m for m in mounts if m["mountPath"] == path]
    assert not as_file, f"{path} is mounted as a file (subPath): the kubelet never updates it, so hot reload never sees an edit"
    mounts = [m for m in mounts if m["mountPath"].rstrip("/") == directory]
    assert len(mounts) == 1, f"nothing is mounted at {directory}, where the gateway reads {key}"
    return path, mounts[0], key


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (500m, 2, 256Mi, 1G) as a number (cores or bytes)."""
    units = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    assert match and match.group(2) in units, f"unexpected quantity {text!r}"
    return float(match.group(1)) * units[match.group(2)]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_manifests_validate_against_the_kubernetes_schemas(base: Base, version: str) -> None:
    kinds = sorted(r["kind"] for r in base.resources)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    problems = []
    for resource in base.resources:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.absolute_path)
            problems.append(f"{resource['kind']} {resource['metadata']['name']}: {where}: {exc.message}")
    assert not problems, f"invalid on Kubernetes {version}: {problems}"


def test_kustomization_starts_with_what_to_change_and_sets_the_image(base: Base) -> None:
    text = (K8S / "kustomization.yaml").read_text(encoding="utf-8")
    header = text.split("\napiVersion:")[0]
    assert header.startswith("#") and all(line.startswith("#") or not line for line in header.splitlines())
    (secret_ref,) = base.env_from_secrets().values()
    for needed in ("images", secret_ref["name"], "configmap.yaml", "kubectl apply -k deploy/k8s"):
        assert needed in header, f"the comment block at the top of kustomization.yaml should mention {needed!r}"
    kustomization = yaml.safe_load(text)
    (image,) = kustomization["images"]
    assert base.container["image"] == f"{image['newName']}:{image['newTag']}", "images: must reach the container"


def test_deployment_runs_as_the_images_user_without_privileges(base: Base) -> None:
    uid, _, gid = dockerfile().user.partition(":")
    pod, container = base.pod["securityContext"], base.container["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert (pod["runAsUser"], pod.get("runAsGroup")) == (int(uid), int(gid) if gid else pod.get("runAsGroup"))
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container.get("privileged", False) is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_deployment_ports_and_probes_agree_with_the_config_and_the_dockerfile(base: Base, scrape: Scrape) -> None:
    image = dockerfile()
    config = base.config(config_mount(base, image)[2])
    assert config.admin is not None, "the probes and Prometheus need the admin listener"
    assert config.listen.host == "0.0.0.0" and config.admin.host == "0.0.0.0", "the kubelet and the Service connect from outside the pod"
    ports = {p["name"]: p["containerPort"] for p in base.container["ports"]}
    assert ports == {"ws": config.listen.port, "admin": config.admin.port}
    assert set(ports.values()) == image.expose
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = base.container[probe]["httpGet"]
        assert http["path"] == path and base.container_port(http["port"]) == config.admin.port, probe
        assert scrape.status[path] == 200, f"the admin listener does not answer {path}"


def test_termination_grace_outlasts_the_drain(base: Base) -> None:
    config = base.config(config_mount(base, dockerfile())[2])
    needed = config.drain.grace_seconds + config.drain.window_seconds + DRAIN_MARGIN_SECONDS
    assert base.pod["terminationGracePeriodSeconds"] >= needed


def test_config_comes_from_the_configmap_mounted_as_a_directory(base: Base) -> None:
    path, mount, key = config_mount(base, dockerfile())
    assert "subPath" not in mount and "subPathExpr" not in mount, "a subPath mount never sees a ConfigMap update"
    (volume,) = [v for v in base.pod["volumes"] if v["name"] == mount["name"]]
    configmap = base.one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert key in configmap["data"], f"the ConfigMap has no {key!r}, the file {path} the gateway reads"
    items = volume["configMap"].get("items")
    assert items is None or any(i["key"] == key and i["path"] == key for i in items)


def test_configmap_swap_at_the_mounted_path_reaches_the_gateway(
    base: Base, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kubelet's layout for the Deployment's mount (key -> ..data/key, ..data -> ..<version>),
    with the ConfigMap's own gateway.yaml; an update is a new version and a rename of ..data."""
    _, _, key = config_mount(base, dockerfile())
    for name in base.env_from_secrets():
        monkeypatch.setenv(name, f"value-of-{name}")
    raw = yaml.safe_load(base.config_text(key))

    def publish(version: str, new_percent: float) -> None:
        (tmp_path / version).mkdir()
        raw["rollout"]["new_percent"] = new_percent
        (tmp_path / version / key).write_text(yaml.safe_dump(raw), encoding="utf-8")
        (tmp_path / "..data_tmp").symlink_to(version)
        os.replace(tmp_path / "..data_tmp", tmp_path / "..data")

    publish("..2026_01_01_00_00_00.1", 0)
    (tmp_path / key).symlink_to(f"..data/{key}")
    path = str(tmp_path / key)
    gateway = Gateway(load_config(path), config_path=path)
    refused: list[ConfigError] = []
    reloader = Reloader(path, gateway.reload, refused.append)
    publish("..2026_01_01_00_05_00.2", 5)
    reloader.check()
    assert not refused and gateway.config.rollout.new_percent == 5


def test_jwt_secret_comes_from_a_secret_through_the_environment(base: Base) -> None:
    key = config_mount(base, dockerfile())[2]
    text = base.config_text(key)
    raw = yaml.safe_load(text)
    referenced = {name for value in leaves(raw) for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", str(value))}
    from_secrets = base.env_from_secrets()
    assert referenced and referenced <= set(from_secrets), f"{sorted(referenced - set(from_secrets))} not from a Secret"
    assert re.search(r"^\s*secret:\s*\$\{\w+\}\s*$", text, re.MULTILINE), "auth.secret must be an environment variable"
    config = base.config(key)
    (name,) = [n for n in from_secrets if config.auth.secret == f"value-of-{n}"]
    assert from_secrets[name]["key"] and from_secrets[name]["name"]
    with pytest.raises(ConfigError, match=name):
        parse_config(raw, env={})


def leaves(value: Any) -> Iterator[Any]:
    """Every scalar of a parsed YAML document."""
    if isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item)
    else:
        yield value


def test_resources_are_sized_for_the_configured_sessions_per_pod(base: Base) -> None:
    config = base.config(config_mount(base, dockerfile())[2])
    resources = base.container["resources"]
    assert quantity(resources["requests"]["cpu"]) == 0.5
    assert "cpu" not in resources.get("limits", {}) or quantity(resources["limits"]["cpu"]) >= 1
    sessions = config.limits.max_upstream_connections
    steady = BASE_RSS_BYTES + sessions * RSS_PER_SESSION_BYTES
    assert quantity(resources["requests"]["memory"]) >= steady, f"{sessions} sessions need ~{steady / 2**20:.0f} MiB"
    assert quantity(resources["limits"]["memory"]) >= quantity(resources["requests"]["memory"])


def test_replicas_spread_over_nodes_and_scale_on_cpu(base: Base) -> None:
    hpa, deployment = base.one("HorizontalPodAutoscaler"), base.one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2
    # The HPA owns the count; a number in the Deployment would undo its scaling on every apply.
    assert deployment["spec"].get("replicas", hpa["spec"]["minReplicas"]) >= hpa["spec"]["minReplicas"]
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    terms = base.pod["affinity"]["podAntiAffinity"]
    selectors = [
        t.get("podAffinityTerm", t)
        for t in terms.get("requiredDuringSchedulingIgnoredDuringExecution", [])
        + terms.get("preferredDuringSchedulingIgnoredDuringExecution", [])
    ]
    assert any(
        s["topologyKey"] == "kubernetes.io/hostname" and s["labelSelector"]["matchLabels"].items() <= base.pod_labels.items()
        for s in selectors
    )
    assert base.one("Deployment")["spec"]["selector"]["matchLabels"].items() <= base.pod_labels.items()


def test_service_exposes_the_public_port_only(base: Base) -> None:
    config = base.config(config_mount(base, dockerfile())[2])
    assert config.admin is not None
    service = base.one("Service")
    assert service["spec"]["selector"].items() <= base.pod_labels.items()
    targets = {base.container_port(p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {config.listen.port}, "the admin port must never be behind the public Service"


def test_disruption_budget_keeps_a_replica_serving(base: Base) -> None:
    pdb, hpa = base.one("PodDisruptionBudget"), base.one("HorizontalPodAutoscaler")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= base.pod_labels.items()
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert 1 <= pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_prometheus_scrapes_the_admin_port(base: Base, scrape: Scrape) -> None:
    config = base.config(config_mount(base, dockerfile())[2])
    assert config.admin is not None
    annotations = base.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(config.admin.port)
    assert annotations["prometheus.io/path"] == "/metrics" and scrape.status["/metrics"] == 200
    # The optional PodMonitor (Prometheus Operator) says the same.
    monitor = yaml.safe_load((K8S / "optional" / "podmonitor.yaml").read_text(encoding="utf-8"))
    assert monitor["spec"]["selector"]["matchLabels"].items() <= base.pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert base.container_port(endpoint["port"]) == config.admin.port and endpoint["path"] == "/metrics"


def test_readme_kubernetes_section_names_the_restart_keys_secret_and_grace_period(base: Base) -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"\n## Deploying on Kubernetes\n(.+?)\n## ", readme, re.DOTALL)
    assert section, "README has no 'Deploying on Kubernetes' section"
    text = section.group(1)
    missing = [key for key in RESTART_KEYS if f"`{key}`" not in text]
    assert not missing, f"the section does not name the restart-only keys {missing} (RESTART_KEYS)"
    (secret,) = base.env_from_secrets().values()
    assert secret["name"] in text
    assert f"terminationGracePeriodSeconds: {base.pod['terminationGracePeriodSeconds']}" in text
