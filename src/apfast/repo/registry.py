"""The raw registry: ``REPO/registry.sqlite3``, one row per (visit, ccdnum).

Gen 2's registry, with the columns Rubin's ingest kept (visit, filter, date,
taiObs, expTime, ccdnum, ccd, hdu, proposal, object) plus what a fast
pipeline needs without opening files: the HDU index, the file, the pointing and
the CCD's sky footprint from the header WCS. Every query uses bound parameters.

Examples
--------
>>> reg = Registry("repo")                                   # doctest: +SKIP
>>> reg.find({"visit": 289401, "ccdnum": 35})[0]["filter"]   # doctest: +SKIP
'g'
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from apfast.camera import Camera, load_camera
from apfast.errors import DataIdError, InputError
from apfast.repo.dataid import INT64_MAX, INT64_MIN, to_sql_where

__all__ = ["RAW_COLUMNS", "Registry", "REGISTRY_NAME", "CAMERA_NAME"]

REGISTRY_NAME = "registry.sqlite3"
CAMERA_NAME = "camera.toml"

#: (column, SQL type) of the ``raw`` table, in order.
RAW_COLUMNS: tuple[tuple[str, str], ...] = (
    ("visit", "INTEGER NOT NULL"),
    ("ccdnum", "INTEGER NOT NULL"),
    ("ccd", "INTEGER NOT NULL"),
    ("detector", "TEXT NOT NULL"),
    ("filter", "TEXT NOT NULL"),
    ("date", "TEXT NOT NULL"),
    ("taiObs", "TEXT NOT NULL"),
    ("mjd", "REAL NOT NULL"),
    ("expTime", "REAL NOT NULL"),
    ("object", "TEXT"),
    ("obstype", "TEXT"),
    ("proposal", "TEXT"),
    ("airmass", "REAL"),
    ("ra", "REAL"),
    ("dec", "REAL"),
    ("file", "TEXT NOT NULL"),
    ("hdu", "INTEGER NOT NULL"),
    ("ra_center", "REAL"),
    ("dec_center", "REAL"),
    ("corner_ra_0", "REAL"),
    ("corner_dec_0", "REAL"),
    ("corner_ra_1", "REAL"),
    ("corner_dec_1", "REAL"),
    ("corner_ra_2", "REAL"),
    ("corner_dec_2", "REAL"),
    ("corner_ra_3", "REAL"),
    ("corner_dec_3", "REAL"),
)
_COLUMN_NAMES = tuple(c for c, _ in RAW_COLUMNS)
#: dataId keys a user may select on (``--id``), all of them registry columns.
SELECTABLE_KEYS = ("visit", "ccdnum", "ccd", "detector", "filter", "date", "object", "obstype", "expTime")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS raw ("
    + ", ".join(f'"{c}" {t}' for c, t in RAW_COLUMNS)
    + ", PRIMARY KEY (visit, ccdnum))",
    "CREATE TABLE IF NOT EXISTS raw_file ("
    "file TEXT PRIMARY KEY, source TEXT NOT NULL, fingerprint TEXT NOT NULL, size INTEGER NOT NULL, "
    "ingested TEXT NOT NULL, mode TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS raw_filter_date ON raw (filter, date)",
    "CREATE INDEX IF NOT EXISTS raw_file_fp ON raw_file (fingerprint)",
    "CREATE TABLE IF NOT EXISTS registry_info (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # calibrated inputs (ingest --calibrated): the raw row's file/hdu is the image; weight and mask beside it
    "CREATE TABLE IF NOT EXISTS calibrated ("
    "visit INTEGER NOT NULL, ccdnum INTEGER NOT NULL, image TEXT NOT NULL, image_hdu INTEGER NOT NULL, "
    "weight TEXT, weight_hdu INTEGER, mask TEXT, mask_hdu INTEGER, dataid TEXT NOT NULL, "
    "PRIMARY KEY (visit, ccdnum))",
)
SCHEMA_VERSION = "1"


class Registry:
    """The raw registry of one repository.

    Parameters
    ----------
    repo : str or Path
        The repository root (the folder holding ``registry.sqlite3``).
    create : bool
        Create the registry if it does not exist (ingest does; readers do not).

    Raises
    ------
    InputError
        If the registry does not exist and ``create`` is false: the message says
        to run ``apfast ingest`` first.
    """

    def __init__(self, repo: str | Path, *, create: bool = False) -> None:
        self.root = Path(repo)
        self.path = self.root / REGISTRY_NAME
        if not self.path.exists() and not create:
            msg = (
                f"{self.root} is not an apfast repository: {self.path} does not exist; "
                f"create it with `apfast ingest {self.root} RAW_FILES...`"
            )
            raise InputError(msg)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=60.0)
        self.conn.row_factory = sqlite3.Row
        if create:
            with self.conn:
                for stmt in _SCHEMA:
                    self.conn.execute(stmt)
                self.conn.execute(
                    "INSERT OR IGNORE INTO registry_info (name, value) VALUES (?, ?)",
                    ("schema_version", SCHEMA_VERSION),
                )

    # -- camera -----------------------------------------------------------------------------------
    @property
    def camera(self) -> Camera:
        """The repository's camera, from ``REPO/camera.toml`` (written by the first ingest)."""
        path = self.root / CAMERA_NAME
        if not path.exists():
            msg = f"{self.root} has no {CAMERA_NAME}; ingest raw files first (`apfast ingest {self.root} FILES`)"
            raise InputError(msg)
        return load_camera(path)

    # -- queries ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the database connection."""
        self.conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self) -> int:
        """Number of raw rows."""
        return int(self.conn.execute("SELECT COUNT(*) FROM raw").fetchone()[0])

    def _where(self, data_id: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """A WHERE fragment with bound parameters only (long integer lists become BETWEEN runs)."""
        expr: dict[str, list[Any]] = {}
        for key, value in data_id.items():
            if key not in _COLUMN_NAMES:
                msg = f"dataId key {key!r} is not a registry column; known keys: {', '.join(SELECTABLE_KEYS)}"
                raise DataIdError(msg)
            values = list(value) if isinstance(value, list | tuple | set | frozenset | range) else [value]
            if not values:
                return "0", []
            values = [_py(v) for v in values]
            for v in values:
                if isinstance(v, int) and not isinstance(v, bool) and not INT64_MIN <= v <= INT64_MAX:
                    msg = (
                        f"dataId {key}={v} is outside the 64-bit integer range of the registry; "
                        f"give a value between {INT64_MIN} and {INT64_MAX}"
                    )
                    raise DataIdError(msg)
            expr[key] = values
        if not expr:
            return "1", []
        return to_sql_where(expr, _COLUMN_NAMES)

    def find(self, data_id: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows whose columns equal (or are in, for sequences) every given dataId value.

        Returns
        -------
        list of dict
            Sorted by visit, then ccdnum.
        """
        where, params = self._where(data_id or {})
        cur = self.conn.execute(f"SELECT * FROM raw WHERE {where} ORDER BY visit, ccdnum", params)
        return [dict(r) for r in cur.fetchall()]

    def find_one(self, data_id: Mapping[str, Any]) -> dict[str, Any]:
        """The single row matching ``data_id``.

        Raises
        ------
        DataIdError
            If no row or more than one row matches; the message lists what is there.
        """
        rows = self.find(data_id)
        if len(rows) == 1:
            return rows[0]
        if not rows:
            msg = f"no raw data for dataId {dict(data_id)} in {self.path}; {self.describe_missing(data_id)}"
        else:
            keys = sorted({(r["visit"], r["ccdnum"]) for r in rows})[:10]
            msg = (
                f"dataId {dict(data_id)} matches {len(rows)} raw CCDs (e.g. visit, ccdnum = {keys}); "
                "give visit and ccdnum to pick one"
            )
        raise DataIdError(msg)

    def distinct(self, key: str, data_id: Mapping[str, Any] | None = None) -> list[Any]:
        """Sorted distinct values of column ``key`` among rows matching ``data_id``."""
        if key not in _COLUMN_NAMES:
            msg = f"{key!r} is not a registry column; known: {', '.join(_COLUMN_NAMES)}"
            raise DataIdError(msg)
        where, params = self._where(data_id or {})
        cur = self.conn.execute(f'SELECT DISTINCT "{key}" FROM raw WHERE {where} ORDER BY "{key}"', params)
        return [r[0] for r in cur.fetchall()]

    def describe_missing(self, data_id: Mapping[str, Any]) -> str:
        """Explain which key of ``data_id`` leaves nothing, with that key's available values."""
        partial: dict[str, Any] = {}
        for key, value in data_id.items():
            trial = dict(partial, **{key: value})
            if not self.find(trial):
                avail = self.distinct(key, partial)
                shown = ", ".join(str(a) for a in avail[:30]) + (" ..." if len(avail) > 30 else "")
                given = ("given " + ", ".join(f"{k}={_fmt(v)}" for k, v in partial.items()) if partial
                         else "in the registry")
                return f"no value of {key}={_fmt(value)} exists {given}; available {key}: {shown or 'none'}"
            partial = trial
        return "the registry is empty" if self.count() == 0 else "no row matches every key together"

    def select(self, expressions: Sequence[Mapping[str, Sequence[Any]]]) -> list[dict[str, Any]]:
        """Rows matching any of the parsed ``--id`` expressions (union, de-duplicated, sorted).

        Raises
        ------
        DataIdError
            If an expression matches nothing: the message names the key that empties the
            selection and lists that key's available values.
        """
        seen: dict[tuple[int, int], dict[str, Any]] = {}
        for expr in expressions or [{}]:
            rows = self.find(expr)
            if not rows:
                msg = f"--id {_fmt_expr(expr)} matches no raw data in {self.path}: {self.describe_missing(expr)}"
                raise DataIdError(msg)
            for r in rows:
                seen[(r["visit"], r["ccdnum"])] = r
        return [seen[k] for k in sorted(seen)]

    # -- writes (ingest) --------------------------------------------------------------------------
    def file_by_fingerprint(self, fingerprint: str) -> dict[str, Any] | None:
        """The ``raw_file`` row with this fingerprint, if any."""
        r = self.conn.execute("SELECT * FROM raw_file WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return dict(r) if r else None

    def file_row(self, file: str) -> dict[str, Any] | None:
        """The ``raw_file`` row of a repository-relative path, if any."""
        r = self.conn.execute("SELECT * FROM raw_file WHERE file = ?", (file,)).fetchone()
        return dict(r) if r else None

    def insert(self, rows: Iterable[Mapping[str, Any]], files: Iterable[Mapping[str, Any]]) -> None:
        """Insert raw rows and file rows in one transaction (all or nothing)."""
        cols = ", ".join(f'"{c}"' for c in _COLUMN_NAMES)
        marks = ", ".join("?" * len(_COLUMN_NAMES))
        with self.conn:
            self.conn.executemany(
                f"INSERT INTO raw ({cols}) VALUES ({marks})",
                [tuple(_py(r.get(c)) for c in _COLUMN_NAMES) for r in rows],
            )
            self.conn.executemany(
                "INSERT INTO raw_file (file, source, fingerprint, size, ingested, mode) VALUES (?, ?, ?, ?, ?, ?)",
                [(f["file"], f["source"], f["fingerprint"], f["size"], f["ingested"], f["mode"]) for f in files],
            )


    def insert_calibrated(self, rows: Iterable[Mapping[str, Any]], cal_rows: Iterable[Mapping[str, Any]],
                          files: Iterable[Mapping[str, Any]]) -> None:
        """Insert raw rows, their ``calibrated`` rows and the file rows in one transaction (all or nothing)."""
        cols = ", ".join(f'"{c}"' for c in _COLUMN_NAMES)
        marks = ", ".join("?" * len(_COLUMN_NAMES))
        cal_cols = _CALIBRATED_COLUMNS
        cal_names = ", ".join(f'"{c}"' for c in cal_cols)  # fixed identifiers of this module
        cal_marks = ", ".join("?" * len(cal_cols))
        with self.conn:
            self.conn.executemany(
                f"INSERT INTO raw ({cols}) VALUES ({marks})",
                [tuple(_py(r.get(c)) for c in _COLUMN_NAMES) for r in rows],
            )
            self.conn.executemany(
                f"INSERT INTO calibrated ({cal_names}) VALUES ({cal_marks})",
                [tuple(_py(r.get(c)) for c in cal_cols) for r in cal_rows],
            )
            self.conn.executemany(
                "INSERT INTO raw_file (file, source, fingerprint, size, ingested, mode) VALUES (?, ?, ?, ?, ?, ?)",
                [(f["file"], f["source"], f["fingerprint"], f["size"], f["ingested"], f["mode"]) for f in files],
            )

    def calibrated_row(self, visit: int, ccdnum: int) -> dict[str, Any] | None:
        """The ``calibrated`` row of a CCD (its image, weight and mask files), or ``None`` for a raw CCD."""
        try:
            r = self.conn.execute("SELECT * FROM calibrated WHERE visit = ? AND ccdnum = ?",
                                  (int(visit), int(ccdnum))).fetchone()
        except sqlite3.OperationalError:  # a registry written before calibrated inputs existed
            return None
        return dict(r) if r else None


_CALIBRATED_COLUMNS = ("visit", "ccdnum", "image", "image_hdu", "weight", "weight_hdu", "mask", "mask_hdu", "dataid")


def _py(v: Any) -> Any:
    """Cast numpy scalars to Python types for sqlite3."""
    return v.item() if hasattr(v, "item") and not isinstance(v, str | bytes) else v


def _fmt(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "^".join(str(v) for v in value)
    return str(value)


def _fmt_expr(expr: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in expr.items()) or "(all)"
