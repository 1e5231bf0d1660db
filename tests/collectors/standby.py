"""A streaming standby of a throwaway primary: pg_basebackup -R into a cluster of its own,
started as the same unprivileged user as the primary (exporter.demo.servers.PostgresCluster)."""

from __future__ import annotations

import os

from exporter.demo.servers import PostgresCluster


def allow_replication(primary: PostgresCluster) -> None:
    """pg_hba's `all` does not cover replication connections: let the superuser stream over the
    socket, then reload."""
    with open(primary.datadir / "pg_hba.conf", "a") as f:
        f.write("local replication postgres trust\n")
    primary.psql("SELECT pg_reload_conf()")


class StandbyCluster(PostgresCluster):
    """`with StandbyCluster(primary) as standby:` a hot standby streaming from `primary`."""

    def __init__(self, primary: PostgresCluster, slot: str | None = None) -> None:
        super().__init__(bindir=primary.bindir)
        self.primary = primary
        self.slot = slot  # a physical slot on the primary, created by pg_basebackup -C

    def init(self) -> StandbyCluster:
        self.sockdir.mkdir(parents=True)
        if self._ids:
            os.chmod(self.base, 0o755)
            for p in (self.base, self.sockdir):
                os.chown(p, *self._ids)
        r = self._run([
            str(self.bindir / "pg_basebackup"), "-D", str(self.datadir), "-R", "-X", "stream",
            "-h", str(self.primary.sockdir), "-p", str(self.primary.port), "-U", self.superuser,
            "--no-sync", "-c", "fast", *(["-C", "-S", self.slot] if self.slot else []),
        ])
        if r.returncode != 0:
            raise RuntimeError(f"pg_basebackup failed: {r.stderr.strip()}")
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(f"port = {self.port}\nunix_socket_directories = '{self.sockdir}'\n")
        return self

    def __enter__(self) -> StandbyCluster:
        try:
            self.init().start()
        except BaseException:
            self.remove()
            raise
        return self
