"""Collector definitions as data: the schema (built-in and user queries alike), SQL by version,
the generic rows-to-text path (labels, scale, NULL, limit, aggregate), and the one list of
collectors from which README's tables and exposed_metrics.json are generated."""

from __future__ import annotations

import pytest
from metrics_text import samples

from exporter.catalog import main as catalog_main
from exporter.config import ConfigError, build_config
from exporter.definitions import Definition, builtin_definitions, definition, pg_version
from exporter.errors import QueryError
from exporter.postgres.queries import render_rows, sql_for
from exporter.snapshot import render_text

ORDERS = {
    "name": "orders_by_status", "scope": "database", "databases": ["^app$"],
    "interval": "1m", "timeout": "10s",
    "sql": "SELECT status, count(*) AS orders FROM orders GROUP BY status",
    "labels": ["status"],
    "metrics": [{"column": "orders", "name": "pgcache_app_orders", "type": "gauge", "help": "Orders by status."}],
}


def config(*queries: dict) -> dict:
    return {"postgres": [{"name": "main", "dsn": "postgresql://u@h:5432/app"}], "queries": list(queries)}


def test_the_issue_shape_is_accepted_and_normalized() -> None:
    cfg = build_config(config(ORDERS))
    (q,) = cfg.queries
    assert (q.name, q.scope, q.interval, q.timeout, q.databases) == ("orders_by_status", "database", 60, 10, ("^app$",))
    (query,) = q.queries
    assert query.labels == ("status",) and query.metrics[0].name == "pgcache_app_orders"
    spec = q.family_specs()[0]
    assert spec.labels == ("target", "datname", "status") and spec.exposed_name == "pgcache_app_orders"


@pytest.mark.parametrize(("change", "message"), [
    ({"name": "tables"}, "queries[0].name: 'tables' is already a collector name (a built-in one)"),
    ({"metrics": [{"column": "n", "name": "pgcache_table_size_bytes", "type": "gauge", "help": "x"}]},
     "metric pgcache_table_size_bytes is already defined by collector tables"),
    ({"metrics": [{"column": "n", "name": "pgcache_up", "type": "gauge", "help": "x"}]},
     "metric pgcache_up is already defined by the exporter"),
    ({"metrics": [{"column": "n", "name": "pgcache_cache_hits", "type": "counter", "help": "x"}]},
     "metric pgcache_cache_hits is already defined by collector cache"),
    ({"metrics": [{"column": "n", "name": "app_orders", "type": "gauge", "help": "x"}]},
     "start with pgcache_"),
    ({"metrics": [{"column": "n", "name": "pgcache_orders_total", "type": "counter", "help": "x"}]},
     "write counter names without _total"),
    ({"labels": ["datname"]}, "label 'datname' is set by the exporter itself (scope database adds datname)"),
    ({"labels": ["target"]}, "label 'target' is set by the exporter itself"),
    ({"timeout": "2m"}, "timeout must be more than 0 and at most the interval"),
    ({"sql": [{"min_version": "sixteen", "query": "SELECT 1"}]}, "not a PostgreSQL version"),
    ({"scope": "server"}, "queries[0].scope"),
])
def test_schema_errors_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(config({**ORDERS, **change}))
    assert message in str(e.value)


def test_two_user_queries_may_not_share_a_metric_or_a_name() -> None:
    with pytest.raises(ConfigError, match="metric pgcache_app_orders is already defined by query orders_by_status"):
        build_config(config(ORDERS, {**ORDERS, "name": "other"}))
    with pytest.raises(ConfigError, match="'orders_by_status' is already a collector name"):
        build_config(config(ORDERS, {**ORDERS, "metrics": [
            {"column": "orders", "name": "pgcache_app_orders_2", "type": "gauge", "help": "x"}]}))


def test_versions_pick_the_variant() -> None:
    assert pg_version(16) == 160000 and pg_version("9.6") == 90600 and pg_version(150004) == 150004
    d = Definition.model_validate({
        "name": "v", "sql": [
            {"min_version": 17, "query": "SELECT 17 AS v"},
            {"min_version": 13, "max_version": 17, "query": "SELECT 13 AS v"},
            {"extension": {"name": "ext", "min_version": "1.9"}, "query": "SELECT v FROM @extschema@.f()"},
        ],
        "metrics": [{"column": "v", "name": "pgcache_v", "type": "gauge", "help": "v"}],
    })
    (q,) = d.queries
    assert sql_for(q, 170000, {}) == "SELECT 17 AS v"
    assert sql_for(q, 160003, {}) == "SELECT 13 AS v"
    assert sql_for(q, 120000, {}) is None  # no variant: the family is left out, no error
    assert sql_for(q, 120000, {"ext": ("1.10", '"x y"')}) == 'SELECT v FROM "x y".f()'
    assert sql_for(q, 120000, {"ext": ("1.8", "x")}) is None


def _orders() -> Definition:
    return build_config(config({**ORDERS, "metrics": [
        {"column": "orders", "name": "pgcache_app_orders", "type": "gauge", "help": "Orders."},
        {"column": "ms", "name": "pgcache_app_wait_seconds", "type": "counter", "scale": 0.001, "help": "Wait."},
        {"column": "maybe", "name": "pgcache_app_maybe", "type": "gauge", "null_as": -1, "help": "Maybe."},
        {"column": "orders", "name": "pgcache_app_orders_all", "type": "gauge", "aggregate": "sum", "help": "All."},
    ], "limit": {"by": "orders", "default": 2}})).queries[0]


def test_generic_path_labels_scale_null_limit_and_aggregate() -> None:
    d = _orders()
    rows = [("new", 5, 1500, None), ("paid", 9, 10, 3), ('we"ird\n', 1, None, None)]
    out = render_rows(d, d.queries[0], ["status", "orders", "ms", "maybe"], rows, ["main", "app"],
                      server_version_num=150000, limit=2)
    text = render_text(out.families).decode()
    assert samples(text, "pgcache_app_orders") == [9, 5]  # top 2 by orders
    assert samples(text, "pgcache_app_wait_seconds_total", status="new") == [1.5]
    assert samples(text, "pgcache_app_maybe", status="new") == [-1]
    assert samples(text, "pgcache_app_orders_all", target="main", datname="app") == [15]
    # The cut row had orders and maybe (null_as) but no wait time: two series.
    assert out.dropped == 2
    everything = render_rows(d, d.queries[0], ["status", "orders", "ms", "maybe"], rows, ["main", "app"],
                             server_version_num=150000)
    assert samples(render_text(everything.families), "pgcache_app_orders", status='we"ird\n') == [1]


def test_a_missing_or_non_numeric_column_names_collector_and_column() -> None:
    d = _orders()
    with pytest.raises(QueryError, match="collector orders_by_status: column 'ms' is not in the query's result"):
        render_rows(d, d.queries[0], ["status", "orders", "maybe"], [], ["m", "app"], server_version_num=0)
    with pytest.raises(QueryError, match="collector orders_by_status: column 'ms' is mapped to a metric but holds str"):
        render_rows(d, d.queries[0], ["status", "orders", "ms", "maybe"], [("x", 1, "soon", None)],
                    ["m", "app"], server_version_num=0)


def test_one_list_of_collectors() -> None:
    names = [d.name for d in builtin_definitions()]
    assert {"activity", "statements", "indexes", "tables", "database"} <= set(names)
    cfg = build_config({})
    for name in names:  # every definition has its settings under collectors:, with its defaults
        assert cfg.collectors.settings(name).interval == definition(name).interval
    # README's metric tables and exposed_metrics.json are generated from the same list.
    assert catalog_main(["--check"]) == 0, "run: python -m exporter.catalog"


KNOBBED = {
    "name": "big_orders", "scope": "database",
    "settings": {"min_total": {"default": 100, "minimum": 0, "help": "Orders at least this big."}},
    "sql": "SELECT id::text AS id, total, total >= $1 AS big FROM orders",
    "params": ["min_total"], "keep": "big", "labels": ["id"],
    "metrics": [{"column": "total", "name": "pgcache_app_order_total", "type": "gauge", "help": "Total."},
                {"column": "total", "name": "pgcache_app_orders_seen", "type": "gauge", "aggregate": "sum",
                 "help": "Sum of all totals."}],
}


def test_a_setting_becomes_a_collector_key_and_a_parameter() -> None:
    d = Definition.model_validate(KNOBBED)
    assert d.queries[0].params == ("min_total",) and d.queries[0].keep == "big"
    # The built-in sequences collector: collectors.sequences.threshold, default 0.5, bounded 0..1.
    assert build_config({}).collectors.settings("sequences").threshold == 0.5  # type: ignore[attr-defined]
    cfg = build_config({"collectors": {"sequences": {"threshold": 0.8}}})
    assert cfg.collectors.settings("sequences").threshold == 0.8  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"collectors\.sequences\.threshold"):
        build_config({"collectors": {"sequences": {"threshold": 2}}})


@pytest.mark.parametrize(("change", "message"), [
    ({"params": ["nope"]}, "parameter 'nope' is not one of the collector's settings"),
    ({"settings": {"limit": {"default": 1, "help": "x"}}}, "setting 'limit'"),
    ({"settings": {"min_total": {"default": 100, "maximum": 10, "help": "x"}}}, "outside minimum..maximum"),
    ({"keep": "id"}, "keep column 'id' is a label"),
])
def test_setting_and_keep_errors(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(config({**KNOBBED, **change}))


def test_keep_leaves_rows_out_and_counts_their_series() -> None:
    d = Definition.model_validate(KNOBBED)
    rows = [("1", 150, True), ("2", 20, False), ("3", None, False), ("4", 300, True)]
    out = render_rows(d, d.queries[0], ["id", "total", "big"], rows, ["main", "app"], server_version_num=150000)
    text = render_text(out.families).decode()
    assert samples(text, "pgcache_app_order_total") == [150, 300]
    assert samples(text, "pgcache_app_orders_seen") == [470]  # aggregates count every row
    assert out.dropped == 1  # row 2's one series; row 3 had none
