"""Static checks of grafana/dashboards/*.json and the provisioning files (no servers; promtool parses
the queries). Metric names and types come from exposed_metrics.json, which test_e2e.py checks
against the exporter's real /metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from . import promql

BOARDS = promql.dashboard_files()
DS = {"type": "prometheus", "uid": "${datasource}"}
# One value per variable, for the static parse (any valid matcher text will do).
STATIC_VALUES = {"datasource": "prom", "job": "pgcache-exporter", "target": "main", "datname": "app",
                 "cache_target": "cache", "namespace": "user_stats", "queryid": "123"}
STATEMENT_KEY = "target, datname, user, queryid"


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.fixture(params=BOARDS, ids=ids(BOARDS))
def board(request: pytest.FixtureRequest) -> dict[str, Any]:
    return promql.load(request.param)


def panels(b: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in b["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows
    return out


def all_databases(panel: dict[str, Any]) -> bool:
    """Panels about the whole server (connections against max_connections) say so first thing in
    their description and are exempt from the datname filter."""
    return str(panel.get("description", "")).startswith("All databases:")


def variables(b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in b["templating"]["list"]}


def test_the_seven_dashboards_exist() -> None:
    uids = sorted(promql.load(p)["uid"] for p in BOARDS)
    assert uids == sorted(["pgcache-overview", "pgcache-queries", "pgcache-indexes-tables",
                           "pgcache-cache", "pgcache-exporter", "pgcache-statement", "pgcache-server"])


def test_uids_and_titles_are_unique() -> None:
    boards = [promql.load(p) for p in BOARDS]
    uids = [b["uid"] for b in boards]
    titles = [b["title"] for b in boards]
    assert len(set(uids)) == len(uids), uids
    assert len(set(titles)) == len(titles), titles
    for b in boards:
        assert re.fullmatch(r"[a-z0-9-]{1,40}", b["uid"]), b["uid"]


def test_panel_ids_are_unique_and_every_panel_has_a_place(board: dict[str, Any]) -> None:
    ps = panels(board)
    panel_ids = [p["id"] for p in ps]
    assert len(set(panel_ids)) == len(panel_ids), panel_ids
    for p in ps:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, (p["title"], g)


def test_datasource_variable_is_prometheus_and_used_everywhere(board: dict[str, Any]) -> None:
    vs = variables(board)
    assert vs["datasource"]["type"] == "datasource"
    assert vs["datasource"]["query"] == "prometheus"
    for p in panels(board):
        if p["type"] == "row":
            continue
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DS, (p["title"], t["refId"])
    for v in vs.values():
        if v["type"] == "query":
            assert v["datasource"] == DS, v["name"]


def test_no_hard_coded_datasource_uid(board: dict[str, Any]) -> None:
    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict):
                assert ds.get("uid") == "${datasource}", f"{path}: datasource {ds}"
            elif ds is not None:
                assert ds in ("${datasource}", "$datasource"), f"{path}: datasource {ds!r}"
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(board, board["uid"])


def test_job_target_and_datname_variables(board: dict[str, Any]) -> None:
    vs = variables(board)
    assert "job" in vs and "target" in vs, sorted(vs)
    # Every dashboard that shows a per-database family offers the datname variable.
    exempt = {f"panel {p['id']} " for p in panels(board) if all_databases(p)}
    per_db = any(
        "datname" in promql.series_labels(name)
        for q in promql.queries(board) if not any(q.where.startswith(e) for e in exempt)
        for name in promql.metric_names(q.expr)
    )
    assert ("datname" in vs) == per_db, (board["uid"], per_db, sorted(vs))


def test_every_panel_has_a_unit(board: dict[str, Any]) -> None:
    for p in panels(board):
        if p["type"] == "row":
            continue
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit")
        assert unit, f"{board['uid']}: panel {p['title']!r} has no unit"


def test_rates_use_rate_interval(board: dict[str, Any]) -> None:
    for q in promql.queries(board):
        calls = promql.range_function_args(q.expr, promql.RANGE_FUNCS)
        for func, _metric, window in calls:
            allowed = {"$__rate_interval"} | ({"$__range"} if func == "increase" else set())
            assert window in allowed, f"{q.where}: {func}(...[{window}])"
        # A rate over anything but a plain selector (e.g. a subquery) would escape the check above.
        assert promql.function_calls(q.expr, promql.RANGE_FUNCS) == len(calls), q.where


def test_rate_interval_is_what_the_rates_use() -> None:
    exprs = [q.expr for p in BOARDS for q in promql.queries(promql.load(p))]
    assert sum("$__rate_interval" in e for e in exprs) > 30


def test_every_metric_is_one_the_exporter_exposes(board: dict[str, Any]) -> None:
    types = promql.series_types()
    for q in promql.queries(board):
        names = promql.metric_names(q.expr)
        assert names, f"{q.where}: no metric in {q.expr!r}"
        unknown = names - set(types)
        assert not unknown, f"{q.where}: not exposed by pgcache-exporter: {sorted(unknown)}"


def test_rate_and_increase_only_on_counters_and_histograms(board: dict[str, Any]) -> None:
    types = promql.series_types()
    for q in promql.queries(board):
        for func, metric, _ in promql.range_function_args(q.expr, promql.RANGE_FUNCS):
            assert types[metric] in ("counter", "histogram"), f"{q.where}: {func}() on {types[metric]} {metric}"
        for func, metric, _ in promql.range_function_args(q.expr, promql.GAUGE_FUNCS):
            assert types[metric] == "gauge", f"{q.where}: {func}() on {types[metric]} {metric}"
        if "histogram_quantile" in q.expr:
            assert "_bucket" in q.expr and "le" in q.expr, q.where


def test_selectors_filter_by_the_variables(board: dict[str, Any]) -> None:
    """Every selector honours the dashboard's job, target and datname choice where its family has
    those labels, so no panel silently mixes in other exporters, targets or databases."""
    exempt = {f"panel {p['id']} " for p in panels(board) if all_databases(p)}
    for q in promql.queries(board):
        if q.where == "variable job":
            continue
        variable = q.where.startswith("variable ") or any(q.where.startswith(e) for e in exempt)
        for name, m in promql.selectors(q.expr):
            labels = promql.series_labels(name)
            assert m.get("job") == "=~$job", f"{q.where}: {name} without job=~\"$job\""
            if "target" in labels and q.where not in ("variable target", "variable cache_target"):
                assert m.get("target") in ("=~$target", "=~$cache_target"), f"{q.where}: {name} without target matcher"
            if "datname" in labels and not variable:
                assert m.get("datname") == "=~$datname", f"{q.where}: {name} without datname=~\"$datname\""


def test_every_query_parses(promtool: str, tmp_path: Path) -> None:
    exprs = {}
    for path in BOARDS:
        b = promql.load(path)
        for q in promql.queries(b):
            exprs[f"{q.dashboard} {q.where}"] = promql.fill(q.expr, STATIC_VALUES)
    assert len(exprs) > 50
    problems = promql.promtool_parses(promtool, exprs, tmp_path)
    assert not problems, problems


def test_provisioning_points_at_the_dashboards() -> None:
    prov = promql.REPO / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert [d["type"] for d in ds["datasources"]] == ["prometheus"]
    dash = yaml.safe_load((prov / "dashboards" / "pgcache.yml").read_text())
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    # The path the compose file mounts grafana/dashboards at.
    compose = promql.REPO / "deploy" / "docker-compose.yml"
    if compose.exists():
        mounts = yaml.safe_load(compose.read_text())["services"]["grafana"]["volumes"]
        assert any(m.startswith("../grafana/dashboards:" + provider["options"]["path"]) for m in mounts), mounts
        assert any(m.startswith("../grafana/provisioning:/etc/grafana/provisioning") for m in mounts), mounts


# -- conventions an SRE expects (issue 18) -----------------------------------------------------------
def targets_of(board: dict[str, Any], *types: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in panels(board) if p["type"] in types for t in p.get("targets", [])]


def multi(board: dict[str, Any], name: str) -> bool:
    v = variables(board).get(name)
    return bool(v and v.get("multi"))


def test_stat_tiles_are_instant_queries(board: dict[str, Any]) -> None:
    """A range query with lastNotNull keeps showing the last value (UP) after the exporter died."""
    for p, t in targets_of(board, "stat"):
        assert t.get("instant") is True and t.get("range") is False, (board["uid"], p["title"])


def test_tables_are_instant_queries(board: dict[str, Any]) -> None:
    for p, t in targets_of(board, "table"):
        assert t.get("instant") is True and t.get("format") == "table", (board["uid"], p["title"])


def test_up_tiles_map_zero_and_one_to_words(board: dict[str, Any]) -> None:
    for p, t in targets_of(board, "stat"):
        if re.match(r"^\s*(up|pgcache_up|pgcache_redis_up)\{", t["expr"]):
            (mapping,) = p["fieldConfig"]["defaults"]["mappings"]
            assert set(mapping["options"]) == {"0", "1"}, p["title"]
            assert mapping["options"]["0"]["color"] == "red", p["title"]


def test_overview_shows_the_exporter_scrape() -> None:
    board = promql.load(promql.DASHBOARDS / "overview.json")
    assert any(re.match(r'^up\{job=~"\$job"\}$', t["expr"]) for _, t in targets_of(board, "stat"))


def test_no_instance_legend_on_a_label_the_exporter_sets(board: dict[str, Any]) -> None:
    """Prometheus renames an exported `instance` label to exported_instance (honor_labels: false):
    {{instance}} would show the exporter's own address on every line."""
    for p, t in targets_of(board, "timeseries", "stat"):
        if "{{instance}}" in t["legendFormat"]:
            own = [n for n in promql.metric_names(t["expr"]) if "instance" in promql.series_labels(n)]
            assert not own, (board["uid"], p["title"], own)


def test_legends_name_the_target_where_several_can_be_chosen(board: dict[str, Any]) -> None:
    for p, t in targets_of(board, "timeseries", "stat"):
        names = promql.metric_names(t["expr"])
        if not any("target" in promql.series_labels(n) for n in names):
            continue
        var = "cache_target" if "$cache_target" in t["expr"] else "target"
        if multi(board, var):
            assert "{{target}}" in t["legendFormat"], (board["uid"], p["title"], t["legendFormat"])


def test_tables_show_the_target_where_several_can_be_chosen(board: dict[str, Any]) -> None:
    if not multi(board, "target"):
        return
    for p in panels(board):
        for tr in p.get("transformations", []):
            assert not tr["options"].get("excludeByName", {}).get("target"), (board["uid"], p["title"])


def test_topk_on_range_queries_picks_its_members_once(board: dict[str, Any]) -> None:
    """topk in a range query is evaluated at every step: its members change and the panel draws
    more than N broken lines. Range panels rank once, over the whole range (`@ end()`)."""
    for p, t in targets_of(board, "timeseries"):
        if "topk(" in t["expr"]:
            assert "@ end()" in t["expr"] and re.search(r"\band on \(", t["expr"]), (board["uid"], p["title"])


def test_large_dashboards_have_rows(board: dict[str, Any]) -> None:
    if len([p for p in panels(board) if p["type"] != "row"]) > 12:
        assert any(p["type"] == "row" for p in board["panels"]), board["uid"]


def test_panel_titles_promise_no_more_than_their_queries(board: dict[str, Any]) -> None:
    for p in panels(board):
        if "size" in p["title"].lower():
            exprs = " ".join(t["expr"] for t in p.get("targets", []))
            assert "size" in exprs or p["type"] == "row", (board["uid"], p["title"])


def statement_info_joins(board: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p, t in targets_of(board, "table", "timeseries") if "pgcache_statement_info" in t["expr"]]


def test_statement_tables_keep_statements_without_text(board: dict[str, Any]) -> None:
    """pgcache_statement_info is absent under query_text_length: 0, for the queryid="" bucket and
    for texts hidden by privileges: a plain join would drop those statements."""
    for p, t in statement_info_joins(board):
        expr = t["expr"]
        assert "group_left (query)" in expr, p["title"]
        assert f"or on ({STATEMENT_KEY})" in expr, (board["uid"], p["title"])
        # The fallback is the same ranking the join starts from.
        joined, fallback = expr.rsplit(f"or on ({STATEMENT_KEY})", 1)
        assert fallback.strip() in joined, (board["uid"], p["title"])


def test_statement_rows_link_to_the_statement_dashboard() -> None:
    board = promql.load(promql.DASHBOARDS / "queries.json")
    tables = [p for p in panels(board) if p["type"] == "table"]
    assert len(tables) == 3
    for p in tables:
        (override,) = [o for o in p["fieldConfig"]["overrides"] if o["matcher"]["options"] == "queryid"]
        (link,) = [x for x in override["properties"] if x["id"] == "links"][0]["value"]
        assert link["url"].startswith("/d/pgcache-statement?"), link
        for part in ("var-queryid=${__value.raw}", "var-target=${__data.fields.target}",
                     "var-datname=${__data.fields.datname}", "${__url_time_range}"):
            assert part in link["url"], (p["title"], part)
    for p in panels(board):
        if p["type"] == "timeseries" and "queryid" in " ".join(t["legendFormat"] for t in p["targets"]):
            (link,) = p["fieldConfig"]["defaults"]["links"]
            assert "var-queryid=${__field.labels.queryid}" in link["url"], p["title"]


def test_statement_dashboard_shows_one_queryid_over_time() -> None:
    board = promql.load(promql.DASHBOARDS / "statement.json")
    vs = variables(board)
    assert "queryid" in vs and not vs["queryid"]["multi"]
    exprs = " ".join(t["expr"] for p in panels(board) for t in p.get("targets", []))
    for family in ("pgcache_statement_calls_total", "pgcache_statement_exec_seconds_total",
                   "pgcache_statement_rows_total", "pgcache_statement_shared_blocks_read_total",
                   "pgcache_statement_shared_blocks_hit_total", "pgcache_statement_info"):
        assert family in exprs, family
    for q in promql.queries(board):
        for name, m in promql.selectors(q.expr):
            if "queryid" in promql.series_labels(name) and q.where != "variable queryid":
                assert m.get("queryid") == "=~$queryid", (q.where, name)
