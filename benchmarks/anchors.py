"""The two exporters we compare against, fetched into benchmarks/.cache and configured to collect
what ours collects (activity, statements, per-index and per-table statistics with sizes, database
statistics).

- postgres_exporter >= 0.17: Debian stable ships 0.11, so the trixie package is downloaded from the
  mirror this machine already uses, through a private apt source list and lists directory (the
  system's apt configuration is never touched), and unpacked with `dpkg -x` (a static Go binary).
- query-exporter: from PyPI, into its own venv (its pins must not disturb ours), with psycopg2.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = [
    "CACHE",
    "POSTGRES_EXPORTER_FLAGS",
    "ensure_postgres_exporter",
    "ensure_query_exporter",
    "query_exporter_config",
    "cached_anchors",
]

CACHE = Path(__file__).resolve().parent / ".cache"
PGEXP_BIN = CACHE / "pgexp" / "usr" / "bin" / "prometheus-postgres-exporter"
QE_VENV = CACHE / "qe-venv"
QE_BIN = QE_VENV / "bin" / "query-exporter"

# Its default collectors stay on (that is how people run it); these are the ones the issue names.
POSTGRES_EXPORTER_FLAGS = [
    "--collector.stat_statements",
    "--collector.stat_user_tables",
    "--collector.statio_user_tables",
    "--collector.statio_user_indexes",
    "--collector.long_running_transactions",
    "--log.level=warn",
]


def _run(args: list[str], **kw: object) -> str:
    r = subprocess.run(args, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-1500:]}")
    return str(r.stdout)


def _version(args: list[str]) -> str:
    r = subprocess.run(args, capture_output=True, text=True)
    return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"


def debian_mirror() -> str:
    """The Debian mirror the machine's apt already uses (not the security one)."""
    texts = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        try:
            texts.append(Path(path).read_text())
        except OSError:
            continue
    for text in texts:
        for url in re.findall(r"(?m)^\s*(?:URIs:|deb(?:\s+\[[^\]]*\])?)\s+(\S+)", text):
            if "security" not in url and "debian" in url:
                return url.rstrip("/")
    return "http://deb.debian.org/debian"


def ensure_postgres_exporter(log=print) -> tuple[Path, str]:
    """The prometheus-postgres-exporter binary from Debian trixie, downloaded once."""
    if not PGEXP_BIN.exists():
        if not shutil.which("apt-get") or not shutil.which("dpkg"):
            raise RuntimeError("apt-get and dpkg are needed to fetch postgres_exporter from trixie")
        CACHE.mkdir(parents=True, exist_ok=True)
        mirror = debian_mirror()
        log(f"fetching prometheus-postgres-exporter from {mirror} trixie ...")
        srclist = CACHE / "trixie.list"
        lists = CACHE / "trixie-lists"
        (lists / "partial").mkdir(parents=True, exist_ok=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        signed = f"[signed-by={keyring}] " if Path(keyring).exists() else ""
        srclist.write_text(f"deb {signed}{mirror} trixie main\n")
        opts = [
            "-o", f"Dir::Etc::sourcelist={srclist}", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={lists}", "-o", "APT::Sandbox::User=root",
        ]
        _run(["apt-get", *opts, "update"])
        debdir = CACHE / "deb"
        debdir.mkdir(exist_ok=True)
        _run(["apt-get", *opts, "download", "prometheus-postgres-exporter"], cwd=debdir)
        debs = sorted(debdir.glob("prometheus-postgres-exporter_*.deb"))
        if not debs:
            raise RuntimeError("apt-get download gave no prometheus-postgres-exporter .deb")
        _run(["dpkg", "-x", str(debs[-1]), str(CACHE / "pgexp")])
    version = _version([str(PGEXP_BIN), "--version"])
    m = re.search(r"version (\S+)", version)
    if m and tuple(int(x) for x in m.group(1).split(".")[:2]) < (0, 17):
        raise RuntimeError(f"postgres_exporter {m.group(1)} is older than 0.17")
    return PGEXP_BIN, version


def ensure_query_exporter(log=print) -> tuple[Path, str]:
    """query-exporter from PyPI in its own venv under benchmarks/.cache."""
    if not QE_BIN.exists():
        log("installing query-exporter into benchmarks/.cache/qe-venv ...")
        CACHE.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(QE_VENV)])
        _run([str(QE_VENV / "bin" / "pip"), "install", "-q", "query-exporter", "psycopg2-binary"])
    out = _run([str(QE_VENV / "bin" / "pip"), "list", "--format=freeze"])
    pins = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    version = (f"query-exporter {pins.get('query-exporter', '?')} (SQLAlchemy "
               f"{pins.get('SQLAlchemy', '?')}, psycopg2-binary {pins.get('psycopg2-binary', '?')})")
    return QE_BIN, version


def cached_anchors() -> list[str]:
    """Which anchors are already on disk (the smoke test uses only these: no download)."""
    out = []
    if PGEXP_BIN.exists():
        out.append("postgres_exporter")
    if QE_BIN.exists():
        out.append("query-exporter")
    return out


# -- query-exporter configuration: the same data as our collectors ---------------------------------

_QE_QUERIES = {
    "activity": (
        ["datname", "usename", "application_name", "state", "wait_event_type"],
        {"pg_connections": "gauge"},
        """
SELECT coalesce(datname::text, '') AS datname, coalesce(usename::text, '') AS usename,
       coalesce(application_name, '') AS application_name, coalesce(state, '') AS state,
       coalesce(wait_event_type, '') AS wait_event_type, count(*) AS pg_connections
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1, 2, 3, 4, 5""",
    ),
    "activity_ages": (
        ["datname", "state"],
        {"pg_oldest_transaction_age_seconds": "gauge", "pg_oldest_query_age_seconds": "gauge"},
        """
SELECT coalesce(datname::text, '') AS datname, coalesce(state, '') AS state,
       coalesce(max(extract(epoch FROM now() - xact_start)), 0)::float8 AS pg_oldest_transaction_age_seconds,
       coalesce(max(extract(epoch FROM now() - query_start)) FILTER (WHERE state <> 'idle'), 0)::float8
           AS pg_oldest_query_age_seconds
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1, 2""",
    ),
    "settings": (
        [],
        {"pg_connections_max": "gauge"},
        "SELECT setting::int AS pg_connections_max FROM pg_settings WHERE name = 'max_connections'",
    ),
    "statements": (
        ["datname", "username", "queryid"],
        {f"pg_statement_{m}": "counter" for m in (
            "calls", "exec_seconds", "plan_seconds", "rows", "shared_blocks_hit",
            "shared_blocks_read", "temp_blocks_written")},
        """
SELECT coalesce(d.datname, s.dbid::text) AS datname, coalesce(r.rolname, s.userid::text) AS username,
       s.queryid::text AS queryid,
       sum(s.calls)::float8 AS pg_statement_calls,
       sum(s.total_exec_time / 1000)::float8 AS pg_statement_exec_seconds,
       sum(s.total_plan_time / 1000)::float8 AS pg_statement_plan_seconds,
       sum(s.rows)::float8 AS pg_statement_rows,
       sum(s.shared_blks_hit)::float8 AS pg_statement_shared_blocks_hit,
       sum(s.shared_blks_read)::float8 AS pg_statement_shared_blocks_read,
       sum(s.temp_blks_written)::float8 AS pg_statement_temp_blocks_written
FROM pg_stat_statements s
LEFT JOIN pg_database d ON d.oid = s.dbid
LEFT JOIN pg_roles r ON r.oid = s.userid
GROUP BY 1, 2, 3
ORDER BY pg_statement_exec_seconds DESC
LIMIT 200""",
    ),
    "statement_info": (
        ["datname", "username", "queryid", "query"],
        {"pg_statement_info": "gauge"},
        """
SELECT coalesce(d.datname, s.dbid::text) AS datname, coalesce(r.rolname, s.userid::text) AS username,
       s.queryid::text AS queryid, left(min(s.query), 200) AS query, 1 AS pg_statement_info
FROM pg_stat_statements s
LEFT JOIN pg_database d ON d.oid = s.dbid
LEFT JOIN pg_roles r ON r.oid = s.userid
GROUP BY 1, 2, 3
ORDER BY sum(s.total_exec_time) DESC
LIMIT 200""",
    ),
    "indexes": (
        ["schema", "table", "index"],
        {"pg_index_scans": "counter", "pg_index_tuples_read": "counter",
         "pg_index_tuples_fetched": "counter", "pg_index_size_bytes": "gauge"},
        """
SELECT schemaname AS schema, relname AS "table", indexrelname AS "index",
       idx_scan AS pg_index_scans, idx_tup_read AS pg_index_tuples_read,
       idx_tup_fetch AS pg_index_tuples_fetched, pg_relation_size(indexrelid) AS pg_index_size_bytes
FROM pg_stat_user_indexes""",
    ),
    "tables": (
        ["schema", "table"],
        {"pg_table_size_bytes": "gauge", "pg_table_indexes_size_bytes": "gauge",
         "pg_table_toast_size_bytes": "gauge", "pg_table_live_rows": "gauge",
         "pg_table_dead_rows": "gauge", "pg_table_seq_scans": "counter",
         "pg_table_index_scans": "counter", "pg_table_last_autovacuum_timestamp_seconds": "gauge",
         "pg_table_last_autoanalyze_timestamp_seconds": "gauge"},
        """
SELECT s.schemaname AS schema, s.relname AS "table",
       pg_table_size(s.relid) AS pg_table_size_bytes,
       pg_indexes_size(s.relid) AS pg_table_indexes_size_bytes,
       CASE WHEN c.reltoastrelid <> 0 THEN pg_total_relation_size(c.reltoastrelid) ELSE 0 END
           AS pg_table_toast_size_bytes,
       s.n_live_tup AS pg_table_live_rows, s.n_dead_tup AS pg_table_dead_rows,
       s.seq_scan AS pg_table_seq_scans, coalesce(s.idx_scan, 0) AS pg_table_index_scans,
       coalesce(extract(epoch FROM s.last_autovacuum), 0)::float8 AS pg_table_last_autovacuum_timestamp_seconds,
       coalesce(extract(epoch FROM s.last_autoanalyze), 0)::float8 AS pg_table_last_autoanalyze_timestamp_seconds
FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid""",
    ),
    "database": (
        ["datname"],
        {"pg_database_size_bytes": "gauge", "pg_database_commits": "counter",
         "pg_database_rollbacks": "counter", "pg_database_blocks_hit": "counter",
         "pg_database_blocks_read": "counter", "pg_database_deadlocks": "counter",
         "pg_database_temp_bytes": "counter"},
        """
SELECT d.datname, pg_database_size(d.oid) AS pg_database_size_bytes,
       s.xact_commit AS pg_database_commits, s.xact_rollback AS pg_database_rollbacks,
       s.blks_hit AS pg_database_blocks_hit, s.blks_read AS pg_database_blocks_read,
       s.deadlocks AS pg_database_deadlocks, s.temp_bytes AS pg_database_temp_bytes
FROM pg_database d JOIN pg_stat_database s ON s.datid = d.oid
WHERE d.datallowconn""",
    ),
}


def query_exporter_config(dsn: str) -> dict:
    """query-exporter's config: one query per label set, no `interval`, so every query runs on
    every scrape (its default, "aperiodic" mode)."""
    metrics: dict[str, dict] = {}
    queries: dict[str, dict] = {}
    for name, (labels, fams, sql) in _QE_QUERIES.items():
        for fam, kind in fams.items():
            metrics[fam] = {"type": "gauge" if kind == "gauge" else "counter",
                            "description": fam.replace("_", " ")}
            if labels:
                metrics[fam]["labels"] = labels
        queries[name] = {"databases": ["bench"], "metrics": list(fams), "sql": sql.strip()}
    return {
        "databases": {"bench": {"dsn": dsn.replace("postgresql://", "postgresql+psycopg2://", 1)}},
        "metrics": metrics,
        "queries": queries,
    }
