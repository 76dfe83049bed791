"""A throw-away PostgreSQL server for tests: initdb + pg_ctl on a free port of 127.0.0.1.

Usage::

    with postgres_server() as url:      # postgresql+psycopg://postgres@127.0.0.1:PORT/apdb
        ...

or the session fixture made by :func:`make_postgres_fixture`. The server
listens on 127.0.0.1 only (its unix socket lives in the data directory), trusts
local connections, and is stopped and deleted at the end. When run as root
(``initdb`` refuses root) the data directory is given to the ``postgres`` user
and the binaries run through ``runuser -u postgres --``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

__all__ = ["create_database", "find_pg_bin", "make_postgres_fixture", "postgres_server", "skip_reason"]


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (PATH first, then /usr/lib/postgresql/*/bin)."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    if find_pg_bin() is None:
        return "no PostgreSQL binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg (3) is not installed: pip install 'psycopg[binary]'"
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _user_exists("postgres")):
        return "running as root without a 'postgres' user and runuser to start PostgreSQL as"
    return None


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], as_postgres: bool) -> subprocess.CompletedProcess:
    if as_postgres:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)


@contextmanager
def postgres_server(dbname: str = "apdb") -> Iterator[str]:
    """Start a private PostgreSQL server; yield a SQLAlchemy URL of an empty database on it.

    Parameters
    ----------
    dbname : str
        Name of the database created on the server.

    Yields
    ------
    str
        ``postgresql+psycopg://postgres@127.0.0.1:PORT/<dbname>``.
    """
    import psycopg

    bin_dir = find_pg_bin()
    if bin_dir is None:
        msg = "no PostgreSQL binaries found"
        raise RuntimeError(msg)
    as_postgres = os.geteuid() == 0
    root = Path(tempfile.mkdtemp(prefix="apfast_pg_"))
    data = root / "data"
    data.mkdir()
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(data, "postgres")
    r = _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
              "--no-sync"], as_postgres)  # fmt: skip
    if r.returncode:
        shutil.rmtree(root, ignore_errors=True)
        msg = f"initdb failed ({r.returncode}): {r.stderr.strip()}"
        raise RuntimeError(msg)
    port = _free_port()
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {data} -c fsync=off -c full_page_writes=off"
    log = root / "server.log"
    if as_postgres:
        shutil.chown(root, "postgres")
    r = _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start"],
             as_postgres)  # fmt: skip
    if r.returncode:
        text = log.read_text() if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        msg = f"pg_ctl start failed ({r.returncode}): {r.stderr.strip()} {text[-2000:]}"
        raise RuntimeError(msg)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                                     autocommit=True, connect_timeout=5) as c:  # fmt: skip
                    c.execute(f'CREATE DATABASE "{dbname}"')
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/{dbname}"
    finally:
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"], as_postgres)
        shutil.rmtree(root, ignore_errors=True)


def make_postgres_fixture(name: str = "postgres_url"):
    """Make a session-scoped pytest fixture yielding a server URL (skips when PostgreSQL is missing).

    Use in a test module as ``postgres_url = make_postgres_fixture()``.
    """

    @pytest.fixture(scope="session", name=name)
    def _fixture() -> Iterator[str]:
        reason = skip_reason()
        if reason is not None:
            pytest.skip(reason)
        with postgres_server() as url:
            yield url

    return _fixture


_db_counter = iter(range(10**6))


def create_database(server_url: str, prefix: str = "t") -> str:
    """Create a new empty database on the test server and return its SQLAlchemy URL."""
    import psycopg
    import sqlalchemy as sa

    u = sa.make_url(server_url)
    name = f"{prefix}{next(_db_counter)}_{os.getpid()}"
    with psycopg.connect(f"host={u.host} port={u.port} user={u.username} dbname=postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name).render_as_string(hide_password=False)
