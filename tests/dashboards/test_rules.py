"""deploy/prometheus: the alert rules pass `promtool check rules` and their unit tests, every alert
has a firing and a silent case and a runbook section, and the short-`for:` copy for the
end-to-end test is derived from the real file."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import promql

ALERTS = promql.PROMETHEUS / "alerts.yml"
ALERTS_TEST = promql.PROMETHEUS / "alerts_test.yml"
DOC = promql.REPO / "docs" / "dashboards-and-alerts.md"


def load_short_rules() -> Any:
    spec = importlib.util.spec_from_file_location("short_rules", promql.PROMETHEUS / "short_rules.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=promql.PROMETHEUS)


def test_promtool_check_rules(promtool: str) -> None:
    r = run(promtool, "check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules(promtool: str) -> None:
    r = run(promtool, "test", "rules", str(ALERTS_TEST))
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_config_is_valid_and_loads_the_rules(promtool: str) -> None:
    r = run(promtool, "check", "config", str(promql.PROMETHEUS / "prometheus.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = yaml.safe_load((promql.PROMETHEUS / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    assert [j["job_name"] for j in cfg["scrape_configs"]] == ["pgcache-exporter"]


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    silent: set[str] = set()
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts without a firing case"
    assert names - silent == set(), "alerts without a silent case"
    assert (fires | silent) - names == set(), "tests of alerts that do not exist"


def test_alerts_are_documented_and_labelled() -> None:
    doc = DOC.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+\s+(.+)$", doc, re.M)}
    names = [r["alert"] for r in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for r in alert_rules():
        name = r["alert"]
        assert re.fullmatch(r"Pgcache[A-Z][A-Za-z]+", name), name
        assert r["labels"]["severity"] in ("critical", "warning", "info"), name
        ann = r["annotations"]
        assert ann["summary"] and "{{" in ann["summary"] or name == "PgcacheExporterAbsent", name
        assert "$value" in ann["description"] or "$labels" in ann["description"], name
        url = ann["runbook_url"]
        assert url == f"{load_short_rules().RUNBOOK_BASE}#{name.lower()}", (name, url)
        assert name.lower() in anchors, f"{name}: no section in {DOC.name}"


def test_alerts_use_exposed_metrics_and_rate_only_counters() -> None:
    types = promql.series_types()
    for r in alert_rules():
        expr = r["expr"]
        names = promql.metric_names(expr)
        assert names and names <= set(types), (r["alert"], sorted(names - set(types)))
        for func, metric, _ in promql.range_function_args(expr, promql.RANGE_FUNCS):
            assert types[metric] in ("counter", "histogram"), (r["alert"], func, metric)
        assert promql.function_calls(expr, promql.RANGE_FUNCS) == len(
            promql.range_function_args(expr, promql.RANGE_FUNCS)), r["alert"]


def test_short_rules_are_the_real_rules_with_short_windows(promtool: str, tmp_path: Path) -> None:
    short_rules = load_short_rules()
    out = short_rules.shorten_file(ALERTS, tmp_path / "short.yml", for_="2s", window="10s")
    r = subprocess.run([promtool, "check", "rules", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    real = alert_rules()
    short = [x for g in yaml.safe_load(out.read_text())["groups"] for x in g["rules"]]
    assert [x["alert"] for x in short] == [x["alert"] for x in real]
    for a, b in zip(real, short, strict=True):
        assert b["labels"] == a["labels"] and b["annotations"] == a["annotations"]
        assert b.get("for", "2s") == "2s"
        assert short_rules.RANGE.sub("[10s]", a["expr"]) == b["expr"]
        assert not re.search(r"\[(?!10s\])", b["expr"]), b["expr"]


def test_short_rules_refuse_subqueries() -> None:
    short_rules = load_short_rules()
    doc = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "max_over_time(rate(x_total[5m])[1h:1m]) > 0"}]}]}
    with pytest.raises(ValueError, match="subqueries"):
        short_rules.shorten(doc)


# -- conventions (issue 18) --------------------------------------------------------------------------
def test_runbook_urls_are_absolute() -> None:
    base = load_short_rules().RUNBOOK_BASE
    assert re.fullmatch(r"https://[^#\s]+\.md", base), base
    for r in alert_rules():
        assert r["annotations"]["runbook_url"].startswith(base + "#"), r["alert"]


def test_every_alert_links_a_dashboard_with_its_labels_as_variables() -> None:
    grafana = load_short_rules().GRAFANA_URL
    boards = {b["uid"]: b for b in (promql.load(p) for p in promql.dashboard_files())}
    for r in alert_rules():
        url = r["annotations"]["dashboard_url"]
        m = re.fullmatch(re.escape(grafana) + r"/d/([a-z0-9-]+)\?(.*)", url)
        assert m, (r["alert"], url)
        uid, query = m.groups()
        assert uid in boards, (r["alert"], uid)
        names = {v["name"] for v in boards[uid]["templating"]["list"]}
        for part in query.split("&"):
            var, _, value = part.partition("=")
            assert var.startswith("var-") and var[4:] in names, (r["alert"], var)
            label = re.fullmatch(r"\{\{ \$labels\.(\w+) \| urlquery \}\}", value)
            assert label, (r["alert"], part)
            assert label.group(1) in ("job", var[4:]), (r["alert"], part)
    slow = next(r for r in alert_rules() if r["alert"] == "PgcacheSlowStatement")
    assert "/d/pgcache-statement?" in slow["annotations"]["dashboard_url"]
    assert "var-queryid={{ $labels.queryid | urlquery }}" in slow["annotations"]["dashboard_url"]


def test_summaries_carry_no_value() -> None:
    """The summary names what is wrong; a number that changes at every evaluation belongs in the
    description, and only where the expression's value is the quantity (not a 0/1 flag)."""
    for r in alert_rules():
        assert "$value" not in r["annotations"]["summary"], r["alert"]
        flag = re.fullmatch(r"[a-z_:]+(\{[^}]*\})?\s*==\s*[01]", r["expr"].strip())
        if flag or r["expr"].strip().startswith("increase("):
            assert "$value" not in r["annotations"]["description"], r["alert"]


def test_no_rule_names_a_job() -> None:
    """Under the Prometheus Operator the job is the Service's name (it changes with the Helm release),
    so the rules select by pgcache_* series, never by job."""
    for r in alert_rules():
        assert not re.search(r"\bjob\s*(=|!=|=~|!~)\s*\"", r["expr"]), r["alert"]


def test_query_text_is_not_an_alert_label() -> None:
    for r in alert_rules():
        assert "group_left (query)" not in r["expr"] and "pgcache_statement_info" not in r["expr"], r["alert"]


def test_rebase_puts_other_link_bases(tmp_path: Path) -> None:
    short_rules = load_short_rules()
    doc = yaml.safe_load(ALERTS.read_text())
    out = short_rules.rebase(doc, runbook_base="https://wiki.example/pg", grafana_url="https://grafana.example/")
    rules = [r for g in out["groups"] for r in g["rules"]]
    assert [r["alert"] for r in rules] == [r["alert"] for r in alert_rules()]
    for r in rules:
        assert r["annotations"]["runbook_url"] == f"https://wiki.example/pg#{r['alert'].lower()}"
        assert r["annotations"]["dashboard_url"].startswith("https://grafana.example/d/")
    assert short_rules.main(["--full", "--runbook-base", "https://wiki.example/pg", str(ALERTS)]) == 0
    with pytest.raises(ValueError, match="runbook_url"):
        bad = {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "1", "annotations": {"runbook_url": "x"}}]}]}
        short_rules.rebase(bad, runbook_base="https://wiki.example")


# Each false positive ("noisy before") and false negative ("blind before") an SRE review found has a
# promtool case of its own, named after it (issue 18): silent where the old rule was noisy, firing
# where it was blind.
DEFECTS = {
    "PgcacheIdleInTransaction": "noisy before",
    "PgcacheSeriesDropped": "noisy before",
    "PgcacheRedisMemoryNearLimit": "noisy before",
    "PgcacheRedisEvictions": "noisy before",
    "PgcacheTableNotVacuumed": "blind before",
    "PgcacheDeadRowsHigh": "blind before",
    "PgcacheCollectorFailing": "blind before",
    "PgcacheCollectorStale": "blind before",
    "PgcacheSlowStatement": "restarted before",
}


def test_each_alert_defect_has_its_own_case() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    for alert, marker in DEFECTS.items():
        cases = [t for t in tests if marker in t["name"]
                 and any(c["alertname"] == alert for c in t["alert_rule_test"])]
        assert cases, f"{alert}: no promtool case named {marker!r}"
        evals = [c for t in cases for c in t["alert_rule_test"] if c["alertname"] == alert]
        # Every defect case shows the fixed rule firing somewhere (the blind case, or the real
        # problem next to the noise), so it cannot pass by the rule never firing at all.
        assert any(c["exp_alerts"] for c in evals), alert
