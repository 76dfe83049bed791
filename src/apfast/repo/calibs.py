"""Master calibrations: ingest into a calib repository, look up by date, read.

This is Gen 2's ``ingestCalibs.py`` plus the calib half of the Butler. A calib
repository is a folder with ``calibRegistry.sqlite3`` and the files, stored as
``<type>/<YYYY-MM-DD>/<filter or 'none'>/[<detector>/]<basename>``; per-detector
curated files (Rubin's ``<det>/1970-01-01T00:00:00.yaml``) get the detector
folder so their date-only names do not collide.

Each registry row is one ``(calib_type, ccdnum, filter, calib_date)`` with a
validity range:

* ``validity_days=V`` given: ``[date - V, date + V]``;
* otherwise curated files (ECSV/YAML/DECam crosstalk text, dated by CALIBDATE)
  are valid from their date until the next calib of the same kind (the last one
  open-ended), and FITS masters get ``+-999`` days, as in the Gen 2 tutorials.

Where ranges of one ``(type, ccdnum, filter)`` overlap they are cut at the
midpoint between calib dates (at the later calib's date when one of the two is
curated), and every range of a group is recomputed when a calib joins it, so a
lookup has one answer.

Ingest is all-or-nothing: every file is scanned (headers only) and checked
first; then the files are placed and all rows written in one transaction; on a
failure the copies are removed and the registry is untouched.

Examples
--------
>>> from apfast.repo.calibs import CALIB_TYPES
>>> CALIB_TYPES
('bias', 'flat', 'defects', 'crosstalk', 'linearizer')
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import filecmp
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from apfast.camera import Camera, get_camera
from apfast.errors import CalibrationError, IngestError, InputError
from apfast.repo.calib_formats import (
    CalibEntry,
    Crosstalk,
    Linearizer,
    date_to_mjd,
    mjd_to_iso,
    read_crosstalk_text,
    read_crosstalk_yaml,
    read_defects_ecsv,
    read_defects_fits,
    read_image_hdu,
    read_linearizer_yaml,
    scan_calib_file,
)

__all__ = [
    "CALIB_TYPES",
    "DEFAULT_MASTER_VALIDITY_DAYS",
    "REGISTRY_NAME",
    "CalibIngestReport",
    "CalibRef",
    "CalibRegistry",
    "Crosstalk",
    "Linearizer",
    "ingest_calibs",
    "read_calib",
]

log = logging.getLogger(__name__)

CALIB_TYPES: tuple[str, ...] = ("bias", "flat", "defects", "crosstalk", "linearizer")
#: Validity half-width (days) of FITS masters ingested without ``validity_days``.
DEFAULT_MASTER_VALIDITY_DAYS: float = 999.0
REGISTRY_NAME = "calibRegistry.sqlite3"
_SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS calib_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calib (
    id INTEGER PRIMARY KEY,
    calib_type TEXT NOT NULL,
    ccdnum INTEGER NOT NULL,
    filter TEXT NOT NULL,
    calib_date TEXT NOT NULL,
    calib_mjd REAL NOT NULL,
    valid_start TEXT,
    valid_end TEXT,
    valid_start_mjd REAL,
    valid_end_mjd REAL,
    validity_days REAL,
    path TEXT NOT NULL,
    hdu INTEGER,
    extname TEXT,
    fmt TEXT NOT NULL,
    nrows INTEGER,
    ncols INTEGER,
    source TEXT NOT NULL,
    ingested TEXT NOT NULL,
    UNIQUE (calib_type, ccdnum, filter, calib_date)
);
CREATE INDEX IF NOT EXISTS calib_lookup ON calib (calib_type, ccdnum, filter, calib_mjd);
"""


@dataclass(frozen=True)
class CalibRef:
    """Where one calibration for one CCD lives, and when it is valid.

    Attributes
    ----------
    calib_type : str
        One of :data:`CALIB_TYPES`.
    ccdnum : int
        The CCD (DECam CCDNUM 1-62).
    filter : str or None
        Filter (first word of FILTER) for flats; ``None`` for filter-independent calibs.
    calib_date : str
        ISO datetime of the calibration (DATE-OBS or CALIBDATE).
    valid_start, valid_end : str or None
        ISO datetimes bounding the validity range (inclusive); ``None`` is open-ended.
    path : Path
        Absolute path of the stored file.
    hdu : int or None
        0-based HDU index for FITS files.
    extname : str or None
        EXTNAME of that HDU.
    fmt : str
        'mef-image', 'fits-table', 'ecsv', 'xtalk-text', 'xtalk-yaml' or 'linearizer-yaml'.
    shape : tuple of int or None
        ``(rows, columns)`` of an image calib, from its header at ingest.
    """

    calib_type: str
    ccdnum: int
    filter: str | None
    calib_date: str
    valid_start: str | None
    valid_end: str | None
    path: Path
    hdu: int | None
    extname: str | None
    fmt: str
    shape: tuple[int, int] | None = None


@dataclass(frozen=True)
class CalibIngestReport:
    """What one ``ingest_calibs`` call did.

    Attributes
    ----------
    added : tuple of CalibRef
        New registry rows (ranges as they were right after this ingest).
    skipped : tuple of str
        Files whose every row was already registered with identical content (no-ops).
    files : tuple of str
        Files newly stored in the calib repository.
    """

    added: tuple[CalibRef, ...] = ()
    skipped: tuple[str, ...] = ()
    files: tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_added(self) -> int:
        """Number of registry rows added."""
        return len(self.added)


# --------------------------------------------------------------------------- helpers


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(db), timeout=60.0, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def _row_to_ref(root: Path, row: sqlite3.Row) -> CalibRef:
    shape = (int(row["nrows"]), int(row["ncols"])) if row["nrows"] is not None else None
    return CalibRef(
        calib_type=row["calib_type"],
        ccdnum=int(row["ccdnum"]),
        filter=row["filter"] or None,
        calib_date=row["calib_date"],
        valid_start=row["valid_start"],
        valid_end=row["valid_end"],
        path=(root / row["path"]).absolute(),
        hdu=None if row["hdu"] is None else int(row["hdu"]),
        extname=row["extname"],
        fmt=row["fmt"],
        shape=shape,
    )


def _ranges(rows: Sequence[tuple[float, float | None]]) -> list[tuple[float | None, float | None]]:
    """Validity ranges of one group, sorted by date: ``rows`` are ``(mjd, validity_days or None)``.

    ``None`` validity means "from its date until the next calib". Overlaps between
    neighbours are cut at the midpoint of their dates (at the later date when
    either is open-ended); ranges never overlap afterwards because each boundary
    lies between the two dates it separates.
    """
    n = len(rows)
    start: list[float | None] = []
    end: list[float | None] = []
    for i, (mjd, v) in enumerate(rows):
        if v is None:
            start.append(mjd)
            end.append(rows[i + 1][0] if i + 1 < n else None)
        else:
            start.append(mjd - v)
            end.append(mjd + v)
    for i in range(n - 1):
        (m0, v0), (m1, v1) = rows[i], rows[i + 1]
        b = 0.5 * (m0 + m1) if (v0 is not None and v1 is not None) else m1
        e, s = end[i], start[i + 1]
        if e is None or s is None or e > s:
            end[i] = b if e is None else min(e, b)
            start[i + 1] = b if s is None else max(s, b)
    return list(zip(start, end, strict=True))


def _same_content(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists() and os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _dest_rel(entry: CalibEntry, src: Path, per_detector: bool, camera: Camera) -> Path:
    day = entry.calib_date[:10]
    rel = Path(entry.calib_type) / day / (entry.filter or "none")
    if per_detector:
        rel = rel / (entry.detector or camera.detector_name(entry.ccdnum)).lower()
    return rel / src.name


def _mkdirs(path: Path, new_dirs: list[Path]) -> None:
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    new_dirs.extend(missing)


def _place(src: Path, dest: Path, mode: str) -> None:
    """Put ``src`` at ``dest`` atomically (temporary name, then ``os.replace``)."""
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        if mode == "link":
            tmp.symlink_to(src.absolute())
        elif mode == "move":
            # Hard-link (instant, same file system) or copy now; the source is removed after commit.
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copy2(src, tmp)
        else:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        msg = f"{src}: cannot store it as {dest} ({exc.strerror}); check the calib folder is writable"
        raise IngestError(msg) from None


# --------------------------------------------------------------------------- ingest


def ingest_calibs(
    calib_root: str | Path,
    files: Sequence[str | Path],
    *,
    validity_days: float | None = None,
    mode: Literal["copy", "link", "move"] = "copy",
    camera: Camera | None = None,
    progress: Callable[[str], None] | None = None,
) -> CalibIngestReport:
    """Ingest master and curated calibrations into a calib repository.

    Parameters
    ----------
    calib_root : str or Path
        The calib repository folder (created if needed), e.g. ``REPO/calibs``.
    files : sequence of str or Path
        Bias/flat MEF FITS masters, defects FITS or ECSV, Rubin crosstalk or
        linearizer YAML, DECam crosstalk text files.
    validity_days : float, optional
        Half-width of the validity range of every calib in this call. Default:
        curated files until the next calib, FITS masters 999 days.
    mode : {'copy', 'link', 'move'}
        Copy the files (default), symlink to the absolute source, or move them.
    camera : Camera, optional
        The camera (default DECam); gives the trimmed CCD shape and detector names.
    progress : callable, optional
        Called with one line of text per file.

    Returns
    -------
    CalibIngestReport
        Rows added, files skipped as already ingested, files stored.

    Raises
    ------
    IngestError
        For an unreadable, truncated or unknown file, a missing keyword, or a file
        that claims the same (type, ccdnum, filter, date) as a different file; the
        registry and calib folder are then unchanged.
    InputError
        For a bad ``mode`` or ``validity_days``.

    Examples
    --------
    >>> import tempfile
    >>> ingest_calibs(tempfile.mkdtemp(), []).n_added
    0
    """
    _check_ingest_args(mode, validity_days)
    camera = camera or get_camera("DECam")
    root = Path(calib_root)
    db = root / REGISTRY_NAME

    # 1. Scan and check everything before touching the repository.
    scanned = _scan_files(files, camera)
    existing = _existing_rows(db, scanned, camera)
    plan, skipped = _plan_storage(root, scanned, existing, camera)
    if not plan:
        for s in skipped:
            if progress:
                progress(f"{s}: already ingested, skipped")
        log.info("ingest-calibs: nothing new (%d file(s) already ingested)", len(skipped))
        return CalibIngestReport((), tuple(skipped), ())

    # 2. Place files and write all rows in one transaction.
    added_rows, stored_files = _store(root, db, plan, mode=mode, validity_days=validity_days, camera=camera)
    if mode == "move":
        _remove_moved_sources(root, plan)
    refs = tuple(_row_to_ref(root, r) for r in added_rows)
    for src, _, entries in plan:
        if progress:
            progress(f"{src}: {len(entries)} {entries[0].calib_type} row(s) added")
    for s in skipped:
        if progress:
            progress(f"{s}: already ingested, skipped")
    log.info("ingest-calibs: %d row(s) from %d file(s); %d file(s) already ingested",
             len(refs), len(plan), len(skipped))
    return CalibIngestReport(refs, tuple(skipped), tuple(stored_files))


# --------------------------------------------------------------------------------------------------
# The steps of ingest_calibs
# --------------------------------------------------------------------------------------------------

#: (calib_type, ccdnum, filter, calib_date): the registry's unique key.
_CalibKey = tuple[str, int, str, str]
#: (source file, path relative to the calib root, its new entries) per file to store.
_Plan = list[tuple[Path, Path, list[CalibEntry]]]


def _check_ingest_args(mode: str, validity_days: float | None) -> None:
    """Raise InputError for a bad ``mode`` or ``validity_days``."""
    if mode not in ("copy", "link", "move"):
        msg = f"ingest-calibs mode {mode!r} is not one of copy, link, move"
        raise InputError(msg)
    if validity_days is not None:
        v = float(validity_days)
        if not np.isfinite(v) or v < 0:
            msg = f"--validity {validity_days!r} must be a finite number of days >= 0 (e.g. 999)"
            raise InputError(msg)


def _scan_files(files: Sequence[str | Path], camera: Camera) -> list[tuple[Path, list[CalibEntry]]]:
    """Scan every file once; raise IngestError when two different files claim the same calib."""
    scanned: list[tuple[Path, list[CalibEntry]]] = []
    seen_paths: set[Path] = set()
    for f in files:
        src = Path(f)
        key = src.resolve()
        if key in seen_paths:
            continue
        seen_paths.add(key)
        scanned.append((src, scan_calib_file(src, camera)))
    claims: dict[_CalibKey, Path] = {}
    for src, entries in scanned:
        for e in entries:
            k = (e.calib_type, e.ccdnum, e.filter, e.calib_date)
            other = claims.get(k)
            if other is not None and not _same_content(other, src):
                msg = (
                    f"{src} and {other} both claim {e.calib_type} ccdnum={e.ccdnum} filter={e.filter or 'none'} "
                    f"date={e.calib_date}; ingest only one of them"
                )
                raise IngestError(msg)
            claims.setdefault(k, src)
    return scanned


def _existing_rows(
    db: Path, scanned: list[tuple[Path, list[CalibEntry]]], camera: Camera
) -> dict[_CalibKey, sqlite3.Row]:
    """The registry rows (if the registry exists) with the key of any scanned entry."""
    existing: dict[_CalibKey, sqlite3.Row] = {}
    if db.exists():
        conn = _connect(db)
        try:
            _check_camera(conn, db, camera)
            for _src, entries in scanned:
                for e in entries:
                    row = conn.execute(
                        "SELECT * FROM calib WHERE calib_type=? AND ccdnum=? AND filter=? AND calib_date=?",
                        (e.calib_type, e.ccdnum, e.filter, e.calib_date),
                    ).fetchone()
                    if row is not None:
                        existing[(e.calib_type, e.ccdnum, e.filter, e.calib_date)] = row
        finally:
            conn.close()
    return existing


def _plan_storage(
    root: Path,
    scanned: list[tuple[Path, list[CalibEntry]]],
    existing: dict[_CalibKey, sqlite3.Row],
    camera: Camera,
) -> tuple[_Plan, list[str]]:
    """Where each file with new entries goes, and the files already ingested; IngestError on any conflict."""
    plan: _Plan = []  # (src, dest_rel, new entries)
    skipped: list[str] = []
    dests: dict[Path, Path] = {}
    for src, entries in scanned:
        new = []
        for e in entries:
            row = existing.get((e.calib_type, e.ccdnum, e.filter, e.calib_date))
            if row is None:
                new.append(e)
                continue
            stored = root / row["path"]
            if not _same_content(stored, src):
                msg = (
                    f"{src} claims {e.calib_type} ccdnum={e.ccdnum} filter={e.filter or 'none'} "
                    f"date={e.calib_date}, already registered from {row['source']} (stored as {stored}) "
                    "with different content; remove one of them or give the new one another date"
                )
                raise IngestError(msg)
        if not new:
            skipped.append(str(src))
            continue
        per_det = new[0].fmt in ("ecsv", "xtalk-yaml", "linearizer-yaml")
        rel = _dest_rel(new[0], src, per_det, camera)
        if rel in dests and not _same_content(dests[rel], src):
            msg = f"{src} and {dests[rel]} would both be stored as {root / rel}; rename one of them"
            raise IngestError(msg)
        dest = root / rel
        if dest.exists() and not _same_content(dest, src) and rel not in dests:
            msg = f"{src}: {dest} already exists with different content; rename the file before ingesting it"
            raise IngestError(msg)
        dests[rel] = src
        plan.append((src, rel, new))
    return plan, skipped


def _store(
    root: Path, db: Path, plan: _Plan, *, mode: str, validity_days: float | None, camera: Camera
) -> tuple[list[sqlite3.Row], list[str]]:
    """Place the files and insert their rows in one transaction; on any error undo both and re-raise.

    Returns the added registry rows and the files stored.
    """
    now = _dt.datetime.now(_dt.UTC).replace(tzinfo=None).isoformat(timespec="seconds")
    new_dirs: list[Path] = []
    stored_files: list[str] = []
    added_keys: list[_CalibKey] = []
    created: list[Path] = []
    conn: sqlite3.Connection | None = None  # None once closed
    db_existed = db.exists()
    try:
        _mkdirs(root, new_dirs)
        for src, rel, _ in plan:
            dest = root / rel
            if dest.exists() and _same_content(dest, src):
                continue  # already in place (e.g. ingesting from inside the calib folder)
            _mkdirs(dest.parent, new_dirs)
            _place(src, dest, mode)
            created.append(dest)
            stored_files.append(str(dest))
        conn = _connect(db)
        conn.executescript(_SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        _check_camera(conn, db, camera)
        conn.execute("INSERT OR IGNORE INTO calib_meta (key, value) VALUES ('schema_version', ?)", (_SCHEMA_VERSION,))
        conn.execute("INSERT OR IGNORE INTO calib_meta (key, value) VALUES ('camera', ?)", (camera.name,))
        groups: set[tuple[str, int, str]] = set()
        for src, rel, entries in plan:
            for e in entries:
                if validity_days is not None:
                    vdays: float | None = float(validity_days)
                else:
                    vdays = None if e.curated else DEFAULT_MASTER_VALIDITY_DAYS
                conn.execute(
                    "INSERT INTO calib (calib_type, ccdnum, filter, calib_date, calib_mjd, validity_days, path, "
                    "hdu, extname, fmt, nrows, ncols, source, ingested) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        e.calib_type, e.ccdnum, e.filter, e.calib_date, e.calib_mjd, vdays, rel.as_posix(),
                        e.hdu, e.extname, e.fmt, e.shape[0] if e.shape else None,
                        e.shape[1] if e.shape else None, str(src.absolute()), now,
                    ),
                )
                groups.add((e.calib_type, e.ccdnum, e.filter))
                added_keys.append((e.calib_type, e.ccdnum, e.filter, e.calib_date))
        for g in sorted(groups):
            _recompute_group(conn, g)
        added_rows = [
            conn.execute(
                "SELECT * FROM calib WHERE calib_type=? AND ccdnum=? AND filter=? AND calib_date=?", k
            ).fetchone()
            for k in added_keys
        ]
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            conn = None
        for dest in reversed(created):
            with contextlib.suppress(OSError):
                dest.unlink()
        if not db_existed:
            for p in (db, db.with_name(db.name + "-journal")):
                with contextlib.suppress(OSError):
                    p.unlink()
        for d in sorted(new_dirs, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(exc, sqlite3.Error):
            msg = f"{db}: writing the calib registry failed ({exc}); nothing was ingested, fix the cause and retry"
            raise IngestError(msg) from exc
        raise
    finally:
        if conn is not None:
            conn.close()
    return added_rows, stored_files


def _remove_moved_sources(root: Path, plan: _Plan) -> None:
    """``mode='move'``: delete each source once its copy is stored and registered."""
    for src, rel, _ in plan:
        dest = root / rel
        if src.resolve() != dest.resolve():
            with contextlib.suppress(OSError):
                src.unlink()


def _check_camera(conn: sqlite3.Connection, db: Path, camera: Camera) -> None:
    try:
        row = conn.execute("SELECT value FROM calib_meta WHERE key='camera'").fetchone()
    except sqlite3.Error as exc:
        msg = f"{db}: not a calib registry ({exc}); point at the calib folder made by ingest-calibs"
        raise IngestError(msg) from None
    if row is not None and row["value"] != camera.name:
        msg = f"{db} holds calibs for camera {row['value']}, not {camera.name}; use a separate calib folder"
        raise IngestError(msg)


def _recompute_group(conn: sqlite3.Connection, group: tuple[str, int, str]) -> None:
    rows = conn.execute(
        "SELECT id, calib_mjd, validity_days FROM calib WHERE calib_type=? AND ccdnum=? AND filter=? "
        "ORDER BY calib_mjd, id",
        group,
    ).fetchall()
    ranges = _ranges([(float(r["calib_mjd"]), None if r["validity_days"] is None else float(r["validity_days"]))
                      for r in rows])
    for r, (s, e) in zip(rows, ranges, strict=True):
        conn.execute(
            "UPDATE calib SET valid_start=?, valid_end=?, valid_start_mjd=?, valid_end_mjd=? WHERE id=?",
            (None if s is None else mjd_to_iso(s), None if e is None else mjd_to_iso(e), s, e, r["id"]),
        )


# --------------------------------------------------------------------------- registry


class CalibRegistry:
    """Read access to a calib repository's ``calibRegistry.sqlite3``.

    Parameters
    ----------
    calib_root : str or Path
        The calib folder given to ``ingest-calibs``.

    Raises
    ------
    CalibrationError
        If the folder has no registry (run ``apfast ingest-calibs`` first).
    """

    def __init__(self, calib_root: str | Path) -> None:
        self.root = Path(calib_root).absolute()
        self.db = self.root / REGISTRY_NAME
        if not self.db.is_file():
            msg = (
                f"no calib registry at {self.db}; run 'apfast ingest-calibs {calib_root} FILES...' "
                "to ingest master calibrations first"
            )
            raise CalibrationError(msg)

    def _query(self, sql: str, params: Sequence[Any]) -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=60.0)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            msg = f"{self.db}: cannot read the calib registry ({exc}); re-create it with ingest-calibs"
            raise CalibrationError(msg) from None
        finally:
            conn.close()

    def lookup(self, calib_type: str, *, ccdnum: int, date: str | float, filter: str | None = None) -> CalibRef:
        """Return the calibration of a type for a CCD valid at ``date``.

        Parameters
        ----------
        calib_type : str
            One of :data:`CALIB_TYPES`.
        ccdnum : int
            The CCD.
        date : str or float
            ISO date/datetime (``'2014-06-01'``) or MJD.
        filter : str, optional
            Needed for flats: the band (``'g'``) or the full FILTER string.

        Returns
        -------
        CalibRef
            The row whose validity range contains ``date`` (the nearest calib date if several).

        Raises
        ------
        CalibrationError
            If nothing is valid then; the message lists the dates that are available.
        """
        if calib_type not in CALIB_TYPES:
            msg = f"unknown calib type {calib_type!r}; expected one of {', '.join(CALIB_TYPES)}"
            raise CalibrationError(msg)
        try:
            mjd = date_to_mjd(date)
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None
        band = ""
        if calib_type == "flat":
            if filter is None or not str(filter).split():
                msg = f"flat lookup for ccdnum={ccdnum} needs a filter (e.g. filter='g'); none was given"
                raise CalibrationError(msg)
            band = str(filter).split()[0]
        rows = self._query(
            "SELECT * FROM calib WHERE calib_type=? AND ccdnum=? AND filter=? "
            "AND (valid_start_mjd IS NULL OR valid_start_mjd <= ?) AND (valid_end_mjd IS NULL OR ? <= valid_end_mjd)",
            (calib_type, int(ccdnum), band, mjd, mjd),
        )
        if rows:
            best = min(rows, key=lambda r: (abs(float(r["calib_mjd"]) - mjd), -float(r["calib_mjd"])))
            return _row_to_ref(self.root, best)
        self._raise_missing(calib_type, int(ccdnum), band, date, mjd)
        raise AssertionError  # pragma: no cover - _raise_missing always raises

    def _raise_missing(self, calib_type: str, ccdnum: int, band: str, date: Any, mjd: float) -> None:
        avail = self._query(
            "SELECT calib_date, valid_start, valid_end FROM calib WHERE calib_type=? AND ccdnum=? AND filter=? "
            "ORDER BY calib_mjd",
            (calib_type, ccdnum, band),
        )
        what = f"{calib_type} for ccdnum={ccdnum}" + (f" filter={band}" if band else "")
        when = f"{date!r} (MJD {mjd:.5f})"
        if avail:
            listing = "; ".join(
                f"{r['calib_date']} valid {r['valid_start'] or '-inf'} .. {r['valid_end'] or '+inf'}" for r in avail
            )
            msg = (
                f"no {what} is valid at {when}. Available: {listing}. Ingest a {calib_type} valid then, "
                "or re-ingest with a wider --validity"
            )
        else:
            others = self._query(
                "SELECT DISTINCT filter FROM calib WHERE calib_type=? AND ccdnum=?", (calib_type, ccdnum)
            )
            extra = ""
            if others:
                extra = f" (filters available for this CCD: {', '.join(sorted(r['filter'] or 'none' for r in others))})"
            msg = (
                f"no {what} in {self.db} at {when}: none has been ingested{extra}. Ingest one with "
                f"'apfast ingest-calibs {self.root} FILES...'"
            )
        raise CalibrationError(msg)

    def list(self, calib_type: str | None = None) -> list[CalibRef]:
        """Every registered calibration (of one type, if given), by type, ccdnum, filter and date."""
        if calib_type is None:
            rows = self._query("SELECT * FROM calib ORDER BY calib_type, ccdnum, filter, calib_mjd", ())
        else:
            rows = self._query(
                "SELECT * FROM calib WHERE calib_type=? ORDER BY ccdnum, filter, calib_mjd", (calib_type,)
            )
        return [_row_to_ref(self.root, r) for r in rows]

    def __len__(self) -> int:
        """Number of registry rows."""
        return int(self._query("SELECT COUNT(*) AS n FROM calib", ())[0]["n"])


# --------------------------------------------------------------------------- reading


def read_calib(ref: CalibRef, *, camera: Camera | None = None) -> Any:
    """Read a calibration found by :meth:`CalibRegistry.lookup`.

    Parameters
    ----------
    ref : CalibRef
        The registry entry.
    camera : Camera, optional
        Checks image shapes against ``camera.trimmed_shape`` and names crosstalk amps
        and detectors (default: the shape recorded at ingest, DECam names).

    Returns
    -------
    ndarray or Crosstalk or Linearizer
        * bias/flat: float32 ``(rows, columns)`` native-endian, C-contiguous (ADU; flat ~1);
        * defects: int32 ``(N, 4)`` columns x0, y0, width, height (0-based trimmed pixels);
        * crosstalk: :class:`Crosstalk` (``coeffs[victim, source]``);
        * linearizer: :class:`Linearizer` (lookup table and per-amp row/offset).

    Raises
    ------
    CalibrationError
        If the file is missing or unreadable, or an image has the wrong shape
        (the message names the file, the HDU and the shape found).
    """
    if not ref.path.exists():
        msg = (f"{ref.path}: the calibration file registered for {ref.calib_type} ccdnum={ref.ccdnum} is missing; "
               "re-ingest it")
        raise CalibrationError(msg)
    cam = camera or get_camera("DECam")
    if ref.calib_type in ("bias", "flat"):
        expected = tuple(camera.trimmed_shape) if camera is not None else ref.shape
        return read_image_hdu(ref.path, int(ref.hdu or 0), expected)  # type: ignore[arg-type]
    if ref.calib_type == "defects":
        if ref.fmt == "ecsv":
            return read_defects_ecsv(ref.path)
        return read_defects_fits(ref.path, int(ref.hdu or 1))
    if ref.calib_type == "crosstalk":
        if ref.fmt == "xtalk-text":
            return read_crosstalk_text(ref.path, ref.ccdnum, cam)
        return read_crosstalk_yaml(ref.path, tuple(a.name for a in cam.amplifiers))
    if ref.calib_type == "linearizer":
        return read_linearizer_yaml(ref.path)
    msg = f"unknown calib type {ref.calib_type!r} in {ref.path}; expected one of {', '.join(CALIB_TYPES)}"
    raise CalibrationError(msg)
