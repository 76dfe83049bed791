"""The Alert Production Database: create it, open it, store and undo one CCD-visit atomically.

The schema is Rubin's APDB 10.0.0 (:mod:`apfast.dia.apdb_schema`), so Rubin's own
client (``lsst-dax-apdb``) reads what apfast writes. All writes of one
CCD-visit happen in one database transaction (:meth:`Apdb.ccd_visit`), which
ends by inserting the CCD-visit's ``apfast_ccd_visit`` row: a process killed
half-way leaves nothing of that CCD-visit behind, and the row's presence means
"completely stored".

DiaObject versions follow Rubin's "baseline" index: storing an object at time
``t`` closes its open version (``validityEndMjdTai = t``) and inserts a new one
valid from ``t``; :meth:`ApdbCcdVisit.undo` reverses exactly that.

SQLite specifics (a deliberate choice, see :func:`_sqlite_on_connect`):

- the file is put in WAL journal mode at creation, so readers (alerts, other
  processes' region loads, Rubin's reader) never block the writer and the
  writer never blocks them; one writer at a time holds the lock;
- a write transaction starts with ``BEGIN IMMEDIATE``, which takes the write
  lock up front; "database is locked" is retried with exponential back-off for
  up to ``connection_timeout`` seconds, then :class:`ApdbError` says which
  setting to raise;
- ``READ_UNCOMMITTED`` maps to ``PRAGMA read_uncommitted = 1`` (what Rubin
  sets; it matters only with a shared cache), every other level to SQLite's
  only real one, SERIALIZABLE.

Column sets are ``dict[str, numpy.ndarray]`` named exactly as the APDB columns.
On input, NULL is NaN (floats) or ``None`` in an object array; on output,
float columns are float64 with NaN for NULL, integer and boolean columns are
int64 / bool arrays when the result holds no NULL and object arrays holding
``None`` otherwise, and text columns are object arrays of ``str`` / ``None``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import numpy as np
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from apfast import __version__
from apfast._configbase import ConfigSection, opt
from apfast.dia.apdb_schema import (
    COLUMN_KINDS,
    NOT_NULL_ZERO,
    SCHEMA_VERSION,
    ApdbError,
    ApdbMissingError,
    ApdbUrlError,
    column_length,
    concat_column_sets,
    make_metadata,
    metadata_rows,
    to_column_set,
    to_python,
)
from apfast.dia.htm import htm_index, htm_ranges, polygon_contains

__all__ = ["Apdb", "ApdbCcdVisit", "ApdbConfig", "ApdbError", "ApdbMissingError", "ApdbUrlError", "make_apdb"]

log = logging.getLogger(__name__)


_DB_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.+-]*://")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApdbConfig(ConfigSection):
    """The Alert Production Database (DIA objects, sources and forced sources)."""

    _key_prefix: ClassVar[str] = "apdb."

    db_url: str = opt(
        "sqlite:///apdb/association.db",
        "SQLAlchemy URL of the APDB, e.g. sqlite:///apdb/association.db or postgresql://host/db.",
    )
    isolation_level: Literal["READ_COMMITTED", "READ_UNCOMMITTED", "REPEATABLE_READ", "SERIALIZABLE"] = opt(
        "READ_COMMITTED",
        "Transaction isolation level of APDB connections.",
        choices={
            "READ_COMMITTED": "see only committed rows (the usual choice)",
            "READ_UNCOMMITTED": "also see uncommitted rows (what Rubin uses with SQLite)",
            "REPEATABLE_READ": "rows read stay unchanged for the transaction",
            "SERIALIZABLE": "full isolation; slowest with concurrent writers",
        },
    )
    connection_timeout: float = opt(60.0, "Seconds to wait for a connection or a database lock (> 0).")
    connection_pool: bool = opt(True, "Keep a pool of open connections; false opens one per transaction.")

    def _validate(self) -> None:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in self.db_url):
            self._fail("db_url", self.db_url.encode("unicode_escape").decode("ascii"),
                       "remove the control characters (newline, NUL, ...) from the URL")
        if not _DB_URL_RE.match(self.db_url):
            self._fail(
                "db_url", self.db_url, "give an SQLAlchemy URL such as 'sqlite:///apdb/association.db'"
            )
        t = self.connection_timeout
        if not (math.isfinite(t) and t > 0):
            self._fail("connection_timeout", t, "use a finite number of seconds > 0, e.g. 60")

# key of the PostgreSQL advisory lock that serialises CCD-visit transactions (any constant)
PG_ASSOCIATION_LOCK = 0x61706661

#: Rows per ``IN (...)`` list.
IN_CHUNK = 1000
#: Test hook: called with the table name after each table's insert inside ``store`` (None in production).
_AFTER_INSERT_HOOK: Callable[[str], None] | None = None

_MJD_UNIX_EPOCH = 40587.0
_TAI_MINUS_UTC_S = 37.0  # since 2017-01-01; "now" is only a processing time stamp


def _now_mjd_tai() -> float:
    return _MJD_UNIX_EPOCH + (time.time() + _TAI_MINUS_UTC_S) / 86400.0


def _safe_url(url: sa.URL | str) -> str:
    u = sa.make_url(url) if isinstance(url, str) else url
    return u.render_as_string(hide_password=True)


def _is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_path(url: sa.URL) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


#: The URL forms apfast supports, for messages.
_URL_FORMS = (
    "sqlite:///apdb/association.db (a path relative to the current folder), "
    "sqlite:////abs/path/association.db (absolute) or postgresql://USER@HOST/DBNAME"
)


def _checked_url(db_url: str, *, create: bool) -> sa.URL:
    """Parse and check ``apdb.db_url`` before any connection; for ``create``, make the SQLite file's folder.

    Raises
    ------
    ApdbUrlError
        Unparsable URL, a database other than SQLite or PostgreSQL, an SQLite URL with
        a host part (``sqlite://apdb.db``: two slashes instead of three) or no file
        (in-memory), or an SQLite folder that cannot be created or written.
    """
    try:
        url = sa.make_url(db_url)
    except sa.exc.ArgumentError:
        msg = f"apdb.db_url={db_url!r} is not a database URL; give one such as {_URL_FORMS}"
        raise ApdbUrlError(msg) from None
    shown = _safe_url(url)
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        msg = f"apdb.db_url={shown}: database {backend!r} is not supported; use {_URL_FORMS}"
        raise ApdbUrlError(msg)
    if backend != "sqlite":
        return url
    if url.host:
        rest = f"{url.host}/{url.database}" if url.database else url.host
        msg = (
            f"apdb.db_url={shown} puts {url.host!r} where a server name goes, but SQLite has no server: "
            f"a file path needs three slashes, sqlite:///{rest} (relative) or four, sqlite:////abs/{rest}"
        )
        raise ApdbUrlError(msg)
    if not url.database or url.database == ":memory:":
        msg = (
            f"apdb.db_url={shown} is an in-memory SQLite database, which is gone when the command ends; "
            f"give a file, e.g. sqlite:///apdb/association.db"
        )
        raise ApdbUrlError(msg)
    path = _sqlite_path(url)
    if create and path is not None:
        folder = path.absolute().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = (
                f"apdb.db_url={shown}: cannot create the folder {folder} for the APDB file "
                f"({exc.strerror or exc}); choose a path in a writable folder"
            )
            raise ApdbUrlError(msg) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            msg = f"apdb.db_url={shown}: folder {folder} is not writable; choose a path in a writable folder"
            raise ApdbUrlError(msg)
    return url


def _engine_or_error(config: ApdbConfig, url: sa.URL) -> Engine:
    """:func:`_make_engine`, turning a missing database driver into one line saying what to install."""
    try:
        return _make_engine(config)
    except ImportError as exc:
        extra = " (pip install 'apfast[postgres]')" if url.get_backend_name() == "postgresql" else ""
        msg = (
            f"apdb.db_url={_safe_url(url)}: the database driver {url.drivername!r} is not installed "
            f"(no module {exc.name!r}); install it{extra} or use an SQLite URL such as "
            f"sqlite:///apdb/association.db"
        )
        raise ApdbUrlError(msg) from None


def _sqlite_on_connect(read_uncommitted: bool) -> Callable[[Any, Any], None]:
    """Connection setup for SQLite: driver autocommit (we issue BEGIN ourselves), WAL-friendly pragmas.

    Python's sqlite3 would otherwise open transactions implicitly and defer the
    write lock to the first INSERT, where a conflict can no longer be retried
    cleanly; with ``isolation_level = None`` the ``BEGIN IMMEDIATE`` of
    :meth:`Apdb.ccd_visit` is the only transaction start.
    ``synchronous = NORMAL`` in WAL mode loses nothing when a process is
    killed (only on power loss may the last commits roll back).
    """

    def on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA cache_size = -65536")  # 64 MiB: bulk inserts keep index pages cached
        # one CCD-visit dirties ~1000 pages of a large APDB: with the default checkpoint every 1000 WAL
        # pages nearly every commit would checkpoint (and fsync); this does it every ~20 CCD-visits
        cur.execute("PRAGMA wal_autocheckpoint = 20000")
        cur.execute(f"PRAGMA read_uncommitted = {1 if read_uncommitted else 0}")
        cur.close()

    return on_connect


def _make_engine(config: ApdbConfig) -> Engine:
    url = sa.make_url(config.db_url)
    kw: dict[str, Any] = {}
    if not config.connection_pool:
        kw["poolclass"] = NullPool
    if url.get_backend_name() == "sqlite":
        kw["connect_args"] = {"timeout": float(config.connection_timeout)}
        engine = sa.create_engine(url, **kw)
        event.listen(engine, "connect", _sqlite_on_connect(config.isolation_level == "READ_UNCOMMITTED"))
        return engine
    if url.get_backend_name() == "postgresql":
        kw["connect_args"] = {"connect_timeout": max(1, round(config.connection_timeout))}
    kw["isolation_level"] = config.isolation_level.replace("_", " ")
    return sa.create_engine(url, **kw)


def make_apdb(config: ApdbConfig, *, drop: bool = False) -> str:
    """Create an empty APDB (Rubin schema 10.0.0) at ``config.db_url``.

    Parameters
    ----------
    config : ApdbConfig
        ``db_url`` says where; for SQLite the parent folder of the file is created.
    drop : bool, optional
        Drop an existing APDB at that URL first (all its rows are lost).

    Returns
    -------
    str
        The URL, password hidden.

    Raises
    ------
    ApdbError
        If the URL already holds APDB tables and ``drop`` is false, or the
        database cannot be reached.
    ApdbUrlError
        (exit status 2) If the URL cannot work: bad syntax, a database other than
        SQLite/PostgreSQL, ``sqlite://NAME`` (two slashes), an in-memory SQLite
        database, or a folder that cannot be created or written.

    Examples
    --------
    >>> import tempfile
    >>> from apfast.dia.apdb import ApdbConfig
    >>> d = tempfile.mkdtemp()
    >>> make_apdb(ApdbConfig(db_url=f"sqlite:///{d}/apdb/a.db")).endswith("a.db")
    True
    """
    url = _checked_url(config.db_url, create=True)
    shown = _safe_url(url)
    engine = _engine_or_error(config, url)
    md = make_metadata()
    try:
        with engine.connect() as conn:
            present = set(sa.inspect(conn).get_table_names()) & set(md.tables)
            if present and not drop:
                version = _read_version(conn)
                what = f"an APDB (schema {version})" if version else f"APDB tables {sorted(present)}"
                msg = f"{shown} already holds {what}; use another db_url or --drop to replace it"
                raise ApdbError(msg)
            if _is_sqlite(engine):
                conn.exec_driver_sql("PRAGMA journal_mode = WAL")
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            if present:
                md.drop_all(conn)
            md.create_all(conn)
            conn.execute(
                md.tables["metadata"].insert(),
                [{"name": k, "value": v} for k, v in metadata_rows(__version__).items()],
            )
            conn.commit()
    except sa.exc.OperationalError as exc:
        if _is_sqlite(engine):
            path = _sqlite_path(url)
            where = f"file {path.absolute()}" if path is not None else shown
            msg = f"cannot create the SQLite APDB {where} ({exc.orig}); check that its folder is writable"
            raise ApdbUrlError(msg) from None
        msg = f"cannot create the APDB at {shown}: {exc.orig}; check db_url and that the server is running"
        raise ApdbError(msg) from exc
    finally:
        engine.dispose()
    log.info("created APDB schema %s at %s", SCHEMA_VERSION, shown)
    return shown


def _read_version(conn: Connection) -> str | None:
    try:
        row = conn.exec_driver_sql("SELECT value FROM metadata WHERE name = 'version:schema'").first()
    except sa.exc.DBAPIError:
        conn.rollback()
        return None
    return None if row is None else str(row[0])


class Apdb:
    """An open APDB: read helpers and the per-CCD-visit write transaction.

    Parameters
    ----------
    config : ApdbConfig
        URL, isolation level, connection/lock timeout (seconds) and pooling.

    Raises
    ------
    ApdbError
        If there is no APDB at the URL (no file, no tables or no metadata) or
        it has another schema version; the message says to run
        ``apfast make-apdb`` first.

    Examples
    --------
    >>> import tempfile
    >>> from apfast.dia.apdb import ApdbConfig
    >>> cfg = ApdbConfig(db_url=f"sqlite:///{tempfile.mkdtemp()}/a.db")
    >>> _ = make_apdb(cfg)
    >>> Apdb(cfg).count("DiaObject")
    0
    """

    def __init__(self, config: ApdbConfig) -> None:
        self.config = config
        self.url = _safe_url(config.db_url)
        fix = f"run `apfast make-apdb -c apdb.db_url={self.url}` first"
        url = _checked_url(config.db_url, create=False)
        if url.get_backend_name() == "sqlite":
            path = _sqlite_path(url)
            if path is not None and not path.exists():
                msg = f"there is no APDB at {self.url} (no file {path.absolute()}); {fix}"
                raise ApdbMissingError(msg)
        self.engine = _engine_or_error(config, url)
        self.metadata = make_metadata()
        self.tables = self.metadata.tables
        try:
            with self.engine.connect() as conn:
                version = _read_version(conn)
        except sa.exc.OperationalError as exc:
            self.engine.dispose()
            if _is_sqlite(self.engine):
                msg = (f"cannot open the SQLite APDB at {self.url} ({exc.orig}); "
                       "check the file and its permissions")
                raise ApdbUrlError(msg) from None
            msg = (f"cannot connect to the APDB at {self.url}: {exc.orig}; "
                   "check db_url and that the server is running")
            raise ApdbError(msg) from exc
        if version is None or version != SCHEMA_VERSION:
            self.engine.dispose()
        if version is None:
            msg = f"there is no APDB at {self.url} (no metadata table or version row); {fix}"
            raise ApdbMissingError(msg)
        if version != SCHEMA_VERSION:
            msg = (
                f"the APDB at {self.url} has schema version {version} but apfast writes {SCHEMA_VERSION}; "
                f"use a new db_url and {fix}"
            )
            raise ApdbMissingError(msg)
        self.is_sqlite = _is_sqlite(self.engine)
        q = self.engine.dialect.identifier_preparer.quote
        self._q = q
        self._ph = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"

    def close(self) -> None:
        """Close pooled connections (the object stays usable; new connections open on demand).

        ``with Apdb(cfg) as apdb:`` closes them at the end of the block.
        """
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Apdb({self.url!r})"

    # ------------------------------------------------------------------ transactions
    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        """A connection inside a write transaction; commit on success, roll back on error."""
        conn = self.engine.connect()
        try:
            if self.is_sqlite:
                self._begin_immediate(conn)
                conn.begin()  # SQLAlchemy-level only (driver autocommit): makes commit() reach sqlite3
            else:
                conn.begin()
                ms = int(self.config.connection_timeout * 1000)
                conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
                # Association reads the region and writes it back in this transaction: concurrent
                # writers (workers on neighbouring CCDs, or two visits of one field) take turns, so a
                # transient can never be given two DiaObjects. SQLite gets this from BEGIN IMMEDIATE.
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_ASSOCIATION_LOCK})")
            try:
                yield conn
            except BaseException as exc:
                try:
                    conn.rollback()
                except sa.exc.DBAPIError as rb:
                    if not rb.connection_invalidated:
                        raise
                    raise self._lost(rb) from exc
                if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
                    raise self._lost(exc) from exc
                raise
            conn.commit()
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise self._lost(exc) from exc
            if not isinstance(exc, sa.exc.OperationalError):
                raise
            if "lock" in str(exc.orig).lower():
                msg = (
                    f"the APDB at {self.url} stayed locked by another writer for more than "
                    f"{self.config.connection_timeout:g} s; raise apdb.connection_timeout "
                    f"(e.g. -c apdb.connection_timeout=300) or run fewer writers at once"
                )
                raise ApdbError(msg) from exc
            raise
        finally:
            conn.close()

    def _lost(self, exc: sa.exc.DBAPIError) -> ApdbError:
        """The error for a connection the server dropped in the middle of a transaction."""
        first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
        msg = (
            f"lost the connection to the APDB at {self.url} in the middle of a CCD-visit transaction ({first}); "
            "the server rolls that transaction back, so nothing of the CCD-visit is stored: check the database "
            "server and re-run the same command"
        )
        return ApdbError(msg)

    def _begin_immediate(self, conn: Connection) -> None:
        """``BEGIN IMMEDIATE`` with exponential back-off while another process holds the write lock."""
        timeout = float(self.config.connection_timeout)
        deadline = time.monotonic() + timeout
        delay = 0.005
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None  # an open connection
        # short busy wait per attempt; our loop does the (visible, logged) back-off
        dbapi.execute("PRAGMA busy_timeout = 20")
        try:
            while True:
                try:
                    dbapi.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise
                    left = deadline - time.monotonic()
                    if left <= 0:
                        msg = (
                            f"the SQLite APDB {self.url} stayed locked by another writer for {timeout:g} s; "
                            f"raise apdb.connection_timeout (e.g. -c apdb.connection_timeout=300) "
                            f"or run fewer writers at once"
                        )
                        raise ApdbError(msg) from exc
                    log.debug("APDB locked; retrying BEGIN IMMEDIATE in %.3f s", delay)
                    time.sleep(min(delay, left))
                    delay = min(delay * 2.0, 1.0)
        finally:
            dbapi.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")

    @contextmanager
    def ccd_visit(self, visit: int, detector: int, midpoint_mjd_tai: float) -> Iterator[ApdbCcdVisit]:
        """One database transaction for everything one CCD-visit reads and writes.

        Parameters
        ----------
        visit, detector : int
            The CCD-visit (detector = DECam ccdnum).
        midpoint_mjd_tai : float
            Exposure midpoint, MJD TAI: the validity start of the DiaObject
            versions stored here.

        Yields
        ------
        ApdbCcdVisit
            Use ``exists``, ``undo``, ``load_*`` and ``store`` on it. Leaving the
            ``with`` block commits; an exception rolls everything back.

        Raises
        ------
        ApdbError
            If the write lock could not be had within ``connection_timeout``.
        """
        with self._write_connection() as conn:
            yield ApdbCcdVisit(self, conn, int(visit), int(detector), float(midpoint_mjd_tai))

    # ------------------------------------------------------------------ reads
    def _read(self, table: str, where: str = "", params: Sequence[Any] = (), conn: Connection | None = None):
        sql = f"SELECT * FROM {self._q(table)}" + (f" WHERE {where}" if where else "")
        if conn is None:
            with self.engine.connect() as c:
                res = c.exec_driver_sql(sql, tuple(params))
                names, rows = list(res.keys()), res.fetchall()
        else:
            res = conn.exec_driver_sql(sql, tuple(params))
            names, rows = list(res.keys()), res.fetchall()
        return to_column_set(table, names, rows)

    def _read_by_ids(
        self, table: str, column: str, ids: np.ndarray, extra: str = "", conn: Connection | None = None
    ) -> dict[str, np.ndarray]:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        parts = []
        for i in range(0, max(ids.size, 1), IN_CHUNK):
            chunk = ids[i : i + IN_CHUNK].tolist()
            if not chunk:
                break
            where = f"{self._q(column)} IN ({', '.join([self._ph] * len(chunk))})" + extra
            parts.append(self._read(table, where, chunk, conn))
        if not parts:
            return self._read(table, "1 = 0", (), conn)
        return concat_column_sets(parts)

    def count(self, table: str) -> int:
        """Number of rows of an APDB table (e.g. ``"DiaSource"``)."""
        if table not in self.tables:
            msg = f"no APDB table {table!r}; use one of {sorted(self.tables)}"
            raise ApdbError(msg)
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT COUNT(*) FROM {self._q(table)}").scalar_one())

    def ccd_visits(self) -> list[tuple[int, int]]:
        """The (visit, detector) pairs completely stored, sorted."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT visit, detector FROM apfast_ccd_visit ORDER BY visit, detector"
            ).fetchall()
        return [(int(v), int(d)) for v, d in rows]

    def dia_objects(self, *, latest: bool = True) -> dict[str, np.ndarray]:
        """All DiaObject rows; only the open (latest) versions unless ``latest=False``."""
        return self._read("DiaObject", f"{self._q('validityEndMjdTai')} IS NULL" if latest else "")

    def dia_sources(self, visit: int | None = None, detector: int | None = None) -> dict[str, np.ndarray]:
        """DiaSource rows, optionally of one visit and/or detector."""
        conds, params = [], []
        if visit is not None:
            conds.append(f"visit = {self._ph}")
            params.append(int(visit))
        if detector is not None:
            conds.append(f"detector = {self._ph}")
            params.append(int(detector))
        return self._read("DiaSource", " AND ".join(conds), params)

    def dia_sources_for_objects(self, ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """All DiaSource rows of the given diaObjectIds."""
        return self._read_by_ids("DiaSource", "diaObjectId", np.asarray(ids))

    def forced_sources_for_objects(self, ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """All DiaForcedSource rows of the given diaObjectIds."""
        return self._read_by_ids("DiaForcedSource", "diaObjectId", np.asarray(ids))


class ApdbCcdVisit:
    """The open transaction of one CCD-visit (made by :meth:`Apdb.ccd_visit`, not directly)."""

    def __init__(self, apdb: Apdb, conn: Connection, visit: int, detector: int, t: float) -> None:
        self.apdb = apdb
        self.conn = conn
        self.visit = visit
        self.detector = detector
        self.t = t
        self._q = apdb._q
        self._ph = apdb._ph

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.conn.exec_driver_sql(sql, tuple(params))

    def _stored_row(self) -> tuple | None:
        return self._exec(
            f"SELECT {self._q('midpointMjdTai')} FROM apfast_ccd_visit WHERE visit = {self._ph} "
            f"AND detector = {self._ph}",
            (self.visit, self.detector),
        ).first()

    def exists(self) -> bool:
        """True when this CCD-visit is already completely stored."""
        return self._stored_row() is not None

    def undo(self) -> np.ndarray:
        """Remove a previous run of this CCD-visit; return the diaObjectIds whose history changed.

        Deletes its DiaSource and DiaForcedSource rows and the DiaObject
        versions it started (validity start == its midpoint) for objects with
        DiaSources in it, re-links the previous version of those objects
        (its ``validityEndMjdTai`` becomes the start of the next remaining
        version, or NULL), and deletes the ``apfast_ccd_visit`` row. Objects
        left with no version vanish. Does nothing when nothing is stored.

        Returns
        -------
        ndarray of int64
            Sorted affected diaObjectIds (recompute their statistics).

        Undoing a CCD-visit whose DiaObjects later CCD-visits also touched, and
        storing it again, sees the visits out of time order: undo those first,
        latest first (:func:`apfast.run.pipeline.undo_for_redo`, :meth:`later_ccd_visits`).
        """
        row = self._stored_row()
        if row is None:  # every store writes its apfast_ccd_visit row in the same transaction
            return np.zeros(0, np.int64)
        t = float(row[0])
        q, ph = self._q, self._ph
        vd = (self.visit, self.detector)
        ids = self._object_ids()
        self._exec(f"DELETE FROM {q('DiaSource')} WHERE visit = {ph} AND detector = {ph}", vd)
        self._exec(f"DELETE FROM {q('DiaForcedSource')} WHERE visit = {ph} AND detector = {ph}", vd)
        obj, oid, vs, ve = q("DiaObject"), q("diaObjectId"), q("validityStartMjdTai"), q("validityEndMjdTai")
        for i in range(0, ids.size, IN_CHUNK):
            chunk = ids[i : i + IN_CHUNK].tolist()
            inl = ", ".join([ph] * len(chunk))
            self._exec(f"DELETE FROM {obj} WHERE {oid} IN ({inl}) AND {vs} = {ph}", [*chunk, t])
            self._exec(
                f"UPDATE {obj} SET {ve} = (SELECT MIN(d2.{vs}) FROM {obj} d2 WHERE d2.{oid} = {obj}.{oid} "
                f"AND d2.{vs} > {obj}.{vs}) WHERE {oid} IN ({inl}) AND {ve} = {ph}",
                [*chunk, t],
            )
        self._exec(f"DELETE FROM apfast_ccd_visit WHERE visit = {ph} AND detector = {ph}", vd)
        log.debug("undid CCD-visit %d/%d: %d objects affected", self.visit, self.detector, ids.size)
        return ids

    def _object_ids(self) -> np.ndarray:
        """Sorted diaObjectIds of this CCD-visit's stored DiaSources (int64)."""
        q, ph = self._q, self._ph
        rows = self._exec(
            f"SELECT DISTINCT {q('diaObjectId')} FROM {q('DiaSource')} WHERE visit = {ph} AND detector = {ph} "
            f"AND {q('diaObjectId')} IS NOT NULL",
            (self.visit, self.detector),
        ).fetchall()
        return np.sort(np.array([r[0] for r in rows], dtype=np.int64))

    def later_ccd_visits(self) -> list[tuple[int, int]]:
        """Other CCD-visits, later than this stored one, with DiaSources of its DiaObjects (time order).

        Undoing this CCD-visit while they stay stored and associating it again would see
        the visits out of time order (:func:`apfast.run.pipeline.undo_for_redo` refuses that).
        """
        row = self._stored_row()
        if row is None:
            return []
        t = float(row[0])
        q, ph = self._q, self._ph
        ids = self._object_ids()
        found: set[tuple[float, int, int]] = set()
        for i in range(0, ids.size, IN_CHUNK):
            chunk = ids[i : i + IN_CHUNK].tolist()
            rows = self._exec(
                f"SELECT DISTINCT {q('midpointMjdTai')}, visit, detector FROM {q('DiaSource')} "
                f"WHERE {q('diaObjectId')} IN ({', '.join([ph] * len(chunk))}) AND {q('midpointMjdTai')} > {ph} "
                f"AND NOT (visit = {ph} AND detector = {ph})",
                [*chunk, t, self.visit, self.detector],
            ).fetchall()
            found.update((float(r[0]), int(r[1]), int(r[2])) for r in rows)
        return [(v, d) for _t, v, d in sorted(found)]

    def load_dia_objects(self, ra_deg: np.ndarray, dec_deg: np.ndarray) -> dict[str, np.ndarray]:
        """Latest DiaObject versions inside a convex sky polygon (the CCD footprint plus a margin).

        Parameters
        ----------
        ra_deg, dec_deg : array_like of float, shape (m,)
            Polygon corners in degrees, either winding order.

        Returns
        -------
        dict of str to ndarray
            Column set of the open versions (``validityEndMjdTai IS NULL``)
            whose (ra, dec) is inside the polygon.
        """
        ranges = htm_ranges(ra_deg, dec_deg, 20, max_ranges=64)
        if ranges.shape[0] == 0:
            return self.apdb._read("DiaObject", "1 = 0", (), self.conn)
        q, ph = self._q, self._ph
        cond = " OR ".join([f"{q('pixelId')} BETWEEN {ph} AND {ph}"] * ranges.shape[0])
        objs = self.apdb._read(
            "DiaObject",
            f"({cond}) AND {q('validityEndMjdTai')} IS NULL",
            ranges.reshape(-1).tolist(),
            self.conn,
        )
        if objs["ra"].size:
            keep = polygon_contains(ra_deg, dec_deg, objs["ra"], objs["dec"])
            # in diaObjectId order whatever order the backend returns them in: forced-source ids
            # (row numbers) are then the same on SQLite and PostgreSQL
            keep = np.flatnonzero(keep)
            keep = keep[np.argsort(np.asarray(objs["diaObjectId"])[keep], kind="stable")]
            objs = {k: v[keep] for k, v in objs.items()}
        return objs

    def load_dia_sources(self, object_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """All DiaSource rows of these diaObjectIds (IN lists of 1000)."""
        return self.apdb._read_by_ids("DiaSource", "diaObjectId", np.asarray(object_ids), conn=self.conn)

    def load_dia_forced_sources(self, object_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """All DiaForcedSource rows of these diaObjectIds (IN lists of 1000)."""
        return self.apdb._read_by_ids(
            "DiaForcedSource", "diaObjectId", np.asarray(object_ids), conn=self.conn
        )

    def store(
        self,
        *,
        objects: dict[str, np.ndarray] | None = None,
        sources: dict[str, np.ndarray] | None = None,
        forced_sources: dict[str, np.ndarray] | None = None,
        n_new_objects: int = 0,
    ) -> None:
        """Write this CCD-visit: new DiaObject versions, DiaSources, DiaForcedSources, then its marker row.

        Parameters
        ----------
        objects : column set, optional
            DiaObject rows (the new versions of every object touched by this
            CCD-visit); ``diaObjectId``, ``ra``, ``dec`` required. Validity,
            ``pixelId`` and missing count columns are filled here.
        sources : column set, optional
            DiaSource rows; ``diaSourceId``, ``ra``, ``dec``, ``x``, ``y``
            required; ``visit``/``detector``/``midpointMjdTai`` default to this
            CCD-visit's, ``pixelId`` and ``timeProcessedMjdTai`` are filled.
        forced_sources : column set, optional
            DiaForcedSource rows; ``diaForcedSourceId``, ``diaObjectId``,
            ``ra``, ``dec`` required.
        n_new_objects : int, optional
            Recorded in ``apfast_ccd_visit``.

        Raises
        ------
        ApdbError
            Unknown or missing required columns, unequal column lengths,
            visit/detector not this CCD-visit's, or the CCD-visit is already
            stored (call :meth:`undo` first).
        """
        if self.exists():
            msg = (
                f"CCD-visit visit={self.visit} detector={self.detector} is already stored in "
                f"{self.apdb.url}; call undo() in the same transaction before storing it again"
            )
            raise ApdbError(msg)
        now = _now_mjd_tai()
        t = self.t
        n_obj = n_src = n_frc = 0
        if objects is not None:
            n_obj = self._store_objects(objects, t, now)
        if sources is not None:
            n_src = self._insert(
                "DiaSource", sources, now, required=("diaSourceId", "ra", "dec", "x", "y"), pixel=True
            )
        if forced_sources is not None:
            n_frc = self._insert(
                "DiaForcedSource",
                forced_sources,
                now,
                required=("diaForcedSourceId", "diaObjectId", "ra", "dec"),
            )
        row = {
            "visit": self.visit, "detector": self.detector, "midpointMjdTai": t, "nDiaSources": n_src,
            "nNewDiaObjects": int(n_new_objects), "nDiaForcedSources": n_frc, "timeProcessedMjdTai": now,
        }  # fmt: skip
        self.conn.execute(self.apdb.tables["apfast_ccd_visit"].insert(), [row])
        log.debug(
            "stored CCD-visit %d/%d: %d objects, %d sources, %d forced",
            self.visit,
            self.detector,
            n_obj,
            n_src,
            n_frc,
        )

    def _store_objects(self, objects: dict[str, np.ndarray], t: float, now: float) -> int:
        q, ph = self._q, self._ph
        ids = np.asarray(objects.get("diaObjectId", np.zeros(0, np.int64)))
        if ids.size:
            ids = np.unique(ids.astype(np.int64)).tolist()
            obj, oid, vs, ve = (
                q("DiaObject"),
                q("diaObjectId"),
                q("validityStartMjdTai"),
                q("validityEndMjdTai"),
            )
            later: dict[int, float] = {}
            for i in range(0, len(ids), IN_CHUNK):
                chunk = ids[i : i + IN_CHUNK]
                inl = ", ".join([ph] * len(chunk))
                # processed out of time order (a re-run of an older visit): the object's open version
                # already starts after t. The new row holds the statistics of the full history, so it
                # replaces that open version (keeping its start) instead of opening a second one.
                for oid_, start in self._exec(
                    f"SELECT {oid}, {vs} FROM {obj} WHERE {oid} IN ({inl}) AND {ve} IS NULL AND {vs} > {ph}",
                    [*chunk, t],
                ).fetchall():
                    later[int(oid_)] = float(start)
                    self._exec(f"DELETE FROM {obj} WHERE {oid} = {ph} AND {vs} = {ph}", [int(oid_), float(start)])
                # another CCD of the same visit may have stored a version at t already: replace it
                same = [c for c in chunk if c not in later]
                if same:
                    self._exec(f"DELETE FROM {obj} WHERE {oid} IN ({', '.join([ph] * len(same))}) AND {vs} = {ph}",
                               [*same, t])
                self._exec(
                    f"UPDATE {obj} SET {ve} = {ph} WHERE {oid} IN ({inl}) AND {ve} IS NULL AND {vs} < {ph}",
                    [t, *chunk, t],
                )
        else:
            later = {}
        cols = dict(objects)
        n = column_length("DiaObject", cols)
        cols["validityStartMjdTai"] = np.full(n, t)
        if later:
            oids = np.asarray(objects["diaObjectId"]).astype(np.int64)
            cols["validityStartMjdTai"] = np.array([later.get(int(o), t) for o in oids], dtype=float)
        cols["validityEndMjdTai"] = np.full(n, np.nan)
        return self._insert("DiaObject", cols, now, required=("diaObjectId", "ra", "dec"), pixel=True)

    def _insert(
        self,
        table: str,
        cols: dict[str, np.ndarray],
        now: float,
        *,
        required: tuple[str, ...],
        pixel: bool = False,
    ) -> int:
        kinds = COLUMN_KINDS[table]
        unknown = sorted(set(cols) - set(kinds))
        if unknown:
            msg = f"unknown {table} column(s) {unknown}; use the APDB column names (e.g. {list(kinds)[:6]})"
            raise ApdbError(msg)
        n = column_length(table, cols)
        if n == 0:
            return 0
        missing = [c for c in required if c not in cols]
        if missing:
            msg = f"{table} rows lack required column(s) {missing}; add them to the column set"
            raise ApdbError(msg)
        cols = dict(cols)
        for c in NOT_NULL_ZERO.get(table, ()):
            cols.setdefault(c, np.zeros(n, dtype=np.int64))
        if "visit" in kinds:
            for key, val in (("visit", self.visit), ("detector", self.detector)):
                if key in cols:
                    if np.any(np.asarray(cols[key]) != val):
                        msg = f"{table} rows have {key} values other than this CCD-visit's {key}={val}"
                        raise ApdbError(msg)
                else:
                    cols[key] = np.full(n, val, dtype=np.int64)
            cols.setdefault("midpointMjdTai", np.full(n, self.t))
        if "timeProcessedMjdTai" in kinds:
            cols.setdefault("timeProcessedMjdTai", np.full(n, now))
        names = [c for c in cols if c != "pixelId"]
        values = [to_python(table, c, cols[c], kinds[c]) for c in names]  # checks NOT NULL ra/dec too
        if pixel:
            names.append("pixelId")
            values.append(htm_index(cols["ra"], cols["dec"], 20).tolist())
        q = self._q
        sql = (
            f"INSERT INTO {q(table)} ({', '.join(q(c) for c in names)}) "
            f"VALUES ({', '.join([self._ph] * len(names))})"
        )
        t0 = time.perf_counter()
        dbapi_conn = self.conn.connection.dbapi_connection
        assert dbapi_conn is not None  # an open connection
        dbapi_cursor = dbapi_conn.cursor()
        try:
            dbapi_cursor.executemany(sql, list(zip(*values, strict=True)))
        except Exception as exc:
            raise _wrap_db_error(exc, table, self.apdb.url) from exc
        finally:
            dbapi_cursor.close()
        log.debug("inserted %d %s rows in %.3f s", n, table, time.perf_counter() - t0)
        if _AFTER_INSERT_HOOK is not None:
            _AFTER_INSERT_HOOK(table)
        return n


def _wrap_db_error(exc: Exception, table: str, url: str) -> Exception:
    text = str(exc)
    if re.search(r"unique|duplicate|primary key", text, re.IGNORECASE):
        msg = f"duplicate key inserting {table} rows into {url}: {text}; ids must be unique (re-run with undo())"
        return ApdbError(msg)
    if re.search(r"not null|null value", text, re.IGNORECASE):
        msg = f"NULL in a NOT NULL {table} column in {url}: {text}; fill that column"
        return ApdbError(msg)
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return exc  # the transaction's handler reports the lost connection
    msg = f"inserting {table} rows into {url} failed: {text}; the CCD-visit's transaction is rolled back"
    return ApdbError(msg)
