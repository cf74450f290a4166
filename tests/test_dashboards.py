"""Static checks of the monitoring configuration: Grafana's provisioning and dashboards, and
Prometheus' alert rules. Grafana is not needed; promtool (on PATH, or else the one inside the
stack's Prometheus image, PROMETHEUS_IMAGE, run with Docker as in CI) parses every dashboard query
and unit-tests every alert rule against synthetic series.

Other tests (the live stack) import:
  dashboard_queries()  -> [(dashboard uid, panel title, expr)]  every target, Grafana variables unexpanded
  alert_expressions()  -> [(alert name, expr)]
  render_expr(expr)    -> the expr with Grafana's variables replaced by sample values, ready for Prometheus
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DASHBOARDS_DIR = REPO / "docker" / "grafana" / "dashboards"
DASHBOARD_FILES = {
    "fedlora-federation": DASHBOARDS_DIR / "federation.json",
    "fedlora-organisation": DASHBOARDS_DIR / "organisation.json",
}
DASHBOARD_TITLES = {"fedlora-federation": "Federation overview", "fedlora-organisation": "Organisation"}
DATASOURCES_FILE = REPO / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS_FILE = REPO / "docker" / "grafana" / "provisioning" / "dashboards" / "fedlora.yaml"
ALERTS_FILE = REPO / "docker" / "prometheus" / "alerts.yml"
COMPOSE_FILES = [REPO / "compose.yaml", REPO / "compose.gpu.yaml"]

DATASOURCE_UID = "fedlora-prometheus"
DATASOURCE = {"type": "prometheus", "uid": DATASOURCE_UID}
DASHBOARDS_PATH = "/var/lib/grafana/dashboards"
PROVISIONING_PATH = "/etc/grafana/provisioning"
ALERT_NAMES = {"FedloraNodeOffline", "FedloraNoRoundProgress", "FedloraNonFiniteLoss", "FedloraCertificateExpiringSoon"}
PANEL_TYPES = {"timeseries", "stat", "table", "gauge", "row"}

# Grafana's built-in variables ($__rate_interval ...) and sample values for the dashboards' own.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__interval_ms": "15000", "__range": "1h",
                    "__range_s": "3600", "__range_ms": "3600000"}
SAMPLE_VARIABLES = {"org": "org-1", "gpu": ".*"}
# $var, ${var}, ${var:format}, [[var]]
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]")


# --- helpers, also for other tests ------------------------------------------------------------

def load_dashboards() -> dict[str, dict]:
    return {uid: json.loads(path.read_text()) for uid, path in DASHBOARD_FILES.items()}


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, rows and the panels inside collapsed rows included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def variables_in(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in VARIABLE.finditer(expr)}


def render_expr(expr: str, values: dict[str, str] | None = None) -> str:
    """The expr as Grafana would send it, with sample values for the dashboard variables."""
    values = {**GRAFANA_BUILTINS, **SAMPLE_VARIABLES, **(values or {})}

    def sub(m: re.Match) -> str:
        name = next(g for g in m.groups() if g)
        return values.get(name, m.group(0))

    return VARIABLE.sub(sub, expr)


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every target of every panel."""
    return [(uid, panel.get("title", ""), target.get("expr", ""))
            for uid, dashboard in load_dashboards().items()
            for panel in all_panels(dashboard)
            for target in panel.get("targets", [])]


def alert_rules() -> list[dict]:
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]


def alert_expressions() -> list[tuple[str, str]]:
    """(alert name, expr) for every alerting rule."""
    return [(rule["alert"], rule["expr"]) for rule in alert_rules()]


def prometheus_image() -> str:
    """The stack's Prometheus image: the shell's PROMETHEUS_IMAGE (CI: the Debian stand-in), else .env's."""
    shipped = re.search(r"^PROMETHEUS_IMAGE=(.+)$", (REPO / ".env").read_text(), re.M).group(1)
    return os.environ.get("PROMETHEUS_IMAGE") or shipped


def promtool(paths: tuple[Path, ...] = ()) -> list[str]:
    """The promtool command: on PATH, else inside the Prometheus image with `paths` mounted read-only
    where they are here, as this user (pytest's temporary folders are private)."""
    path = shutil.which("promtool")
    if path is not None:
        return [path]
    image = prometheus_image()
    if shutil.which("docker") is None or subprocess.run(["docker", "image", "inspect", image],
                                                        capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"no promtool on PATH and no image {image} to run it from: .ci/run builds it (make local-images)")
        pytest.skip(f"promtool is not on PATH and the image {image} is not here")
    mounts = [a for d in sorted({str(p if p.is_dir() else p.parent) for p in paths}) for a in ("-v", f"{d}:{d}:ro")]
    return ["docker", "run", "--rm", "--network", "none", "--user", f"{os.getuid()}:{os.getgid()}", *mounts,
            "--entrypoint", "/bin/promtool", image]


def run_promtool(*args: str) -> subprocess.CompletedProcess:
    paths = tuple(Path(a) for a in args if a.startswith("/"))
    proc = subprocess.run([*promtool(paths), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# --- dashboards -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    return load_dashboards()


@pytest.mark.parametrize("uid", sorted(DASHBOARD_FILES))
def test_dashboard_is_valid_json_with_its_settings(uid):
    dashboard = json.loads(DASHBOARD_FILES[uid].read_text())
    assert dashboard["uid"] == uid
    assert dashboard["title"] == DASHBOARD_TITLES[uid]
    assert dashboard["schemaVersion"] == 39
    assert dashboard["refresh"] == "10s"
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard.get("id") is None, "provisioned dashboards carry no database id"
    assert all_panels(dashboard), "no panels"


def test_dashboard_uids_and_titles_are_distinct(dashboards):
    assert len({d["uid"] for d in dashboards.values()}) == len(dashboards)
    assert len({d["title"] for d in dashboards.values()}) == len(dashboards)


@pytest.mark.parametrize("uid", sorted(DASHBOARD_FILES))
def test_panel_ids_are_unique(dashboards, uid):
    ids = [panel.get("id") for panel in all_panels(dashboards[uid])]
    assert None not in ids
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"


@pytest.mark.parametrize("uid", sorted(DASHBOARD_FILES))
def test_every_panel_and_target_uses_the_pinned_datasource(dashboards, uid):
    for panel in all_panels(dashboards[uid]):
        assert panel.get("datasource") == DATASOURCE, f"panel {panel.get('title')!r}: {panel.get('datasource')}"
        for target in panel.get("targets", []):
            assert target.get("datasource") == DATASOURCE, f"panel {panel.get('title')!r} target {target.get('refId')}"
    for variable in dashboards[uid].get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable.get("datasource") == DATASOURCE, f"variable {variable['name']}"


@pytest.mark.parametrize("uid", sorted(DASHBOARD_FILES))
def test_every_panel_has_targets_with_an_expr(dashboards, uid):
    for panel in all_panels(dashboards[uid]):
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel.get('title')!r} has no targets"
        ref_ids = [t.get("refId") for t in targets]
        assert len(ref_ids) == len(set(ref_ids)) and None not in ref_ids, f"panel {panel.get('title')!r}: {ref_ids}"
        for target in targets:
            expr = target.get("expr")
            assert isinstance(expr, str) and expr.strip(), f"panel {panel.get('title')!r} target {target.get('refId')}"
            assert expr.count("(") == expr.count(")"), f"unbalanced parentheses: {expr}"


@pytest.mark.parametrize("uid", sorted(DASHBOARD_FILES))
def test_every_variable_used_is_defined(dashboards, uid):
    defined = {v["name"] for v in dashboards[uid].get("templating", {}).get("list", [])}
    for panel in all_panels(dashboards[uid]):
        for target in panel.get("targets", []):
            for name in variables_in(target["expr"]) | variables_in(target.get("legendFormat", "")):
                assert name in defined or name in GRAFANA_BUILTINS, \
                    f"panel {panel.get('title')!r} uses ${name}, which is not in templating ({sorted(defined)})"
    for name in defined:
        assert name in SAMPLE_VARIABLES, f"give ${name} a sample value in SAMPLE_VARIABLES"


def test_organisation_dashboard_variables(dashboards):
    variables = {v["name"]: v for v in dashboards["fedlora-organisation"]["templating"]["list"]}
    assert variables["org"]["type"] == "query"
    assert variables["org"]["query"] == variables["org"]["definition"] == "label_values(fedlora_node_up, org)"
    assert variables["gpu"]["query"] == "label_values(DCGM_FI_DEV_GPU_UTIL, gpu)"
    assert variables["gpu"]["includeAll"], "$gpu must work when a CPU host has no GPU"
    exprs = [t["expr"] for p in all_panels(dashboards["fedlora-organisation"]) for t in p.get("targets", [])]
    assert any('org="$org"' in e for e in exprs)
    assert any("DCGM_FI_DEV_" in e for e in exprs)


@pytest.mark.parametrize("uid", sorted(DASHBOARD_FILES))
def test_panel_types_units_and_layout(dashboards, uid):
    cells = {}
    for panel in dashboards[uid]["panels"]:  # top level: the grid Grafana lays out
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, f"{panel['title']!r}: {grid}"
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    for panel in all_panels(dashboards[uid]):
        assert panel["type"] in PANEL_TYPES, f"{panel['title']!r}: {panel['type']}"
        assert panel.get("title"), f"panel {panel.get('id')} has no title"
        if panel["type"] in {"timeseries", "stat", "gauge"}:
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']!r} has no unit"


def test_dashboard_queries_helper(dashboards):
    queries = dashboard_queries()
    expected = sum(len(p.get("targets", [])) for d in dashboards.values() for p in all_panels(d))
    assert len(queries) == expected > 0
    assert {uid for uid, _, _ in queries} == set(DASHBOARD_FILES)
    assert all(title and expr for _, title, expr in queries)
    for _, _, expr in queries:
        assert not VARIABLE.search(render_expr(expr)), render_expr(expr)


# --- provisioning -----------------------------------------------------------------------------

def test_datasource_provisioning_pins_the_uid():
    config = yaml.safe_load(DATASOURCES_FILE.read_text())
    assert config["apiVersion"] == 1
    [source] = config["datasources"]
    assert source["name"] == "Prometheus"
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == DATASOURCE["type"]
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True
    assert source["editable"] is False


def _volumes(service: dict) -> list[tuple[str, str]]:
    """(source, target) of a Compose service's bind mounts, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) >= 2:
                out.append((parts[0], parts[1]))
        else:
            out.append((str(volume.get("source", "")), str(volume.get("target", ""))))
    return out


def test_dashboard_provider_loads_the_dashboards():
    config = yaml.safe_load(PROVIDERS_FILE.read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "Federation"
    assert provider["options"]["path"] == DASHBOARDS_PATH

    grafana = None
    for path in COMPOSE_FILES:
        if path.exists():
            services = (yaml.safe_load(path.read_text()) or {}).get("services") or {}
            grafana = grafana or services.get("grafana")
    if grafana is None:
        pytest.skip("no grafana service in the Compose files")
    mounts = {target: Path(source).as_posix() for source, target in _volumes(grafana)}
    assert mounts.get(DASHBOARDS_PATH) == DASHBOARDS_DIR.relative_to(REPO).as_posix(), mounts
    assert mounts.get(PROVISIONING_PATH) == PROVIDERS_FILE.parents[1].relative_to(REPO).as_posix(), mounts


# --- alert rules ------------------------------------------------------------------------------

def test_alert_rules_are_complete():
    config = yaml.safe_load(ALERTS_FILE.read_text())
    assert [g["name"] for g in config["groups"]] == ["fedlora"]
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert ALERT_NAMES <= set(rules), f"missing: {sorted(ALERT_NAMES - set(rules))}"
    for name, rule in rules.items():
        assert re.fullmatch(r"\d+[smhd]", str(rule.get("for", ""))), f"{name}: for: {rule.get('for')!r}"
        assert rule.get("labels", {}).get("severity") in {"info", "warning", "critical"}, name
        assert rule.get("annotations", {}).get("summary", "").strip(), f"{name} has no summary"
        assert rule.get("annotations", {}).get("description", "").strip(), f"{name} has no description"
        assert rule["expr"].strip()
    for name in ("FedloraNodeOffline",):
        assert "$labels.org" in rules[name]["annotations"]["summary"]
    assert dict(alert_expressions()).keys() == rules.keys()


def test_promtool_checks_the_rules():
    run_promtool("check", "rules", str(ALERTS_FILE))


def test_promtool_parses_every_dashboard_query(tmp_path):
    """Each query, variables expanded, as a recording rule: promtool parses (and so validates) them all."""
    rules = [{"record": f"fedlora_dashboard_check:query{i}", "expr": render_expr(expr)}
             for i, (_, _, expr) in enumerate(dashboard_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    run_promtool("check", "rules", str(path))


def _series(name: str, values: str) -> dict:
    return {"series": name, "values": values}


def _repeat(value: str, n: int) -> str:
    return " ".join([value] * n)


# promtool compares annotations exactly, so the unit tests run on a copy without them
# (`promtool check rules` above validates the annotation templates).
ALERT_UNIT_TESTS = [
    {   # a node whose series vanish (stale: target gone), one that stays up, one that reports 0
        "interval": "1m",
        "input_series": [
            _series('fedlora_node_up{org="org-1"}', "1x10 stale"),
            _series('fedlora_node_up{org="org-2"}', "1x120"),
            _series('fedlora_node_up{org="org-3"}', "1x5 0x120"),
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "FedloraNodeOffline", "exp_alerts": []},
            {"eval_time": "14m", "alertname": "FedloraNodeOffline", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "org": "org-1"}},
                {"exp_labels": {"severity": "warning", "org": "org-3"}},
            ]},
            # gone for more than the hour: no longer part of the federation
            {"eval_time": "80m", "alertname": "FedloraNodeOffline", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "org": "org-3"}},
            ]},
        ],
    },
    {   # a run that completes three rounds, then hangs
        "interval": "1m",
        "input_series": [
            _series("fedlora_run_active", "1x150"),
            _series("fedlora_rounds_completed_total", "0+1x3 3x150"),
            _series("fedlora_round_current", "1+1x3 4x150"),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "FedloraNoRoundProgress", "exp_alerts": []},
            {"eval_time": "62m", "alertname": "FedloraNoRoundProgress", "exp_alerts": []},
            {"eval_time": "75m", "alertname": "FedloraNoRoundProgress", "exp_alerts": [
                {"exp_labels": {"severity": "critical"}},
            ]},
        ],
    },
    {   # an active run whose counters have no samples at all
        "interval": "1m",
        "input_series": [_series("fedlora_run_active", "1x100")],
        "alert_rule_test": [
            {"eval_time": "70m", "alertname": "FedloraNoRoundProgress", "exp_alerts": [
                {"exp_labels": {"severity": "critical"}},
            ]},
        ],
    },
    {   # a run that keeps completing rounds
        "interval": "1m",
        "input_series": [
            _series('fedlora_run_active{case="progress"}', "1x150"),
            _series('fedlora_rounds_completed_total{case="progress"}', "0+1x150"),
            _series('fedlora_round_current{case="progress"}', "1+1x150"),
        ],
        "alert_rule_test": [
            {"eval_time": "100m", "alertname": "FedloraNoRoundProgress", "exp_alerts": []},
        ],
    },
    {   # a run started 25 minutes ago after an idle hour
        "interval": "1m",
        "input_series": [_series("fedlora_run_active", "0x60 1x40")],
        "alert_rule_test": [
            {"eval_time": "85m", "alertname": "FedloraNoRoundProgress", "exp_alerts": []},
        ],
    },
    {   # NaN, +Inf and -Inf losses; finite ones stay quiet
        "interval": "1m",
        "input_series": [
            _series('fedlora_train_loss{org="org-1"}', _repeat("NaN", 10)),
            _series('fedlora_heldout_loss{org="org-1"}', _repeat("Inf", 10)),
            _series('fedlora_train_loss{org="org-2"}', _repeat("0.5", 10)),
            _series('fedlora_heldout_loss{org="org-2"}', _repeat("0.6", 10)),
            _series("fedlora_federated_train_loss", _repeat("-Inf", 10)),
            _series("fedlora_federated_heldout_loss", _repeat("0.4", 10)),
            _series('fedlora_org_heldout_loss{org="org-3"}', _repeat("NaN", 10)),
            _series('fedlora_org_train_loss{org="org-3"}', _repeat("0.5", 10)),
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "FedloraNonFiniteLoss", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "org": "org-1", "loss": "train_loss"}},
                {"exp_labels": {"severity": "critical", "org": "org-1", "loss": "heldout_loss"}},
                {"exp_labels": {"severity": "critical", "loss": "federated_train_loss"}},
                {"exp_labels": {"severity": "critical", "org": "org-3", "loss": "org_heldout_loss"}},
            ]},
        ],
    },
    {   # 10 days left on the server certificate, a year on the CA
        "interval": "1m",
        "input_series": [
            _series('fedlora_certificate_expiry_seconds{cert="server"}', "864000-60x60"),
            _series('fedlora_certificate_expiry_seconds{cert="ca"}', "31536000-60x60"),
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "FedloraCertificateExpiringSoon", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "FedloraCertificateExpiringSoon", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "cert": "server"}},
            ]},
        ],
    },
]


def test_promtool_alert_unit_tests(tmp_path):
    rules = yaml.safe_load(ALERTS_FILE.read_text())
    stripped = copy.deepcopy(rules)
    for group in stripped["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(stripped, sort_keys=False))
    tested = {t["alertname"] for case in ALERT_UNIT_TESTS for t in case["alert_rule_test"]}
    assert ALERT_NAMES <= tested
    unit = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": ALERT_UNIT_TESTS}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(unit, sort_keys=False))
    run_promtool("test", "rules", str(tmp_path / "tests.yml"))


# Series that only a node's own exporter has: a coordinator has them only for the nodes its Prometheus
# scrapes (the demo organisations on its host), never for an organisation on its own host.
NODE_LEVEL = re.compile(r"\bfedlora_(train_|heldout_loss|images_skipped|sent_bytes|rounds_trained|last_round|accelerator)")


@pytest.mark.parametrize("uid", sorted(DASHBOARD_FILES))
def test_panels_say_whose_view_their_figures_are(dashboards, uid):
    """A panel of node-level series says that the coordinator lacks them for remote organisations, so an
    empty panel there reads as expected, not as a fault; the coordinator's view says it covers them all."""
    for panel in all_panels(dashboards[uid]):
        exprs = " ".join(t.get("expr", "") for t in panel.get("targets", []))
        description = panel.get("description", "")
        if NODE_LEVEL.search(exprs):
            assert "only for nodes its Prometheus scrapes" in description, (uid, panel["title"])
        elif "fedlora_org_" in exprs:
            assert "Coordinator's view" in description, (uid, panel["title"])
