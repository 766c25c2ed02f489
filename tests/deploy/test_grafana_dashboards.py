"""The Grafana provisioning files and dashboards in deploy/grafana, checked without a Grafana."""

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT

from tools.promstack import GRAFANA_MACROS, VARIABLE, dashboard_queries, iter_panels, live_form

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = GRAFANA / "dashboards"
DATASOURCES_YAML = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDER_YAML = GRAFANA / "provisioning" / "dashboards" / "qvl.yaml"
REQUIRED_DASHBOARDS = ("overview.json", "replicas.json", "gpus.json", "cache.json")
DASHBOARDS_PATH = "/var/lib/grafana/dashboards/qvl"

# Series names the dashboards may query. Mirrors router/metrics.py, serving/gpu_exporter.py, autoscale/metrics.py,
# vLLM's metrics and the recording rules in deploy/prometheus/rules: change it together with them.
_COUNTERS = (
    "qvl_requests_total",
    "qvl_retries_total",
    "qvl_upstream_errors_total",
    "qvl_rejections_total",
    "qvl_client_disconnects_total",
    "qvl_cache_requests_total",
    "qvl_cache_stored_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:mm_cache_queries_total",
    "vllm:mm_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "qvl_batch_lines_total",
    "qvl_batches_total",
    "qvl_admission_decisions_total",
    "qvl_version_requests_total",
    "qvl_rollout_decisions_total",
    "qvl_autoscaler_decisions_total",
    "qvl_autoscaler_actions_total",
)
_GAUGES = (
    "up",
    "qvl_replica_healthy",
    "qvl_replica_in_flight",
    "qvl_replica_engine_waiting",
    "qvl_replica_engine_running",
    "qvl_cache_store_up",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "qvl_gpu_exporter_up",
    "qvl_gpu_utilization_ratio",
    "qvl_gpu_memory_used_bytes",
    "qvl_gpu_memory_total_bytes",
    "qvl_gpu_temperature_celsius",
    "qvl_gpu_power_watts",
    "qvl_gpu_power_limit_watts",
    "qvl_batch_in_flight",
    "qvl_route_weight_percent",
    "qvl_autoscaler_desired_replicas",
    "qvl_autoscaler_actual_replicas",
    "qvl_autoscaler_needed_replicas",
    "qvl_autoscaler_demand_tokens_per_second",
    "qvl_autoscaler_capacity_tokens_per_second",
    "qvl_autoscaler_startup_seconds",
    "qvl_autoscaler_dry_run",
)
_HISTOGRAMS = (
    "qvl_request_duration_seconds",
    "qvl_time_to_first_token_seconds",
    "qvl_inter_token_latency_seconds",
    "qvl_cache_operation_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "qvl_version_time_to_first_token_seconds",
    "qvl_version_request_duration_seconds",
)
_RECORDING_RULES = (
    *(
        f"model:{base}:{q}_5m"
        for base in (
            "qvl_request_duration_seconds",
            "qvl_time_to_first_token_seconds",
            "qvl_inter_token_latency_seconds",
        )
        for q in ("p50", "p95", "p99")
    ),
    "model:qvl_requests:rate5m",
    "model:qvl_request_errors:ratio_5m",
    "qvl:cache_hit_ratio:5m",
    "host:qvl_gpu_utilization_ratio:avg",
)
ALLOWED_METRICS = frozenset(
    (
        *_COUNTERS,
        *_GAUGES,
        *(h + suffix for h in _HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")),
        *_RECORDING_RULES,
    )
)

# PromQL (Prometheus 2.42) functions and aggregation operators: any identifier followed by "(".
PROMQL_FUNCTIONS = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg",
        "avg_over_time",
        "bottomk",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count",
        "count_over_time",
        "count_values",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "exp",
        "floor",
        "group",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_sum",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "max",
        "max_over_time",
        "min",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_desc",
        "sqrt",
        "stddev",
        "stddev_over_time",
        "stdvar",
        "stdvar_over_time",
        "sum",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "topk",
        "vector",
        "year",
    ]
)
PROMQL_KEYWORDS = frozenset(
    [
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
    ]
)
# Rate windows must follow the dashboard; these are the only Grafana macros the live-query test substitutes.
UNITS = frozenset({"s", "percentunit", "reqps", "bytes", "celsius", "watt", "short"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[([^\]]*)\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?")
_REGEX_MATCHER = re.compile(r'[a-zA-Z_]\w*\s*(?:=~|!~)\s*"(?:[^"\\]|\\.)*"')


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) used by a PromQL expression, found roughly with regular expressions."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    metrics: set[str] = set()
    functions: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call:
            functions.add(name)
        elif name not in PROMQL_KEYWORDS:
            metrics.add(name)
    return metrics, functions


def variables_in(expr: str) -> set[str]:
    """Names of the template variables an expression refers to, Grafana's own $__ macros left out."""
    return {a or b for a, b in VARIABLE.findall(expr)} - {m.removeprefix("$") for m in GRAFANA_MACROS}


def load(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((DASHBOARDS / name).read_text())
    return result


def datasource_uid() -> str:
    config = yaml.safe_load(DATASOURCES_YAML.read_text())
    (source,) = config["datasources"]
    uid: str = source["uid"]
    return uid


def all_dashboards() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


DASHBOARD_FILES = [pytest.param(p, id=p.name) for p in all_dashboards()]
QUERIES = [q for p in all_dashboards() for q in dashboard_queries(p)]
QUERY_PARAMS = [pytest.param(q.dashboard, q.panel, q.expr, id=f"{q.dashboard} / {q.panel}") for q in QUERIES]


def test_required_dashboards_exist() -> None:
    assert {p.name for p in all_dashboards()} >= set(REQUIRED_DASHBOARDS)


def test_metric_name_parser() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (model, le) (rate(qvl_request_duration_seconds_bucket{model=~"$model", '
        'le!="+Inf"}[$__rate_interval]))) / on (model) group_left max(vllm:num_requests_running offset 5m) > 1e3'
    )
    metrics, functions = metric_names(expr)
    assert metrics == {"qvl_request_duration_seconds_bucket", "vllm:num_requests_running"}
    assert functions == {"histogram_quantile", "sum", "rate", "max"}
    assert metric_names('up{job="qvl-gpu"} == bool 0')[0] == {"up"}
    assert variables_in('x{a=~"$model|${host}|${instance:regex}"}[$__rate_interval]') == {"model", "host", "instance"}
    assert live_form('rate(x{a=~"$model"}[$__rate_interval])') == 'rate(x{a=~".*"}[1m])'


def test_uids_and_titles_are_unique() -> None:
    dashboards = [json.loads(p.read_text()) for p in all_dashboards()]
    uids = [d["uid"] for d in dashboards]
    titles = [d["title"] for d in dashboards]
    assert all(uids) and len(set(uids)) == len(uids)
    assert all(titles) and len(set(titles)) == len(titles)


@pytest.mark.parametrize("path", DASHBOARD_FILES)
def test_dashboard_settings(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["schemaVersion"] == 39
    assert "qvl" in dashboard["tags"]
    assert dashboard["time"] == {"from": "now-1h", "to": "now"}
    assert dashboard["refresh"] == "30s"
    assert dashboard.get("id") is None, "provisioned dashboards are found by uid"


@pytest.mark.parametrize("path", DASHBOARD_FILES)
def test_panels_are_complete(path: Path) -> None:
    panels = list(iter_panels(json.loads(path.read_text())["panels"]))
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids), "panel ids repeat"
    for panel in panels:
        assert panel.get("title") and panel.get("description"), panel
        assert panel["type"] in {"row", "timeseries", "stat", "gauge", "table"}, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in UNITS, panel["title"]


@pytest.mark.parametrize("path", DASHBOARD_FILES)
def test_grid_has_no_overlaps(path: Path) -> None:
    boxes = []
    for panel in iter_panels(json.loads(path.read_text())["panels"]):
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 24, panel["title"]
        if panel["type"] == "row":
            assert (x, w, h) == (0, 24, 1), panel["title"]
        for other_title, ox, oy, ow, oh in boxes:
            overlap = x < ox + ow and ox < x + w and y < oy + oh and oy < y + h
            assert not overlap, f"{panel['title']!r} overlaps {other_title!r}"
        boxes.append((panel["title"], x, y, w, h))


@pytest.mark.parametrize("path", DASHBOARD_FILES)
def test_targets_use_the_provisioned_datasource(path: Path) -> None:
    uid = datasource_uid()
    for panel in iter_panels(json.loads(path.read_text())["panels"]):
        targets = panel.get("targets", [])
        if targets:
            assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert all(ref_ids) and len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            assert "legendFormat" in target, panel["title"]
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]


@pytest.mark.parametrize("path", DASHBOARD_FILES)
def test_template_variables(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name, variable in variables.items():
        assert variable["type"] == "query", name
        assert variable["datasource"]["uid"] == datasource_uid(), name
        assert variable["includeAll"] and variable["multi"] and variable["allValue"] == ".*", name
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)", query)
        assert match and match.group(1) in ALLOWED_METRICS, (name, query)
    for query in dashboard_queries(path):
        panel_title, expr = query.panel, query.expr
        assert variables_in(expr) <= variables.keys(), (panel_title, expr)


def test_variables_per_dashboard() -> None:
    def names(dashboard: str) -> set[str]:
        return {v["name"] for v in load(dashboard)["templating"]["list"]}

    assert {"model", "pool"} <= names("overview.json")
    assert {"model", "instance"} <= names("replicas.json")
    assert "host" in names("gpus.json")


@pytest.mark.parametrize(("dashboard", "panel", "expr"), QUERY_PARAMS)
def test_query_rules(dashboard: str, panel: str, expr: str) -> None:
    metrics, functions = metric_names(expr)
    assert metrics, f"no metric found in {expr!r}"
    assert metrics <= ALLOWED_METRICS, f"unknown metrics {metrics - ALLOWED_METRICS} in {dashboard} / {panel}"
    assert functions <= PROMQL_FUNCTIONS, f"unknown functions {functions - PROMQL_FUNCTIONS} in {panel}"
    assert "absent" not in functions and not re.search(r"\bor\s+vector\s*\(", expr), panel
    assert all(window == "$__rate_interval" for window in _RANGE.findall(_STRING.sub('""', expr))), panel
    outside_regex = _REGEX_MATCHER.sub("", expr)
    for macro in GRAFANA_MACROS:
        outside_regex = outside_regex.replace(macro, "")
    assert "$" not in outside_regex, f"template variable outside a regex matcher in {panel}: {expr!r}"


def test_promtool_parses_every_query(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH; `make install` installs Debian's prometheus package")
    rules = [
        {"record": f"grafana_check:query_{i}", "expr": live_form(expr)}
        for i, expr in enumerate(q.expr for q in QUERIES)
    ]
    rules_file = tmp_path / "dashboards.rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "grafana-dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_datasource_provisioning() -> None:
    config = yaml.safe_load(DATASOURCES_YAML.read_text())
    assert config["apiVersion"] == 1
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["uid"] == "qvl-prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True


def test_dashboard_provider_points_at_the_dashboards() -> None:
    config = yaml.safe_load(PROVIDER_YAML.read_text())
    assert config["apiVersion"] == 1
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "qvl-cluster"
    assert provider["options"]["path"] == DASHBOARDS_PATH


def test_readme_lists_every_panel() -> None:
    readme = (GRAFANA / "README.md").read_text()
    for path in all_dashboards():
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] in readme
        for panel in iter_panels(dashboard["panels"]):
            assert panel["title"] in readme, f"{path.name}: panel {panel['title']!r} is not in the README"
