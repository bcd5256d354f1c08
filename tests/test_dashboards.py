"""deploy/observability: the Prometheus scrape configuration and alert rules, the Grafana dashboard
and its provisioning, and how deploy/docker/compose.yaml wires them in.

Every series that a rule or a panel queries must be one the coordinator exposes
(``exposed_metric_names``), with counters only under rate()/increase() and histogram quantiles
over ``_bucket`` by ``le``. Nothing here needs Prometheus, Grafana or Docker; where ``promtool``
is installed (or named by $PROMTOOL) it also checks the files and runs the alerts against
synthetic series."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML comes with the dev extras (through amqtt)
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("PyYAML not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
OBSERVABILITY = ROOT / "deploy" / "observability"
PROMETHEUS_YML = OBSERVABILITY / "prometheus.yml"
ALERTS_YML = OBSERVABILITY / "alerts.yml"
GRAFANA = OBSERVABILITY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "fedprune.json"
COMPOSE = ROOT / "deploy" / "docker" / "compose.yaml"
JOB = "fedprune-coordinator"


def exposed_metric_names() -> frozenset[str]:
    """Every series name the coordinator's /metrics exposes.

    Fixture: the names as specified for the prometheus_client registry (issue 20). To be replaced
    by the names parsed from a real scrape of a running coordinator. Histograms are listed with
    their _bucket, _sum and _count series; prometheus_client's _created series may be included."""
    counters = [
        "fedprune_rounds_completed_total", "fedprune_updates_accepted_total", "fedprune_updates_rejected_total",
        "fedprune_updates_held_total", "fedprune_updates_gated_total", "fedprune_bytes_in_total",
        "fedprune_bytes_out_total", "fedprune_rounds_declined_total", "fedprune_revocations_applied_total",
        "fedprune_checkpoint_failures_total", "fedprune_reassembly_dropped_total", "fedprune_round_retries_total",
    ]
    gauges = [
        "fedprune_devices_online", "fedprune_devices_enrolled", "fedprune_device_importance",
        "fedprune_device_quality", "fedprune_current_round", "fedprune_global_accuracy", "fedprune_global_score",
        "fedprune_global_loss",
        "fedprune_devices_excluded", "fedprune_reassembly_buffered_bytes",
        "fedprune_last_round_completed_timestamp_seconds", "fedprune_round_deadline_seconds",
        "fedprune_broker_connected",
    ]
    histograms = [
        "fedprune_round_duration_seconds", "fedprune_time_to_quorum_seconds", "fedprune_update_size_bytes",
        "fedprune_device_training_seconds",
    ]
    return frozenset(counters + gauges + [f"{h}{suffix}" for h in histograms for suffix in ("_bucket", "_sum", "_count")])


# Series Prometheus makes itself for every target; the rules may use them, /metrics never has them.
SYNTHETIC = frozenset({"up"})
COUNTER_SUFFIXES = ("_total", "_bucket", "_sum", "_count")
RATE_FUNCTIONS = ("rate", "irate", "increase")
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
                      "and", "or", "unless", "atan2", "inf", "nan"})


def family(name: str) -> str:
    """A series name's metric family: a histogram's series and _created series map to their metric."""
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def strip_promql(expr: str) -> str:
    """``expr`` without string literals, label matchers, ranges, grouping clauses and offsets: what
    remains names only series, functions (followed by a parenthesis), operators and numbers.
    Grafana's variables ($window, ${device}) only occur inside the parts removed."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\boffset\s+-?[0-9a-z]+", " ", text)
    text = re.sub(r"@\s*(?:start\(\)|end\(\)|[0-9.]+)", " ", text)
    return text


def series_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects."""
    text = strip_promql(expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        name = match.group()
        if name.lower() in KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def rated_series(expr: str) -> set[str]:
    """Series passed to rate(), irate() or increase()."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(rf"\b(?:{'|'.join(RATE_FUNCTIONS)})\s*\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", text))


def test_the_promql_reader_finds_series_and_nothing_else() -> None:
    expr = ('sum by (device, reason) (increase(fedprune_updates_gated_total{instance="$instance", device=~"$device"}'
            '[$window])) / on (job) group_left ignoring(x) fedprune_devices_online offset 5m > 0.5 and up == 0 '
            'or histogram_quantile(0.9, sum by (le) (rate(a_b_bucket[$__rate_interval]))) * 1e3 '
            'and label_replace(time() - b_seconds, "dst", "$1", "src", "(.*)")')
    assert series_names(expr) == {"fedprune_updates_gated_total", "fedprune_devices_online", "up", "a_b_bucket",
                                  "b_seconds"}
    assert rated_series(expr) == {"fedprune_updates_gated_total", "a_b_bucket"}


def check_expression(expr: str, where: str) -> set[str]:
    names = series_names(expr)
    assert names, f"{where}: no series in {expr!r}"
    allowed = exposed_metric_names() | SYNTHETIC
    unknown = names - allowed
    assert not unknown, f"{where}: {sorted(unknown)} not exposed by the coordinator (in {expr!r})"
    for name in rated_series(expr):
        assert name.endswith(COUNTER_SUFFIXES), f"{where}: rate/increase of {name}, which is not a counter"
    for name in names - rated_series(expr):
        if name.endswith("_bucket"):
            pytest.fail(f"{where}: {name} used outside rate()/increase()")
    if "histogram_quantile" in expr:
        assert re.search(r"\bby\s*\([^()]*\ble\b", expr), f"{where}: histogram_quantile must keep le: {expr!r}"
        assert all(n.endswith("_bucket") for n in rated_series(expr)), f"{where}: quantile of a non-bucket series"
    return names


# --- alert rules ---------------------------------------------------------------------------------


def rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    assert groups
    return [rule for group in groups for rule in group["rules"]]


REQUIRED_ALERTS = {"FedpruneNoRoundCompleted", "FedpruneDevicesOffline", "FedpruneUpdatesGated",
                   "FedpruneCoordinatorDown", "FedpruneBrokerDisconnected", "FedpruneCheckpointFailures"}


def test_alert_rules_are_complete() -> None:
    names = [rule.get("alert") for rule in rules()]
    assert None not in names, "alerts.yml holds alerting rules only"
    assert len(names) == len(set(names)), "duplicate alert names"
    assert REQUIRED_ALERTS <= set(names), sorted(REQUIRED_ALERTS - set(names))
    for rule in rules():
        where = rule["alert"]
        assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), where
        assert re.fullmatch(r"[0-9]+[smhdwy]", str(rule.get("for", ""))), f"{where}: for"
        assert rule.get("labels", {}).get("severity") in {"critical", "warning", "info"}, f"{where}: severity"
        annotations = rule.get("annotations", {})
        assert annotations.get("summary", "").strip(), f"{where}: summary"
        assert annotations.get("description", "").strip(), f"{where}: description"


def test_alert_expressions_query_exposed_series() -> None:
    for rule in rules():
        check_expression(rule["expr"], rule["alert"])


def test_alerts_tell_the_operator_where_to_look() -> None:
    for rule in rules():
        text = rule["annotations"]["description"]
        assert "fedprune-coordinator" in text or "status page" in text, rule["alert"]
    texts = " ".join(r["annotations"]["description"] for r in rules())
    assert "fedprune-coordinator status" in texts and "status page at / on the metrics port" in texts


def test_alert_conditions_match_the_issue() -> None:
    by_name = {rule["alert"]: rule["expr"] for rule in rules()}
    stalled = by_name["FedpruneNoRoundCompleted"]
    assert {"fedprune_last_round_completed_timestamp_seconds", "fedprune_round_deadline_seconds"} <= series_names(stalled)
    assert re.search(r"time\(\)\s*-\s*fedprune_last_round_completed_timestamp_seconds", stalled)
    assert re.search(r"fedprune_last_round_completed_timestamp_seconds\s*>\s*0", stalled), "guard before the first round"
    assert re.search(r"fedprune_devices_online\s*/\s*fedprune_devices_enrolled", by_name["FedpruneDevicesOffline"])
    assert "increase(fedprune_updates_gated_total" in by_name["FedpruneUpdatesGated"]
    assert re.fullmatch(rf'up\{{job="{JOB}"\}}\s*==\s*0', by_name["FedpruneCoordinatorDown"].strip())
    assert "fedprune_broker_connected" in by_name["FedpruneBrokerDisconnected"]
    assert "fedprune_checkpoint_failures_total" in by_name["FedpruneCheckpointFailures"]


# --- Prometheus configuration ---------------------------------------------------------------------


def test_prometheus_scrapes_the_coordinator_with_its_token_and_loads_the_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    rule_files = config["rule_files"]
    assert [(PROMETHEUS_YML.parent / f).resolve() for f in rule_files] == [ALERTS_YML.resolve()]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"] == "/run/secrets/metrics_token"
    (target,) = [t for sc in job["static_configs"] for t in sc["targets"]]
    host, _, port = target.rpartition(":")
    assert host == "coordinator", "the compose service name"
    from fedprune.coordinator.config import MetricsSection

    assert int(port) == MetricsSection().port == compose_metrics_port()


# --- Grafana --------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # collapsed rows keep theirs inside
    return found


def test_dashboard_is_a_current_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "fedprune-coordinator" and board["title"]
    assert 39 <= board["schemaVersion"] <= 42  # Grafana 11 to 13; 42 is the last v1 schema
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["DS_PROMETHEUS"]["current"]["value"] == provisioned_datasource()["uid"]
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_panel_has_a_title_and_queries_exposed_series() -> None:
    for panel in panels(dashboard()):
        assert panel.get("title", "").strip(), f"panel {panel.get('id')} has no title"
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']}: no target"
        for target in targets:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], panel["title"]
            check_expression(target["expr"], panel["title"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_variables_query_exposed_series() -> None:
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"${variable['name']}: {query!r}"
        check_expression(match.group(1), f"${variable['name']}")


def test_dashboard_shows_every_exposed_metric() -> None:
    queried = {family(name) for panel in panels(dashboard()) for t in panel.get("targets", [])
               for name in series_names(t["expr"])}
    exposed = {family(name) for name in exposed_metric_names()}
    assert exposed <= queried, f"not on the dashboard: {sorted(exposed - queried)}"


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels(dashboard())}
    everything = " ".join(exprs.values())
    for quantiled in ("fedprune_update_size_bytes", "fedprune_round_duration_seconds",
                      "fedprune_time_to_quorum_seconds", "fedprune_device_training_seconds"):
        assert re.search(rf"histogram_quantile\([^,]+,\s*sum by \(le\) \(rate\({quantiled}_bucket", everything), quantiled
    for by_label, metric in (("reason", "fedprune_updates_rejected_total"), ("device, reason", "fedprune_updates_gated_total"),
                             ("reason", "fedprune_rounds_declined_total")):
        assert re.search(rf"sum by \({by_label}\) \(increase\({metric}", everything), metric
    for per_device in ("fedprune_device_importance", "fedprune_device_quality"):
        (title,) = [title for title, expr in exprs.items() if per_device in expr]
        assert "{{device}}" in json.dumps([p for p in panels(dashboard()) if p["title"] == title]), title


def provisioned_datasource() -> dict:
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    return datasource


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    datasource = provisioned_datasource()
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fedprune.yaml").read_text())["providers"]
    assert provider["type"] == "file"
    mounts = dict(volume.split(":")[1::-1] for volume in compose()["services"]["grafana"]["volumes"]
                  if volume.endswith(":ro"))
    source = mounts[provider["options"]["path"]]
    assert (COMPOSE.parent / source).resolve() == DASHBOARD.parent.resolve()


# --- compose --------------------------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_metrics_port() -> int:
    return int(compose()["services"]["coordinator"]["environment"]["FEDPRUNE_COORDINATOR_METRICS_PORT"])


def test_compose_observability_profile_mounts_files_that_exist() -> None:
    services = compose()["services"]
    for name, image in (("prometheus", r"prom/prometheus:v[0-9]+\.[0-9]+\.[0-9]+"),
                        ("grafana", r"grafana/grafana:[0-9]+\.[0-9]+\.[0-9]+")):
        service = services[name]
        assert service["profiles"] == ["observability"], name
        assert re.fullmatch(image, service["image"]), f"{name}: pin a version tag, not {service['image']}"
        binds = [v.split(":") for v in service["volumes"] if v.startswith((".", "/"))]
        assert binds, name
        for source, _target, *mode in binds:
            assert mode == ["ro"], f"{name}: mount {source} read-only"
            assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
    for service in ("mosquitto", "coordinator"):
        assert "profiles" not in services[service], f"{service} must start without a profile"
    prometheus_mounts = {target: source for source, target, *_ in (v.split(":") for v in services["prometheus"]["volumes"])}
    config_dir = "/etc/prometheus/"
    assert (COMPOSE.parent / prometheus_mounts[config_dir + "prometheus.yml"]).resolve() == PROMETHEUS_YML
    for rule_file in yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]:
        assert (COMPOSE.parent / prometheus_mounts[config_dir + rule_file]).resolve() == (OBSERVABILITY / rule_file)


def test_compose_lets_prometheus_reach_the_coordinator_with_a_token() -> None:
    spec = compose()
    coordinator, prometheus = spec["services"]["coordinator"], spec["services"]["prometheus"]
    env = coordinator["environment"]
    assert env["FEDPRUNE_COORDINATOR_METRICS_HOST"] == "0.0.0.0"
    assert env["FEDPRUNE_COORDINATOR_METRICS_TOKEN_FILE"] == "/run/secrets/metrics_token"
    assert "metrics_token" in coordinator["secrets"] and "metrics_token" in prometheus["secrets"]
    assert spec["secrets"]["metrics_token"]["file"].startswith("./secrets/")
    for service in spec["services"].values():
        for port in service.get("ports", []):
            if service is not spec["services"]["mosquitto"]:
                assert port.startswith("127.0.0.1:"), f"{port}: publish dashboards and metrics on loopback only"
    from fedprune.coordinator.config import load_config

    # The coordinator accepts these settings (a non-loopback host needs the token file).
    config = load_config(None, env={k: str(v) for k, v in env.items()})
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", compose_metrics_port())
    assert str(config.metrics.token_file) == "/run/secrets/metrics_token"


# --- promtool (where installed) -------------------------------------------------------------------


def promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        message = "promtool not installed (scripts/bootstrap.sh --test-tools, or Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + ": CI must check the alert rules, not skip them")
        pytest.skip(message)
    return found


def test_promtool_accepts_the_rules_and_the_configuration(tmp_path: Path) -> None:
    tool = promtool()
    token = tmp_path / "token"
    token.write_text("x" * 64 + "\n")
    shutil.copy(ALERTS_YML, tmp_path / "alerts.yml")
    # promtool checks that credentials_file exists: point a copy at a stand-in.
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_YML.read_text().replace("/run/secrets/metrics_token", str(token)))
    for args in (["check", "rules", str(tmp_path / "alerts.yml")], ["check", "config", str(tmp_path / "prometheus.yml")]):
        result = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def series(metric: str, instance: str, values: str, **labels: str) -> dict:
    label_text = ",".join(f'{k}="{v}"' for k, v in {"job": JOB, "instance": instance, **labels}.items())
    return {"series": f"{metric}{{{label_text}}}", "values": values}


def firing(alert: str, at: str, *instances: str, **labels: str) -> dict:
    severity = {r["alert"]: r["labels"]["severity"] for r in rules()}[alert]
    return {"eval_time": at, "alertname": alert,
            "exp_alerts": [{"exp_labels": {"job": JOB, "instance": i, "severity": severity, **labels}} for i in instances]}


# Synthetic series, one minute apart, starting at Unix time 0 (so time() is the minute × 60).
ALERT_CASES = [
    {  # Rounds: "stalled" committed at t=60 s and then nothing (deadline 120 s: alert past 4 × 120 s
       # + for 5m); "fresh" never committed (only the since-start alert, after 30m); "healthy" every minute.
        "input_series": [
            series("fedprune_round_deadline_seconds", i, "120x40") for i in ("stalled", "fresh", "healthy")
        ] + [
            series("fedprune_last_round_completed_timestamp_seconds", "stalled", "60x40"),
            series("fedprune_last_round_completed_timestamp_seconds", "fresh", "0x40"),
            series("fedprune_last_round_completed_timestamp_seconds", "healthy", "0+60x40"),
        ],
        "alert_rule_test": [
            firing("FedpruneNoRoundCompleted", "12m"),  # pending
            firing("FedpruneNoRoundCompleted", "16m", "stalled"),
            firing("FedpruneNoRoundCompleted", "35m", "stalled"),
            firing("FedpruneNoRoundSinceStart", "29m"),
            firing("FedpruneNoRoundSinceStart", "31m", "fresh"),
        ],
    },
    {  # Devices: 40 % offline is fine, 60 % fires after 15m, nothing enrolled never does.
        "input_series": [
            series("fedprune_devices_enrolled", "a", "10x40"), series("fedprune_devices_online", "a", "6x40"),
            series("fedprune_devices_enrolled", "b", "10x40"), series("fedprune_devices_online", "b", "4x40"),
            series("fedprune_devices_enrolled", "c", "0x40"), series("fedprune_devices_online", "c", "0x40"),
        ],
        "alert_rule_test": [firing("FedpruneDevicesOffline", "10m"), firing("FedpruneDevicesOffline", "20m", "b")],
    },
    {  # Gated updates: pi-1's first gate (its series appears at 1) at 35m; pi-2 gated again at 41m;
       # pi-3 was gated before this Prometheus started (no report); pi-4 exists at 0.
        "input_series": [
            series("up", "a", "1x90"),
            series("fedprune_updates_gated_total", "a", "_x35 1x55", device="pi-1", reason="chance"),
            series("fedprune_updates_gated_total", "a", "1x40 2x50", device="pi-2", reason="sybil"),
            series("fedprune_updates_gated_total", "a", "1x90", device="pi-3", reason="direction"),
            series("fedprune_updates_gated_total", "a", "0x90", device="pi-4", reason="chance"),
        ],
        "alert_rule_test": [
            firing("FedpruneUpdatesGated", "5m"),
            firing("FedpruneUpdatesGated", "30m"),
            {"eval_time": "45m", "alertname": "FedpruneUpdatesGated", "exp_alerts": [
                {"exp_labels": {"job": JOB, "instance": "a", "severity": "warning", "device": d, "reason": r}}
                for d, r in (("pi-1", "chance"), ("pi-2", "sybil"))]},
            firing("FedpruneUpdatesGated", "85m"),
        ],
    },
    {  # The coordinator stops answering at 6m; the broker link flaps on "a" and goes down on "b";
       # a checkpoint write fails at 20m.
        "input_series": [
            series("up", "a", "1x5 0x20"),
            series("fedprune_broker_connected", "a", "1 0 1 0 1 0 1 0 1 0 1 0 1"),
            series("fedprune_broker_connected", "b", "1 1 0x10"),
            series("fedprune_checkpoint_failures_total", "a", "0x19 1x40"),
        ],
        "alert_rule_test": [
            firing("FedpruneCoordinatorDown", "7m"),
            firing("FedpruneCoordinatorDown", "9m", "a"),
            firing("FedpruneBrokerDisconnected", "10m", "b"),
            firing("FedpruneCheckpointFailures", "15m"),
            firing("FedpruneCheckpointFailures", "25m", "a"),
            firing("FedpruneCheckpointFailures", "50m"),
        ],
    },
]


def test_alerts_fire_when_they_should(tmp_path: Path) -> None:
    tool = promtool()
    # promtool compares annotations too: test the conditions on a copy without them.
    spec = yaml.safe_load(ALERTS_YML.read_text())
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(spec))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", **case} for case in ALERT_CASES]}
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([tool, "test", "rules", "tests.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
