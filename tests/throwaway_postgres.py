"""A throwaway PostgreSQL server for the tests and bench/faults.py, as broker_config/broker.py is their Mosquitto.

initdb'd into a temporary folder, listening on a free loopback port and on a socket in that folder, trust auth;
stopped and removed on exit. It never touches the machine's own server, whether that one runs or not.

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as the ``postgres`` user (made by
Debian's package), or ``nobody``, with the folder given to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from broker_config.broker import LOOPBACK, free_port

OVERRIDE_VARIABLE = "MQVOX_TEST_POSTGRES_URL"
"""An existing server to use instead (``postgresql+psycopg://USER@HOST:PORT/DB``, a database to work beside)."""

SUPERUSER = "postgres"
"""The server's superuser, made by initdb; trust auth, no password."""

DATABASE = "test"
"""The database made on start, which the URL names: the tests make schemas in it, the bench databases beside it."""

RUN_AS_WHEN_ROOT = ("postgres", "nobody")
"""Unprivileged users to run initdb and the server as when we are root, the first that exists."""

DURABILITY_OFF = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
"""Server settings: nothing in a throwaway server needs to survive a crash of the machine, and the suite's
databases are made and dropped by the hundred on 2 cores."""


class PostgresStartError(RuntimeError):
    """No server binaries, or the server did not start and accept connections in time."""


def server_binaries() -> Path:
    """The folder with ``initdb`` and ``postgres``: beside ``initdb`` on PATH, else ``pg_config --bindir``, else
    the newest ``/usr/lib/postgresql/*/bin`` (Debian's layout, where they are not on PATH)."""
    candidates = []
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).resolve().parent)  # Debian's are links into /usr/lib/postgresql/N/bin
    if pg_config := shutil.which("pg_config"):
        done = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if done.returncode == 0 and done.stdout.strip():
            candidates.append(Path(done.stdout.strip()))
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(folder) for folder in sorted(versions, key=_major_version, reverse=True)]
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise PostgresStartError(
        "no PostgreSQL server binaries (initdb, postgres) on PATH, from pg_config or in /usr/lib/postgresql/*/bin: "
        f"run `make setup` (Debian package 'postgresql'), or set {OVERRIDE_VARIABLE} to an existing server"
    )


def _major_version(folder: str) -> int:
    version = Path(folder).parent.name
    return int(version) if version.isdigit() else -1


@dataclass
class ThrowawayPostgres:
    """One PostgreSQL server of its own in a temporary folder. A context manager, or start() / stop()."""

    startup_timeout_s: float = 60.0
    """How long initdb plus the server's start may take before giving up."""
    root: Path | None = None
    """The temporary folder: ``data/`` (the cluster), the socket and ``postgres.log``; set by start()."""
    port: int = 0
    """The loopback TCP port it listens on; set by start()."""
    process: subprocess.Popen | None = None
    _run_as: str | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of its ``test`` database, over TCP."""
        return f"postgresql+psycopg://{SUPERUSER}@{LOOPBACK}:{self.port}/{DATABASE}"

    def start(self) -> ThrowawayPostgres:
        """initdb, start the server, wait until it accepts connections, make the ``test`` database."""
        binaries = server_binaries()
        self._run_as = _unprivileged_user() if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="mqvox-postgres-"))
        try:
            if self._run_as is not None:
                shutil.chown(self.root, user=self._run_as)
            deadline = time.monotonic() + self.startup_timeout_s
            initdb = [binaries / "initdb", "-D", self.data_dir, "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8"]
            self._run([*initdb, "--locale=C", "--no-sync", "--no-instructions"], timeout_s=self.startup_timeout_s)
            for _ in range(3):  # another program may take the free port before the server binds it
                self.port = free_port()
                self._launch(binaries / "postgres")
                if self._wait_accepting(deadline):
                    break
                self._reap()
                if "could not bind" not in self._log_tail() or time.monotonic() >= deadline:
                    raise PostgresStartError(f"PostgreSQL did not start: {self._log_tail() or 'no output'}")
            else:
                raise PostgresStartError(f"PostgreSQL found no free port: {self._log_tail()}")
            with self._connect("postgres") as connection:
                connection.execute(f'CREATE DATABASE "{DATABASE}"')
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions ended, no waiting for them), SIGKILL after ``timeout_s``; the folder
        is removed."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, command: list, timeout_s: float) -> None:
        done = subprocess.run(
            [str(part) for part in command],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            **self._as_user(),
        )
        if done.returncode != 0:
            raise PostgresStartError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()}")

    def _launch(self, postgres: Path) -> None:
        settings = [f"listen_addresses={LOOPBACK}", f"port={self.port}", f"unix_socket_directories={self.root}"]
        command = [str(postgres), "-D", str(self.data_dir)]
        for setting in settings + list(DURABILITY_OFF):
            command += ["-c", setting]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C in the terminal is for pytest, which then stops the server
                **self._as_user(),
            )

    def _wait_accepting(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with self._connect("postgres"):
                    return True
            except psycopg.OperationalError:
                time.sleep(0.05)
        return False

    def _connect(self, database: str) -> psycopg.Connection:
        return psycopg.connect(
            host=LOOPBACK, port=self.port, user=SUPERUSER, dbname=database, connect_timeout=2, autocommit=True
        )

    def _as_user(self) -> dict:
        if self._run_as is None:
            return {}
        return {"user": self._run_as, "group": pwd.getpwnam(self._run_as).pw_gid, "extra_groups": []}

    def _reap(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def _log_tail(self, lines: int = 20) -> str:
        if self.root is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _unprivileged_user() -> str:
    for name in RUN_AS_WHEN_ROOT:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PostgresStartError(
        f"PostgreSQL does not run as root, and none of the users {', '.join(RUN_AS_WHEN_ROOT)} exists to run it as"
    )
