"""An embedded PostgreSQL server from the `pgserver` package's binaries.

Used by `payment-service run` when no database is configured, and by the tests and benchmarks
when no other PostgreSQL is offered. The server listens on 127.0.0.1 only, with trust
authentication; its data directory survives restarts, and so does its port: the one it listened
on last time (remembered in the data directory, so a DATABASE_URL someone saved keeps working),
else the caller's preferred one, else any free one. PostgreSQL refuses to run as root, so as root
the server runs as the unprivileged `pgserver` user (created on first use).
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from payment_service.config import ConfigurationError

logger = logging.getLogger(__name__)

SYSTEM_USER = "pgserver"
START_TIMEOUT_SECONDS = 60
PORT_FILE = "payment_service.port"  # in the data directory: the port the server last listened on


def _bin_dir() -> Path:
    import warnings

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; pgserver reads it at import.
        warnings.simplefilter("ignore")
        try:
            # A private name of pgserver's: the version is pinned in pyproject's `embedded` extra.
            from pgserver._commands import POSTGRES_BIN_PATH
        except ImportError:
            raise EmbeddedUnavailable(
                "the embedded PostgreSQL is not installed: install the 'embedded' extra "
                "(pip install 'payment-service[embedded]'; `make install` does) or set "
                "DATABASE_URL"
            ) from None
    return Path(POSTGRES_BIN_PATH)


class EmbeddedUnavailable(ConfigurationError):
    """The `pgserver` package (the `embedded` extra) is not installed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Nothing listens on host:port now (the port can be bound)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir`: `start()`, `stop()`, `dsn()`.

    `port` fixes the port; without it the server takes the one it had last time, else
    `preferred_port`, else a free one (skipping one that is taken now).
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        preferred_port: int | None = None,
        settings: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.preferred_port = preferred_port
        self.settings = tuple(settings)
        self.bin_dir = _bin_dir()
        self._as_root = os.geteuid() == 0

    # -- process plumbing ---------------------------------------------------------------------
    def _run(self, program: str, *args: str, timeout: float = START_TIMEOUT_SECONDS) -> str:
        command = [str(self.bin_dir / program), *args]
        result = subprocess.run(
            command,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=SYSTEM_USER if self._as_root else None,
            cwd="/",
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
            )
        return result.stdout

    def _prepare_root(self) -> None:
        """Let the unprivileged user run the binaries and own the data directory."""
        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SYSTEM_USER,
                ],
                check=True,
                capture_output=True,
            )
            entry = pwd.getpwnam(SYSTEM_USER)
        # Every ancestor of the data directory and of the binaries must be traversable by that
        # user (a checkout in a private folder, such as one `mktemp -d` made, holds the binaries).
        install = self.bin_dir.parent
        for folder in {*self.data_dir.parent.parents, self.data_dir.parent, *install.parents}:
            mode = folder.stat().st_mode
            if mode & 0o011 != 0o011:
                folder.chmod(mode | 0o011)
        for path in [install, *install.rglob("*")]:
            mode = path.stat().st_mode
            wanted = mode | (0o055 if path.is_dir() or os.access(path, os.X_OK) else 0o044)
            if wanted != mode:
                path.chmod(wanted)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    # -- public ---------------------------------------------------------------------------------
    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        if self.initialised:
            return
        if self._as_root:
            self._prepare_root()
        else:
            self.data_dir.mkdir(mode=0o700, parents=False, exist_ok=True)
        logger.info("initialising embedded PostgreSQL", extra={"data_dir": str(self.data_dir)})
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "-U",
            "postgres",
        )

    def running(self) -> bool:
        try:
            self._run("pg_ctl", "status", "-D", str(self.data_dir), timeout=10)
        except RuntimeError:
            return False
        return True

    def start(self) -> None:
        """Start the server (initialising it first if needed); wait until it accepts connections."""
        self.init()
        if self._as_root:
            self._prepare_root()
        if self.running():
            # A server left over from an unclean stop: reuse it only if we know its port.
            self.port = self.port or self._port_from_pidfile()
            if self.port:
                self._remember_port()
                return
            self.stop()
        if self.port is not None:
            self._start_on(self.port)
        else:
            self.port = self._choose_port()
            try:
                self._start_on(self.port)
            except RuntimeError:
                # The port was taken between the check and the start (another server starting
                # at the same moment): any free one will do.
                self.port = free_port()
                self._start_on(self.port)
        self._remember_port()

    def _start_on(self, port: int) -> None:
        options = [
            "-h 127.0.0.1",
            f"-p {port}",
            "-k ''",  # no Unix socket: paths under deep folders are too long for one
            *(f"-c {setting}" for setting in self.settings),
        ]
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            str(START_TIMEOUT_SECONDS),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            " ".join(options),
            timeout=START_TIMEOUT_SECONDS + 10,
        )

    def _choose_port(self) -> int:
        for candidate in (self.remembered_port(), self.preferred_port):
            if candidate and port_free("127.0.0.1", candidate):
                return candidate
        return free_port()

    def remembered_port(self) -> int | None:
        """The port the server listened on when it last started (None: never started here)."""
        try:
            return int((self.data_dir / PORT_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _remember_port(self) -> None:
        if self.port != self.remembered_port():
            (self.data_dir / PORT_FILE).write_text(f"{self.port}\n")

    def _port_from_pidfile(self) -> int | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            return int(lines[3])
        except (OSError, IndexError, ValueError):
            return None

    def stop(self, mode: str = "fast") -> None:
        if self.initialised and self.running():
            self._run("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data_dir))

    def kill(self) -> None:
        """Stop the server the way a crash would (immediate mode: no checkpoint)."""
        self.stop(mode="immediate")

    def dsn(self, database: str = "postgres") -> str:
        if self.port is None:
            raise RuntimeError("the embedded server has not been started")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run(
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self.dsn(database),
            "-c",
            sql,
            timeout=60,
        )

    def ensure_database(self, name: str) -> None:
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if not exists:
            self.psql(f'CREATE DATABASE "{name}"')
