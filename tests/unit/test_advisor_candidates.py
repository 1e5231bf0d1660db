"""The advisor's pure parts: candidate keys from statement text (pglast), partial-index
predicates, merging advice, and the families with their limit."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from exporter.advisor.candidates import (
    TableRef,
    candidate_keys,
    predicate_columns,
    resolve,
    statement_shape,
)
from exporter.advisor.collector import advice_families
from exporter.advisor.planner import (
    Advice,
    DatabaseAdvice,
    StatementAdvice,
    Table,
    TopStatement,
    merge_advice,
)
from exporter.snapshot import render_text  # noqa: E402

POSTS = TableRef(None, "posts")
USERS = TableRef(None, "users")


def test_shape_of_a_join_with_filters_and_order() -> None:
    s = statement_shape(
        "SELECT p.id FROM posts p JOIN users u ON p.author_id = u.id "
        "WHERE p.is_deleted = $1 AND p.created_at > $2 AND u.status IN ($3, $4) "
        "ORDER BY p.created_at DESC LIMIT $5"
    )
    assert s is not None and s.kind == "select" and s.params == 5
    assert s.tables == [POSTS, USERS]
    assert s.uses[POSTS].equality == ["is_deleted"] and s.uses[POSTS].range == ["created_at"]
    assert s.uses[POSTS].join == ["author_id"] and s.uses[POSTS].order == ["created_at"]
    assert s.uses[USERS].equality == ["status"] and s.uses[USERS].join == ["id"]


def test_unqualified_columns_go_to_the_one_table_that_has_them() -> None:
    s = statement_shape("SELECT count(*) FROM posts JOIN users ON author_id = users.id WHERE status = $1")
    assert s is not None
    uses = resolve(s, {POSTS: {"id", "author_id"}, USERS: {"id", "status"}})
    assert uses[USERS].equality == ["status"]
    assert uses[POSTS].join == ["author_id"]


def test_candidate_keys() -> None:
    s = statement_shape("SELECT * FROM users WHERE status = $1 AND is_active = $2 ORDER BY created_at DESC LIMIT $3")
    assert s is not None
    keys = candidate_keys(s.unqualified)
    assert ("status",) in keys and ("status", "is_active") in keys
    assert ("status", "is_active", "created_at") in keys and ("status", "created_at") in keys
    assert len(keys) <= 12


def test_statements_that_are_not_planned() -> None:
    assert statement_shape("INSERT INTO t VALUES ($1)") is None
    assert statement_shape("EXPLAIN SELECT 1") is None
    assert statement_shape("SELECT 1; SELECT 2") is None
    assert statement_shape("<insufficient privilege>") is None
    cte = statement_shape("WITH x AS (SELECT id FROM posts WHERE author_id = $1) SELECT * FROM x WHERE id > $2")
    assert cte is not None and cte.tables == [POSTS]


def test_predicate_columns() -> None:
    assert predicate_columns("((is_published = true) AND (is_deleted = false))") == ["is_published", "is_deleted"]
    assert predicate_columns("(NOT is_deleted)") == ["is_deleted"]
    assert predicate_columns("(deleted_at IS NULL)") == ["deleted_at"]
    assert predicate_columns("(a > 5)") == []


def _st(q: str, ms: float) -> TopStatement:
    return TopStatement("db", hash(q), q, 10, ms, 1000.0)


def test_a_narrower_key_is_served_by_the_wider_one() -> None:
    t = Table(1, "public", "posts", frozenset(), 1e6, 0, 0)
    merged = merge_advice("db", [
        (t, ("author_id",), StatementAdvice(_st("a", 100), 100, 10)),
        (t, ("author_id", "created_at"), StatementAdvice(_st("b", 300), 100, 20)),
    ])
    assert [(a.label, len(a.statements)) for a in merged] == [("author_id,created_at", 2)]
    assert abs(merged[0].time_share - 0.4) < 1e-9
    assert abs(merged[0].saving - (0.9 * 100 + 0.8 * 300) / 400) < 1e-9
    assert merged[0].definition == "CREATE INDEX CONCURRENTLY ON public.posts (author_id, created_at)"


def test_families_are_bounded_and_count_the_cut() -> None:
    advice = [Advice("db", "public", f"t{i}", ("c",), [StatementAdvice(_st(f"q{i}", 10 + i), 100, 10)])
              for i in range(5)]
    families, dropped = advice_families("main", [DatabaseAdvice("db", True, advice=advice, planned=5)], 3)
    text = render_text(families).decode()
    saving = [s for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "pgcache_index_advice_saving_ratio"]
    # Two advices cut, two series each (saving and statement-time share).
    assert len(saving) == 3 and dropped == 2 * 2
    # The ones touching the most statement time are kept.
    assert {s.labels["table"] for s in saving} == {"t4", "t3", "t2"}
    assert [s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "pgcache_index_advice_hypopg_available"] == [1]
