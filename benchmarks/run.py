"""pgcache-exporter against postgres_exporter and query-exporter, side by side in one run.

    python benchmarks/run.py                      # full: 2,000 tables / 5,000 statements, scale 500/2,000/8,000
    python benchmarks/run.py --scale 100,200,400  # a quicker growth curve
    python benchmarks/run.py --smoke              # tiny, one round, cached anchors only (the CI smoke test)

Builds the catalog (benchmarks/catalog.py) on a throwaway cluster, gives every exporter its own
PostgreSQL role (member of pg_monitor) so pg_stat_statements tells their database time apart, starts
the three exporters on it, and measures, alternating the exporters round by round (the ones not
being measured are SIGSTOPped, so they neither take CPU nor touch the database meanwhile):

- scrape latency p50/p99 with 1 and with 4 concurrent scrapers, bytes and series per scrape;
- database time (total_exec_time + total_plan_time of top-level statements, per role) and exporter
  CPU (utime + stime from /proc) per hour, at a 15 s scrape interval and at each exporter's
  default intervals. The anchors query the database on every scrape, so their cost per scrape is
  measured over the sequential scrapes and multiplied by 240 scrapes/hour (plus their idle CPU).
  Ours collects on its own schedule, so a separate daemon runs in compressed time (every interval
  divided by --compress, scraped at 15 s / --compress) for a window, and the window's cost is
  scaled to an hour;
- peak RSS (VmHWM) of each exporter;
- for ours, one full collection round against the raw SQL floor (benchmarks/floor.py), and its
  growth with N on fresh catalogs;
- the cache hit path benchmark (benchmarks/cache_bench.py), when present.

Writes benchmarks/RESULTS.md (and results.json beside it, for tools and the smoke test).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import anchors  # noqa: E402
import procstat  # noqa: E402
from catalog import DB, build_catalog, start_cluster  # noqa: E402
from floor import RoundResult, ours_config, run_round_vs_floor  # noqa: E402

from exporter.demo.servers import PostgresCluster, free_port  # noqa: E402

PASSWORD = "bench"
ROLES = {"ours": "bench_ours", "postgres_exporter": "bench_pgexp",
         "query-exporter": "bench_qe", "floor": "bench_floor"}
OURS_BIN = Path(sys.executable).parent / "pgcache-exporter"
OUR_DEFAULTS = {"activity": 15, "statements": 30, "indexes": 300, "tables": 300, "database": 30}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- scraping ------------------------------------------------------------------------------------

@dataclass
class Scrape:
    seconds: float
    wire_bytes: int
    body: bytes | None = None  # decompressed, kept only when asked


def scrape(port: int, keep: bool = False, timeout: float = 120) -> Scrape:
    """One GET /metrics as Prometheus does it (gzip accepted), timed to the last byte."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics", headers={"Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        raw = resp.read()
        dt = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"/metrics on port {port} answered {resp.status}: {raw[:200]!r}")
        body = None
        if keep:
            body = gzip.decompress(raw) if resp.getheader("Content-Encoding") == "gzip" else raw
        return Scrape(dt, len(raw), body)
    finally:
        conn.close()


def count_series(body: bytes) -> int:
    return sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


# -- database time per role ------------------------------------------------------------------------

def db_ms_by_role(cluster: PostgresCluster) -> dict[str, float]:
    """Cumulative exec + plan milliseconds of top-level statements, per benchmark role."""
    out = cluster.psql(
        "SELECT r.rolname, sum(s.total_exec_time + s.total_plan_time) "
        "FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
        "WHERE s.toplevel AND r.rolname LIKE 'bench\\_%' GROUP BY 1",
        db=DB,
    )
    res = {}
    for line in out.splitlines():
        name, ms = line.split("|")
        res[name] = float(ms)
    return res


def dealloc(cluster: PostgresCluster) -> int:
    return int(cluster.psql("SELECT dealloc FROM pg_stat_statements_info", db=DB) or 0)


def create_roles(cluster: PostgresCluster) -> None:
    for role in ROLES.values():
        cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}' IN ROLE pg_monitor")


def role_dsn(cluster: PostgresCluster, who: str) -> str:
    return cluster.dsn_for(ROLES[who], PASSWORD, db=DB)


# -- exporter processes ------------------------------------------------------------------------------

@dataclass
class Exporter:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    ready_marker: bytes | None = None
    proc: subprocess.Popen[bytes] | None = None
    logfile: Path | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, workdir: Path, timeout: float = 120) -> Exporter:
        self.logfile = workdir / f"{self.name.replace(' ', '_')}-{self.port}.log"
        with self.logfile.open("wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                self.argv, env={**os.environ, **self.env}, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            with suppress(OSError, RuntimeError, http.client.HTTPException):
                s = scrape(self.port, keep=self.ready_marker is not None, timeout=timeout)
                if self.ready_marker is None or (s.body and self.ready_marker_ok(s.body)):
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready within {timeout}s: {self.log_tail()}")

    def ready_marker_ok(self, body: bytes) -> bool:
        # Ours: every PostgreSQL collector has finished one successful run.
        ok = re.findall(rb'pgcache_collector_success\{[^}]*collector="(\w+)"[^}]*\} 1', body)
        return set(OUR_DEFAULTS) <= {c.decode() for c in ok}

    def log_tail(self) -> str:
        return self.logfile.read_text(errors="replace")[-1500:] if self.logfile else ""

    def pause(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGCONT)
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()


def ours_exporter(cluster: PostgresCluster, workdir: Path, intervals: dict[str, float] | None,
                  tag: str) -> Exporter:
    port = free_port()
    cfg = ours_config(role_dsn(cluster, "ours"), intervals, listen=f"127.0.0.1:{port}")
    path = workdir / f"ours-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Exporter("ours", [str(OURS_BIN), "--config.file", str(path)], port, ready_marker=b"x")


def pgexp_exporter(cluster: PostgresCluster, binary: Path) -> Exporter:
    port = free_port()
    return Exporter(
        "postgres_exporter",
        [str(binary), f"--web.listen-address=127.0.0.1:{port}", *anchors.POSTGRES_EXPORTER_FLAGS],
        port, env={"DATA_SOURCE_NAME": role_dsn(cluster, "postgres_exporter") + "?sslmode=disable"},
    )


def qe_exporter(cluster: PostgresCluster, binary: Path, workdir: Path) -> Exporter:
    port = free_port()
    path = workdir / "query-exporter.yaml"
    path.write_text(yaml.safe_dump(anchors.query_exporter_config(role_dsn(cluster, "query-exporter")),
                                   sort_keys=False))
    return Exporter("query-exporter", [str(binary), "--config", str(path), "-H", "127.0.0.1",
                                       "-p", str(port), "-L", "warning"], port)


# -- measurements -------------------------------------------------------------------------------------

@dataclass
class Samples:
    lat1: list[float] = field(default_factory=list)
    lat4: list[float] = field(default_factory=list)
    wire_bytes: list[int] = field(default_factory=list)
    body_bytes: list[int] = field(default_factory=list)
    series: list[int] = field(default_factory=list)
    # per-scrape costs (anchors): db ms and cpu s per scrape, idle cpu s per second
    db_ms_per_scrape: list[float] = field(default_factory=list)
    cpu_per_scrape: list[float] = field(default_factory=list)
    idle_cpu_rate: list[float] = field(default_factory=list)
    # windows (ours): per-hour figures from compressed-time windows
    db_s_h_15: list[float] = field(default_factory=list)
    db_s_h_def: list[float] = field(default_factory=list)
    cpu_s_h_15: list[float] = field(default_factory=list)
    cpu_s_h_def: list[float] = field(default_factory=list)
    runs_note: list[str] = field(default_factory=list)
    peak_rss: int = 0


def latency_phase(cluster: PostgresCluster, exp: Exporter, smp: Samples, scrapes: int,
                  per_thread: int, anchor: bool) -> None:
    role = ROLES["ours" if exp.name == "ours" else exp.name]
    # Idle CPU (anchors only: ours is measured in its own windows).
    if anchor:
        c0, t0 = procstat.tree_cpu_seconds(exp.pid), time.monotonic()
        time.sleep(2)
        smp.idle_cpu_rate.append((procstat.tree_cpu_seconds(exp.pid) - c0) / (time.monotonic() - t0))
    first = scrape(exp.port, keep=True)
    assert first.body is not None
    smp.wire_bytes.append(first.wire_bytes)
    smp.body_bytes.append(len(first.body))
    smp.series.append(count_series(first.body))
    db0 = db_ms_by_role(cluster).get(role, 0.0)
    cpu0 = procstat.tree_cpu_seconds(exp.pid)
    for _ in range(scrapes):
        smp.lat1.append(scrape(exp.port).seconds)
    cpu1 = procstat.tree_cpu_seconds(exp.pid)
    db1 = db_ms_by_role(cluster).get(role, 0.0)
    if anchor:
        smp.db_ms_per_scrape.append((db1 - db0) / scrapes)
        smp.cpu_per_scrape.append((cpu1 - cpu0) / scrapes)

    results: list[float] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(per_thread):
                results.append(scrape(exp.port).seconds)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    smp.lat4.extend(results)


def runs_total(body: bytes) -> dict[str, float]:
    return {c.decode(): float(v) for c, v in re.findall(
        rb'pgcache_collector_runs_total\{[^}]*collector="(\w+)"[^}]*\} (\S+)', body)}


def ours_window(cluster: PostgresCluster, workdir: Path, intervals: dict[str, float],
                compress: float, window: float, tag: str) -> tuple[float, float, str, int]:
    """Run our daemon with every interval divided by `compress`, scraped every 15 s / compress,
    for `window` seconds; returns (db s/h, cpu s/h, runs note, peak rss)."""
    fast = {c: iv / compress for c, iv in intervals.items()}
    exp = ours_exporter(cluster, workdir, fast, tag).start(workdir)
    try:
        time.sleep(min(fast.values()) * 0.37)  # off the scheduler's beat
        before = scrape(exp.port, keep=True).body or b""
        db0 = db_ms_by_role(cluster).get(ROLES["ours"], 0.0)
        cpu0 = procstat.tree_cpu_seconds(exp.pid)
        t0 = time.monotonic()
        step = 15 / compress
        n = 0
        while True:
            n += 1
            target = t0 + n * step
            if target > t0 + window:
                break
            time.sleep(max(0.0, target - time.monotonic()))
            scrape(exp.port)
        time.sleep(max(0.0, t0 + window - time.monotonic()))
        cpu1 = procstat.tree_cpu_seconds(exp.pid)
        db1 = db_ms_by_role(cluster).get(ROLES["ours"], 0.0)
        elapsed = time.monotonic() - t0
        after = scrape(exp.port, keep=True).body or b""
        r0, r1 = runs_total(before), runs_total(after)
        got = {c: r1.get(c, 0) - r0.get(c, 0) for c in intervals}
        want = {c: elapsed / fast[c] for c in intervals}
        note = ", ".join(f"{c} {got[c]:.0f}/{want[c]:.1f}" for c in intervals)
        scale = 3600 / (elapsed * compress)
        return (db1 - db0) / 1000 * scale, (cpu1 - cpu0) * scale, note, \
            procstat.tree_peak_rss_bytes(exp.pid)
    finally:
        exp.stop()


# -- the whole run ---------------------------------------------------------------------------------------

def versions(pgexp_version: str | None, qe_version: str | None, cluster: PostgresCluster) -> dict[str, str]:
    from importlib.metadata import version
    v = {
        "pgcache-exporter": version("pgcache-exporter"),
        "PostgreSQL": cluster.psql("SHOW server_version"),
        "pg_stat_statements": cluster.psql(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'", db=DB),
        "Python": platform.python_version(),
        "asyncpg / SQLAlchemy": f"{version('asyncpg')} / {version('sqlalchemy')}",
    }
    if pgexp_version:
        v["postgres_exporter"] = pgexp_version.replace("postgres_exporter, ", "")
    if qe_version:
        v["query-exporter"] = qe_version.replace("query-exporter ", "")
    return v


def run_cache_bench(smoke: bool) -> dict[str, Any] | None:
    script = HERE / "cache_bench.py"
    if not script.exists():
        return None
    args = [sys.executable, str(script)] + (["--smoke"] if smoke else [])
    r = subprocess.run(args, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    out: dict[str, Any] = {"command": "python benchmarks/cache_bench.py" + (" --smoke" if smoke else ""),
                           "returncode": r.returncode, "stdout": r.stdout.strip(),
                           "stderr": r.stderr.strip()[-1500:], "ratios": {}}
    for name, us, ratio in re.findall(r"(?m)^(\w+)\s+([\d.]+)\s+([\d.]+)x$", r.stdout):
        out["ratios"][name] = {"us": float(us), "vs_raw": float(ratio)}
    return out


def run(opts: argparse.Namespace) -> dict[str, Any]:
    t_start = time.monotonic()
    load0 = os.getloadavg()
    pgexp_bin = qe_bin = None
    pgexp_version = qe_version = None
    wanted = set(opts.anchors)
    if opts.cached_anchors_only:
        wanted &= set(anchors.cached_anchors())
    if "postgres_exporter" in wanted:
        pgexp_bin, pgexp_version = anchors.ensure_postgres_exporter(log)
    if "query-exporter" in wanted:
        qe_bin, qe_version = anchors.ensure_query_exporter(log)

    workdir = Path(tempfile.mkdtemp(prefix="pgcache-bench-"))
    results: dict[str, Any] = {"args": vars(opts), "exporters": {}, "scale": []}
    log(f"building the catalog: {opts.tables} tables, {opts.statements} statements")
    cat = build_catalog(opts.tables, opts.statements, opts.large_tables, opts.large_rows)
    cluster = cat.cluster
    exporters: list[Exporter] = []
    try:
        create_roles(cluster)
        log(f"catalog built in {cat.build_seconds:.1f}s")
        results["catalog"] = {
            "tables": cat.tables + cat.large_tables, "indexes": cat.indexes,
            "statements": int(cluster.psql("SELECT count(*) FROM pg_stat_statements", db=DB)),
            "build_seconds": round(cat.build_seconds, 1),
        }
        results["versions"] = versions(pgexp_version, qe_version, cluster)

        exporters.append(ours_exporter(cluster, workdir, dict(OUR_DEFAULTS), "main"))
        if pgexp_bin:
            exporters.append(pgexp_exporter(cluster, pgexp_bin))
        if qe_bin:
            exporters.append(qe_exporter(cluster, qe_bin, workdir))
        for e in exporters:
            e.start(workdir)
            scrape(e.port)  # warm-up
            log(f"{e.name} ready on port {e.port}")
        samples = {e.name: Samples() for e in exporters}
        dealloc0 = dealloc(cluster)

        for rnd in range(opts.rounds):
            order = exporters[rnd % len(exporters):] + exporters[:rnd % len(exporters)]
            for e in order:
                for other in exporters:
                    (other.resume if other is e else other.pause)()
                log(f"round {rnd + 1}/{opts.rounds}: {e.name}")
                latency_phase(cluster, e, samples[e.name], opts.scrapes, opts.scrapes_per_thread,
                              anchor=e.name != "ours")
                if e.name == "ours":
                    e.pause()
                    smp = samples["ours"]
                    for tag, intervals, window, dbl, cpul in (
                        ("15s", dict.fromkeys(OUR_DEFAULTS, 15), opts.window_15,
                         smp.db_s_h_15, smp.cpu_s_h_15),
                        ("defaults", dict(OUR_DEFAULTS), opts.window_defaults,
                         smp.db_s_h_def, smp.cpu_s_h_def),
                    ):
                        db_h, cpu_h, note, rss = ours_window(
                            cluster, workdir, intervals, opts.compress, window, f"{tag}-{rnd}")
                        dbl.append(db_h)
                        cpul.append(cpu_h)
                        smp.runs_note.append(f"{tag}: {note}")
                        smp.peak_rss = max(smp.peak_rss, rss)
        for e in exporters:
            e.resume()
        time.sleep(0.5)
        for e in exporters:
            samples[e.name].peak_rss = max(samples[e.name].peak_rss, procstat.tree_peak_rss_bytes(e.pid))
        results["pg_stat_statements_deallocations_during_run"] = dealloc(cluster) - dealloc0
        for e in exporters:
            results["exporters"][e.name] = summarize(e.name, samples[e.name])
        for e in exporters:
            e.stop()
        exporters = []

        log("round vs raw SQL floor")
        main_round = run_round_vs_floor(role_dsn(cluster, "ours"), role_dsn(cluster, "floor"),
                                        cat.tables + cat.large_tables, opts.floor_rounds)
    finally:
        for e in exporters:
            e.stop()
        cluster.remove()
        shutil.rmtree(workdir, ignore_errors=True)

    scale_results: list[RoundResult] = []
    for n in opts.scale:
        if n == opts.tables:
            scale_results.append(main_round)
            continue
        log(f"scale point: {n} tables")
        c = start_cluster(opts.statements)
        try:
            cat_n = build_catalog(n, opts.statements, opts.large_tables, opts.large_rows, cluster=c)
            create_roles(c)
            scale_results.append(run_round_vs_floor(
                role_dsn(c, "ours"), role_dsn(c, "floor"), cat_n.tables + cat_n.large_tables,
                opts.floor_rounds))
        finally:
            c.remove()
    if opts.tables not in opts.scale:
        scale_results.append(main_round)
    scale_results.sort(key=lambda r: r.tables)
    results["round_vs_floor"] = round_dict(main_round)
    results["scale"] = [round_dict(r) for r in scale_results]

    if not opts.no_cache_bench:
        log("cache benchmark")
        results["cache"] = run_cache_bench(opts.smoke)
    results["load_average_start"] = [round(x, 2) for x in load0]
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["cpus"] = os.cpu_count()
    results["seconds"] = round(time.monotonic() - t_start, 1)
    return results


def round_dict(r: RoundResult) -> dict[str, Any]:
    return {"tables": r.tables, "round_ms": r.round_s * 1000, "floor_ms": r.floor_s * 1000,
            "ratio": r.ratio, "rounds": r.rounds,
            "per_collector_ms": {k: v * 1000 for k, v in r.per_collector_s.items()},
            "per_statement_floor_ms": {k: v * 1000 for k, v in r.per_statement_floor_s.items()}}


def summarize(name: str, s: Samples) -> dict[str, Any]:
    out: dict[str, Any] = {
        "scrapes_1": len(s.lat1), "scrapes_4": len(s.lat4),
        "p50_1_ms": pct(s.lat1, 50) * 1000, "p99_1_ms": pct(s.lat1, 99) * 1000,
        "p50_4_ms": pct(s.lat4, 50) * 1000, "p99_4_ms": pct(s.lat4, 99) * 1000,
        "wire_bytes": statistics.median(s.wire_bytes), "body_bytes": statistics.median(s.body_bytes),
        "series": statistics.median(s.series),
        "peak_rss_mb": s.peak_rss / 2**20,
    }
    if name == "ours":
        out["db_s_per_h_15s"] = statistics.median(s.db_s_h_15)
        out["db_s_per_h_default"] = statistics.median(s.db_s_h_def)
        out["cpu_s_per_h_15s"] = statistics.median(s.cpu_s_h_15)
        out["cpu_s_per_h_default"] = statistics.median(s.cpu_s_h_def)
        out["runs_in_windows"] = s.runs_note
    else:
        db_per_scrape = statistics.median(s.db_ms_per_scrape) / 1000
        cpu_per_scrape = statistics.median(s.cpu_per_scrape)
        idle = statistics.median(s.idle_cpu_rate) * 3600
        out["db_s_per_scrape"] = db_per_scrape
        out["cpu_s_per_scrape"] = cpu_per_scrape
        out["idle_cpu_s_per_h"] = idle
        # Scrape-driven: their own default is "on every scrape", so both columns are the 15 s one.
        out["db_s_per_h_15s"] = out["db_s_per_h_default"] = db_per_scrape * 240
        out["cpu_s_per_h_15s"] = out["cpu_s_per_h_default"] = cpu_per_scrape * 240 + idle
    return out


# -- the report ---------------------------------------------------------------------------------------

TARGETS = [
    # (label, metric, anchor, max ratio ours/anchor)
    ("scrape p99 (1 scraper) <= 1/20 of postgres_exporter's", "p99_1_ms", "postgres_exporter", 1 / 20),
    ("scrape p99 (4 scrapers) <= 1/20 of postgres_exporter's", "p99_4_ms", "postgres_exporter", 1 / 20),
    ("scrape p99 (1 scraper) <= 1/10 of query-exporter's", "p99_1_ms", "query-exporter", 1 / 10),
    ("scrape p99 (4 scrapers) <= 1/10 of query-exporter's", "p99_4_ms", "query-exporter", 1 / 10),
    ("DB time/h at 15 s <= 1/4 of postgres_exporter's", "db_s_per_h_15s", "postgres_exporter", 1 / 4),
    # Issue 12 (collectors as definitions): CPU at 15 s <= 0.5x, DB time at defaults <= 1/20.
    ("CPU/h (15 s) <= 0.5x postgres_exporter's", "cpu_s_per_h_15s", "postgres_exporter", 0.5),
    ("CPU/h (default intervals) <= postgres_exporter's", "cpu_s_per_h_default", "postgres_exporter", 1.0),
    ("DB time/h at default intervals <= 1/20 of postgres_exporter's", "db_s_per_h_default",
     "postgres_exporter", 1 / 20),
]

COLUMNS = [
    ("p50 1 scraper (ms)", "p50_1_ms", "{:.1f}"),
    ("p99 1 scraper (ms)", "p99_1_ms", "{:.1f}"),
    ("p50 4 scrapers (ms)", "p50_4_ms", "{:.1f}"),
    ("p99 4 scrapers (ms)", "p99_4_ms", "{:.1f}"),
    ("bytes/scrape on the wire", "wire_bytes", "{:,.0f}"),
    ("bytes/scrape uncompressed", "body_bytes", "{:,.0f}"),
    ("series/scrape", "series", "{:,.0f}"),
    ("DB s/h @15 s", "db_s_per_h_15s", "{:.1f}"),
    ("DB s/h @defaults", "db_s_per_h_default", "{:.1f}"),
    ("CPU s/h @15 s", "cpu_s_per_h_15s", "{:.1f}"),
    ("CPU s/h @defaults", "cpu_s_per_h_default", "{:.1f}"),
    ("peak RSS (MB)", "peak_rss_mb", "{:.1f}"),
]


def target_checks(res: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    ex = res["exporters"]
    ours = ex.get("ours", {})
    checks: list[tuple[str, str, bool | None]] = []
    for label, key, anchor, limit in TARGETS:
        if anchor not in ex:
            checks.append((label, "anchor not run", None))
            continue
        ratio = ours[key] / ex[anchor][key] if ex[anchor][key] else float("inf")
        checks.append((label, f"{ratio:.3f} (limit {limit:.3g})", ratio <= limit))
    rss = ours.get("peak_rss_mb", 0)
    n = res["catalog"]["tables"]
    checks.append((f"peak RSS <= 90 MB (at {n:,} tables)", f"{rss:.1f} MB", rss <= 90))
    rv = res["round_vs_floor"]
    checks.append(("full round <= 1.3x raw SQL floor", f"{rv['ratio']:.2f}x", rv["ratio"] <= 1.3))
    sc = res["scale"]
    if len(sc) >= 3:
        # Linear: the cost of each added table stays the same along the curve (a fixed cost,
        # e.g. the statements collector, which scales with M rather than N, is allowed).
        slopes = [(b["round_ms"] - a["round_ms"]) / (b["tables"] - a["tables"])
                  for a, b in zip(sc, sc[1:], strict=False)]
        ok = min(slopes) > 0 and max(slopes) / min(slopes) <= 1.5
        checks.append(("growth linear in N (ms per added table within 1.5x along the curve)",
                       ", ".join(f"{x:.3f}" for x in slopes) + " ms/table", ok))
    cache = res.get("cache") or {}
    r = cache.get("ratios", {})
    if "pgcache" in r:
        checks.append(("cache hit <= 1.3x raw GET + decode", f"{r['pgcache']['vs_raw']:.2f}x",
                       r["pgcache"]["vs_raw"] <= 1.3))
        others = [x for x in ("cashews", "aiocache") if x in r]
        if others:
            ok = all(r["pgcache"]["us"] <= r[o]["us"] for o in others)
            checks.append(("cache hit at least as fast as cashews and aiocache",
                           ", ".join(f"{o} {r[o]['us']:.1f} us" for o in others)
                           + f" vs ours {r['pgcache']['us']:.1f} us", ok))
    return checks


def render(res: dict[str, Any], command: str) -> str:
    ex = res["exporters"]
    names = list(ex)
    cat = res["catalog"]
    a = res["args"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `{command}` in {res['seconds']:.0f} s on {res['cpus']} CPUs "
        f"(load average at start {res['load_average_start'][0]}, at end {res['load_average_end'][0]}; "
        "the machine is shared, so absolute times carry noise — the ratios come from the same "
        "invocation with the exporters alternating).",
        "",
        f"Catalog: {cat['tables']:,} tables, {cat['indexes']:,} indexes, {cat['statements']:,} "
        f"pg_stat_statements entries (built in {cat['build_seconds']} s). {a['rounds']} round(s), "
        f"each exporter {a['scrapes']} sequential scrapes + 4 x {a['scrapes_per_thread']} concurrent "
        "scrapes per round; the others are SIGSTOPped meanwhile.",
        "",
        "## Versions",
        "",
        *[f"- {k}: {v}" for k, v in res["versions"].items()],
        "",
        "## Side by side",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for title, key, fmt in COLUMNS:
        lines.append(f"| {title} | " + " | ".join(fmt.format(ex[n][key]) for n in names) + " |")
    anchors_run = [n for n in names if n != "ours"]
    if anchors_run:
        lines += ["", "## Ratios (ours / anchor; below 1 means ours is cheaper or faster)", "",
                  "| | " + " | ".join(anchors_run) + " |", "|---|" + "---|" * len(anchors_run)]
        for title, key, _ in COLUMNS:
            cells = []
            for n in anchors_run:
                cells.append(f"{ex['ours'][key] / ex[n][key]:.3g}" if ex[n][key] else "n/a")
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for label, value, ok in target_checks(res):
        lines.append(f"| {label} | {value} | {'yes' if ok else ('—' if ok is None else '**no**')} |")

    lines += ["", "## Full collection round vs the raw SQL floor (ours)", "",
              "Median over rounds; the round is every PostgreSQL collector's `collect()` in sequence, "
              "the floor the same data statements through one asyncpg connection, sequentially "
              "(benchmarks/floor.py). Each scale point is a fresh catalog.", "",
              "| tables | round (ms) | floor (ms) | round / floor | ms per table |", "|---|---|---|---|---|"]
    for p in res["scale"]:
        lines.append(f"| {p['tables']:,} | {p['round_ms']:.1f} | {p['floor_ms']:.1f} | "
                     f"{p['ratio']:.2f}x | {p['round_ms'] / p['tables']:.3f} |")
    rv = res["round_vs_floor"]
    lines += ["", f"Per collector at {rv['tables']:,} tables (ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in rv["per_collector_ms"].items()),
        "", "Per floor statement (ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in rv["per_statement_floor_ms"].items())]

    cache = res.get("cache")
    lines += ["", "## Cache hit path", ""]
    if cache is None:
        lines.append("benchmarks/cache_bench.py is not present; no cache numbers in this run.")
    else:
        lines += [f"`{cache['command']}` (exit {cache['returncode']}):", "", "```",
                  cache["stdout"] or cache["stderr"], "```"]

    ours = ex.get("ours", {})
    lines += [
        "", "## How each figure is measured", "",
        "- Scrape latency: `GET /metrics` with `Accept-Encoding: gzip` (as Prometheus sends it), "
        "a new connection per scrape, timed to the last byte; nearest-rank p50/p99 over all rounds.",
        "- Series: non-comment lines of one scrape; bytes: as sent (gzip where the exporter "
        "compresses) and decompressed.",
        "- Database time: `sum(total_exec_time + total_plan_time)` of top-level statements in "
        "pg_stat_statements for the exporter's own role, diffed over the measurement. The anchors "
        "query the database on every scrape: their cost per scrape x 240 scrapes/hour (that is also "
        "their default: neither has its own schedule here). Ours collects on its own schedule: a "
        f"separate daemon ran with every interval divided by {a['compress']} and was scraped every "
        f"{15 / a['compress']:.2f} s, for {a['window_15']} s (all collectors at 15 s) and "
        f"{a['window_defaults']} s (defaults 15 s/30 s/5 m/5 m/30 s); the window's cost is scaled to "
        "an hour of real time.",
        "- CPU: utime + stime from /proc/PID/stat over the same spans (anchors: per scrape x 240, "
        "plus their idle CPU rate measured over 2 s); peak RSS: VmHWM at the end of the run.",
        "- Collector runs seen in our windows (actual/expected; a shortfall means a collector "
        "could not keep up with the compressed interval and the hourly figure is an under-estimate): "
        + "; ".join(ours.get("runs_in_windows", [])),
        f"- pg_stat_statements deallocations during the run: "
        f"{res.get('pg_stat_statements_deallocations_during_run', 'n/a')} (0 means no entry was "
        "evicted, so the per-role sums are complete).",
        "- Equivalence: all three export activity, statements, per-index and per-table statistics "
        "with sizes and database statistics for database `bench`. Ours at its default statements "
        "limit (200) with query text, every table and index (limits raised above the catalog); "
        "postgres_exporter with its default collectors plus "
        + ", ".join(f"`{f}`" for f in anchors.POSTGRES_EXPORTER_FLAGS if f.startswith("--collector"))
        + " (its stat_statements collector has a fixed top 100); query-exporter with the queries in "
        "benchmarks/anchors.py (top 200 statements with text, the same tables/indexes/database "
        "columns), run on every scrape (no `interval`, its default).",
    ]
    return "\n".join(lines) + "\n"


ANALYSIS_MARKER = "<!-- analysis: hand-written, kept across runs; check it against the numbers above -->"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=int, default=2000)
    p.add_argument("--statements", type=int, default=5000)
    p.add_argument("--large-tables", type=int, default=3)
    p.add_argument("--large-rows", type=int, default=200_000)
    p.add_argument("--scale", default="500,2000,8000",
                   help="table counts for the round-vs-floor growth curve ('' for none)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds over the exporters")
    p.add_argument("--scrapes", type=int, default=20, help="sequential scrapes per exporter per round")
    p.add_argument("--scrapes-per-thread", type=int, default=5,
                   help="scrapes per scraper in the 4-scraper phase, per round")
    p.add_argument("--compress", type=float, default=10,
                   help="time compression of our windows (at most 15: intervals must stay >= 1 s)")
    p.add_argument("--window-15", type=float, default=30, help="seconds of the 15 s window (ours)")
    p.add_argument("--window-defaults", type=float, default=60,
                   help="seconds of the default-intervals window (ours)")
    p.add_argument("--floor-rounds", type=int, default=5)
    p.add_argument("--anchors", default="postgres_exporter,query-exporter")
    p.add_argument("--cached-anchors-only", action="store_true",
                   help="use only anchors already in benchmarks/.cache (never download)")
    p.add_argument("--no-cache-bench", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny N, one round, cached anchors only, short windows (the CI smoke test)")
    p.add_argument("--output", default=str(HERE / "RESULTS.md"))
    p.add_argument("--render-only", metavar="RESULTS_JSON",
                   help="rewrite the report from a results.json without measuring again")
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.tables, opts.statements, opts.large_tables, opts.large_rows = 40, 150, 1, 2000
        opts.scale, opts.rounds, opts.scrapes, opts.scrapes_per_thread = "", 1, 5, 2
        opts.compress, opts.window_15, opts.window_defaults = 15, 3, 10
        opts.floor_rounds, opts.cached_anchors_only = 1, True
    opts.scale = [int(x) for x in str(opts.scale).split(",") if x.strip()]
    opts.anchors = [a.strip() for a in str(opts.anchors).split(",") if a.strip()]
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    command = "python benchmarks/run.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                            if (argv if argv is not None else sys.argv[1:]) else "")
    out = Path(opts.output)
    if opts.render_only:
        res = json.loads(Path(opts.render_only).read_text())
        command = res.get("command", command)
    else:
        res = run(opts)
        res["command"] = command
    # Hand-written analysis below the marker survives a re-run (the numbers above it do not).
    kept = ""
    if out.exists() and ANALYSIS_MARKER in out.read_text():
        kept = out.read_text().split(ANALYSIS_MARKER, 1)[1]
    out.write_text(render(res, command) + "\n" + ANALYSIS_MARKER + kept)
    out.with_name(out.stem.lower() + ".json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {out}")
    for label, value, ok in target_checks(res):
        log(f"  {'MET ' if ok else ('n/a ' if ok is None else 'MISS')} {label}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
