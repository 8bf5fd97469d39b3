"""A throwaway PostgreSQL server for tests: ``initdb`` on a temporary data directory, ``pg_ctl
start`` on a free localhost port, one database per test, ``pg_ctl stop`` and removal at the end.

PostgreSQL refuses to run as root, so under root the server commands run as the ``postgres``
user (Debian's package creates it; ``nobody`` otherwise) through ``runuser``, on a data
directory that user owns. Authentication is ``trust`` by default: the server listens on localhost
only and lives for one test session. ``PostgresServer(bindir, password="...")`` makes TCP
connections authenticate with SCRAM-SHA-256 instead (the superuser's password set by ``initdb
--pwfile``), and ``create_db`` then returns ``postgresql://postgres:<password>@...``, the form the
docs show, so tests can check where that password goes.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def find_bindir() -> Path | None:
    """The directory of ``initdb`` / ``pg_ctl``: on PATH, or Debian's /usr/lib/postgresql/<v>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path:  # often a link (/usr/local/bin/pg_ctl) to the real bin directory, which has createdb
        bindir = Path(on_path).resolve().parent
        if (bindir / "initdb").exists():
            return bindir
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """``with PostgresServer(bindir) as pg: pg.create_db("x")`` -> ``postgresql://postgres@127.0.0.1:<port>/x``
    (with ``password``: ``postgresql://postgres:<password>@127.0.0.1:<port>/x``, SCRAM authentication)."""

    def __init__(self, bindir: Path, password: str | None = None):
        self.bindir = bindir
        self.password = password
        self.port = free_port()
        self.user = None
        if os.geteuid() == 0:
            names = [p.pw_name for p in pwd.getpwall()]
            self.user = "postgres" if "postgres" in names else "nobody"
        # Not under pytest's tmp_path: its parents are private to root, the server user must enter.
        self.dir = Path(tempfile.mkdtemp(prefix="adabudget-pg-"))
        self.data = self.dir / "data"

    def _as_server_user(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120, **kwargs)

    def start(self) -> PostgresServer:
        if self.user is not None:
            shutil.chown(self.dir, self.user)
        auth = ["--auth=trust"]
        # with a password, TCP connections (every test URL) need it; the server's own socket stays trust
        if self.password is not None:
            pwfile = self.dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self.user is not None:
                shutil.chown(pwfile, self.user)
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self._as_server_user(
            ["initdb", "-D", str(self.data), "-U", "postgres", *auth, "-E", "UTF8", "--no-sync"]
        )
        if self.password is not None:
            (self.dir / "pwfile").unlink()
        # fsync off: a test server need not survive a power cut
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        )
        try:
            self._as_server_user(
                [
                    "pg_ctl",
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.dir / "server.log"),
                    "-o",
                    options,
                ]
            )
        except subprocess.CalledProcessError as err:
            log = (self.dir / "server.log").read_text() if (self.dir / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {err.stderr}\n{log}") from err
        return self

    def create_db(self, name: str) -> str:
        env = dict(os.environ, **({"PGPASSWORD": self.password} if self.password is not None else {}))
        subprocess.run(
            [str(self.bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
            check=True,
            capture_output=True,
            timeout=60,
            env=env,
        )
        login = "postgres" if self.password is None else f"postgres:{self.password}"
        return f"postgresql://{login}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._as_server_user(["pg_ctl", "stop", "-D", str(self.data), "-m", "immediate"])
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
