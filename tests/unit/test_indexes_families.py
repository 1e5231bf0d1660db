"""Pure logic of the indexes and tables collectors: the unused-index rule case by case, redundant
indexes, the limits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import IndexesSettings
from exporter.definitions import definition
from exporter.postgres.indexes import (
    IndexRow,
    index_families,
    indexes_sql,
    is_unused_candidate,
    redundant_indexes,
)
from exporter.postgres.queries import render_rows
from exporter.snapshot import render_text

MB = 1_000_000
DAY = 86400.0
PLAIN = IndexRow(schema="public", table="t", index="t_a", indexrelid=1, relid=100, size_bytes=10 * MB)


@pytest.mark.parametrize(
    ("case", "row", "stats_age", "flagged"),
    [
        ("unused plain index", PLAIN, 30 * DAY, True),
        ("used", replace(PLAIN, idx_scan=1), 30 * DAY, False),
        ("primary key", replace(PLAIN, indisprimary=True, indisunique=True), 30 * DAY, False),
        ("unique", replace(PLAIN, indisunique=True), 30 * DAY, False),
        ("exclusion constraint", replace(PLAIN, indisexclusion=True), 30 * DAY, False),
        ("replica identity", replace(PLAIN, indisreplident=True), 30 * DAY, False),
        ("invalid", replace(PLAIN, indisvalid=False), 30 * DAY, False),
        ("too small", replace(PLAIN, size_bytes=MB - 1), 30 * DAY, False),
        ("exactly the minimum size", replace(PLAIN, size_bytes=MB), 30 * DAY, True),
        ("size unknown (locked)", replace(PLAIN, size_bytes=None, locked=True), 30 * DAY, False),
        ("statistics too young", PLAIN, 6 * DAY, False),
        ("statistics age unknown", PLAIN, None, False),
    ],
)
def test_unused_rule(case: str, row: IndexRow, stats_age: float | None, flagged: bool) -> None:
    assert is_unused_candidate(row, stats_age, 7 * DAY, MB) is flagged, case


def idx(name: str, oid: int, columns: tuple[int, ...], **kw: object) -> IndexRow:
    n = len(columns)
    return IndexRow(schema="public", table="t", index=name, indexrelid=oid, relid=100,
                    columns=columns, indnkeyatts=kw.pop("indnkeyatts", n),  # type: ignore[arg-type]
                    opclasses=(1,) * n, collations=(0,) * n, options=(0,) * n, **kw)  # type: ignore[arg-type]


def test_redundant_prefix_and_duplicates() -> None:
    a = idx("t_a", 1, (1,))
    ab = idx("t_ab", 2, (1, 2))
    ba = idx("t_ba", 3, (2, 1))
    dup1, dup2 = idx("t_c1", 4, (3,)), idx("t_c2", 5, (3,))
    out = redundant_indexes([a, ab, ba, dup1, dup2])
    assert {k: v.index for k, v in out.items()} == {1: "t_ab", 5: "t_c1"}


def test_not_redundant() -> None:
    a = idx("t_a", 1, (1,))
    partial = idx("t_ab_part", 2, (1, 2), predicate="{OPEXPR ...}")
    other_table = replace(idx("u_ab", 3, (1, 2)), relid=200)
    invalid_wide = idx("t_ab_bad", 4, (1, 2), indisvalid=False)
    desc = replace(idx("t_a_desc", 5, (1, 2)), options=(3, 0))  # DESC on the first column
    hash_wide = idx("t_ab_hash", 6, (1, 2), amname="hash")
    assert redundant_indexes([a, partial, other_table, invalid_wide, desc, hash_wide]) == {}
    # A unique index is never redundant: it enforces something; a plain duplicate of it is.
    uniq = idx("t_a_key", 7, (1,), indisunique=True)
    assert {k: v.index for k, v in redundant_indexes([uniq, idx("t_z", 8, (1,))]).items()} == {8: "t_a_key"}
    # INCLUDE columns the wider index lacks keep the narrow one useful (index-only scans).
    inc = idx("t_a_inc", 9, (1, 5), indnkeyatts=1)
    assert redundant_indexes([inc, idx("t_ab", 10, (1, 2))]) == {}


def test_index_families_limit_prefers_flagged() -> None:
    rows = [replace(PLAIN, index=f"i{n}", indexrelid=n, columns=(n,), idx_scan=1, size_bytes=n * MB)
            for n in range(1, 6)]
    rows.append(replace(PLAIN, index="unused", indexrelid=99, columns=(9,), size_bytes=2 * MB))
    settings = IndexesSettings(unused_min_stats_age=0, limit=3)  # type: ignore[arg-type]
    fams, dropped = index_families("m", "db", rows, stats_age=10.0, settings=settings, last_scan=False)
    text = render_text(fams).decode()
    # Three indexes cut, four series each (scans, tuples read, tuples fetched, size).
    assert dropped == 3 * 4
    assert [s.labels["index"] for s in _samples(text, "pgcache_index_scans_total")] == ["unused", "i5", "i4"]
    assert [s.labels["index"] for s in _samples(text, "pgcache_index_unused")] == ["unused"]
    assert [s.value for s in _samples(text, "pgcache_database_stats_age_seconds")] == [10.0]
    assert "pgcache_index_last_scan_timestamp_seconds" not in text


def test_last_scan_column_by_server_version() -> None:
    assert "s.last_idx_scan" in indexes_sql(160000)
    assert "last_idx_scan" not in indexes_sql(150004)


def test_tables_limit_and_locked_last() -> None:
    """The tables definition on the generic path: top `limit` by total size, locked ones (size
    unknown) last, every locked table counted, the cut counted in series."""
    defn = definition("tables")
    query = defn.query("tables")
    cols = ["schema", "table", "live_rows", "dead_rows", "seq_scan", "idx_scan", "last_vacuum",
            "last_autovacuum", "last_analyze", "last_autoanalyze", "locked", "heap_bytes",
            "indexes_bytes", "toast_bytes", "total_bytes"]

    def row(name: str, size: int | None, locked: int = 0) -> tuple[object, ...]:
        return ("s", name, 1, 0, 2, None, None, None, None, None, locked, size, 0 if size is not None else None,
                0 if size is not None else None, size)

    rows = [row(f"t{n}", n) for n in range(5)] + [row("locked", None, 1)]
    out = render_rows(defn, query, cols, rows, ["m", "db"], server_version_num=150000, limit=3)
    text = render_text(out.families).decode()
    assert [s.labels["table"] for s in _samples(text, "pgcache_table_size_bytes")] == ["t4", "t3", "t2"]
    assert [s.value for s in _samples(text, "pgcache_tables_skipped_locked")] == [1]
    # Cut: t1, t0 (size, indexes, toast, live, dead, seq scans: 6 series each) and locked (3).
    assert out.dropped == 2 * 6 + 3


def _samples(text: str, name: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
