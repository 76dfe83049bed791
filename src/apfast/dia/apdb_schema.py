"""Rubin's APDB schema 10.0.0 (tables DiaObject, DiaSource, DiaForcedSource ...) as SQLAlchemy Core.

The tables, column names, types, nullability, defaults, primary keys and index
names are those that ``lsst-dax-apdb`` (ApdbSql 1.2.1, "baseline" object index,
HTM level-20 ``pixelId``) creates from ``sdm_schemas`` apdb.yaml 10.0.0, so
Rubin's own client can read an APDB made by apfast. The column lists are
written here in a compact form (``name TYPE`` with ``!`` for NOT NULL) rather
than read from any file at run time. Type letters::

    D  DOUBLE (float64; DOUBLE PRECISION on PostgreSQL)   R  REAL (float32)
    L  BIGINT    I  INTEGER    S  SMALLINT    B  BOOLEAN
    C1 CHAR(1)   V7 VARCHAR(7)  T  TEXT

One bookkeeping table is ours: ``apfast_ccd_visit`` holds one row per
CCD-visit whose rows are completely stored (written last in the same
transaction), which makes re-runs and undo exact. Rubin's reader ignores it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.types import TypeEngine

from apfast.errors import ApfastError

__all__ = [
    "APDB_SQL_VERSION",
    "COLUMN_KINDS",
    "NOT_NULL_ZERO",
    "SCHEMA_VERSION",
    "ApdbError",
    "ApdbMissingError",
    "ApdbUrlError",
    "make_metadata",
    "metadata_rows",
]


class ApdbError(ApfastError):
    """The APDB is missing, of another schema version, locked too long, or given bad rows."""


class ApdbMissingError(ApdbError):
    """No APDB (or one of another schema version) at the URL: a set-up error, fixed by ``apfast make-apdb``."""

    exit_code = 2


class ApdbUrlError(ApdbError):
    """An ``apdb.db_url`` that cannot work (bad syntax, unknown database, unusable SQLite path): exit 2."""

    exit_code = 2


SCHEMA_VERSION = "10.0.0"
APDB_SQL_VERSION = "1.2.1"
HTM_LEVEL = 20
BANDS = "ugrizy"

_DIA_OBJECT_HEAD = (
    "diaObjectId L! validityStartMjdTai D! validityEndMjdTai D ra D! raErr R dec D! decErr R ra_dec_Cov R"
)
_DIA_OBJECT_TAIL = "firstDiaSourceMjdTai D lastDiaSourceMjdTai D nDiaSources I! pixelId L!"


def _dia_object_spec() -> str:
    parts = [_DIA_OBJECT_HEAD]
    for b in BANDS:
        parts.append(
            f"{b}_psfFluxMean R {b}_psfFluxMeanErr R {b}_psfFluxSigma R {b}_psfFluxNdata I! "
            f"{b}_fpFluxMean R {b}_fpFluxMeanErr R"
        )
    for b in BANDS:
        parts.append(f"{b}_scienceFluxMean R {b}_scienceFluxMeanErr R")
    for b in BANDS:
        parts.append(f"{b}_psfFluxMin R {b}_psfFluxMax R {b}_psfFluxMaxSlope R {b}_psfFluxErrMean R")
    parts.append(_DIA_OBJECT_TAIL)
    return " ".join(parts)


_PIXEL_FLAGS = " ".join(
    f"pixelFlags{s} B"
    for s in (
        "", "_bad", "_cr", "_crCenter", "_edge", "_nodata", "_nodataCenter", "_interpolated",
        "_interpolatedCenter", "_offimage", "_saturated", "_saturatedCenter", "_suspect", "_suspectCenter",
        "_streak", "_streakCenter", "_injected", "_injectedCenter", "_injected_template",
        "_injected_templateCenter",
    )
)  # fmt: skip

_DIA_SOURCE_SPEC = f"""
diaSourceId L! visit L! detector S! diaObjectId L ssObjectId L parentDiaSourceId L ssObjectReassocTimeMjdTai D
midpointMjdTai D! exposureTime R ra D! raErr R dec D! decErr R ra_dec_Cov R x R! xErr R y R! yErr R
centroid_flag B apFlux R apFluxErr R apFlux_flag B apFlux_flag_apertureTruncated B isNegative B snr R
psfFlux R psfFluxErr R psfLnL R psfChi2 R psfNdata I! psfFlux_flag B psfFlux_flag_edge B
psfFlux_flag_noGoodPixels B trailFlux R trailFluxErr R trailRa D trailRaErr R trailDec D trailDecErr R
trailLength R trailLengthErr R trailAngle R trailAngleErr R trailChi2 R trailNdata I!0 trailAlgorithm I
trail_flag_edge B trail_flag B dipoleMeanFlux R dipoleMeanFluxErr R dipoleFluxDiff R dipoleFluxDiffErr R
dipoleLength R dipoleAngle R dipoleChi2 R dipoleNdata I! scienceFlux R scienceFluxErr R forced_PsfFlux_flag B
forced_PsfFlux_flag_edge B forced_PsfFlux_flag_noGoodPixels B templateFlux R templateFluxErr R
ixx R iyy R ixy R ixxPSF R iyyPSF R ixyPSF R shape_flag B shape_flag_no_pixels B shape_flag_not_contained B
shape_flag_parent_source B extendedness R reliability R reliabilityVersion V7 band C1 isDipole B
dipoleFitAttempted B timeProcessedMjdTai D! timeWithdrawnMjdTai D bboxSize I! {_PIXEL_FLAGS}
glint_trail B pixelId L!
"""

_DIA_FORCED_SOURCE_SPEC = """
diaForcedSourceId L! diaObjectId L! ra D! dec D! visit L! detector S! psfFlux R psfFluxErr R
midpointMjdTai D! scienceFlux R scienceFluxErr R band C1 timeProcessedMjdTai D! timeWithdrawnMjdTai D
"""

_MATCH_SPEC = "diaObjectId L! objectId L! dist R lnP R"
_METADATA_SPEC = "name T! value T!"
_CCD_VISIT_SPEC = (
    "visit L! detector S! midpointMjdTai D! nDiaSources I! nNewDiaObjects I! nDiaForcedSources I! "
    "timeProcessedMjdTai D!"
)

#: (table, column spec, primary key, {index name: columns})
_TABLES: tuple[tuple[str, str, tuple[str, ...], dict[str, tuple[str, ...]]], ...] = (
    (
        "DiaObject",
        _dia_object_spec(),
        ("diaObjectId", "validityStartMjdTai"),
        {"IDX_DiaObject_pixelId": ("pixelId",), "IDX_DiaObject_validityStart": ("validityStartMjdTai",)},
    ),
    (
        "DiaSource",
        _DIA_SOURCE_SPEC,
        ("diaSourceId",),
        {
            "IDX_DiaSource_visitDetector": ("visit", "detector"),
            "IDX_DiaSource_diaObjectId": ("diaObjectId",),
            "IDX_DiaSource_ssObjectId": ("ssObjectId",),
            "IDX_DiaSource_pixelId": ("pixelId",),
        },
    ),
    (
        "DiaForcedSource",
        _DIA_FORCED_SOURCE_SPEC,
        ("diaObjectId", "visit", "detector"),
        {"IDX_DiaForcedSource_visitDetector": ("visit", "detector")},
    ),
    (
        "DiaObject_To_Object_Match",
        _MATCH_SPEC,
        (),
        {
            "IDX_DiaObjectToObjectMatch_diaObjectId": ("diaObjectId",),
            "IDX_DiaObjectToObjectMatch_objectId": ("objectId",),
        },
    ),
    ("metadata", _METADATA_SPEC, ("name",), {}),
    ("apfast_ccd_visit", _CCD_VISIT_SPEC, ("visit", "detector"), {}),
)


def _sql_type(code: str) -> TypeEngine:
    if code == "D":
        # "DOUBLE" as Rubin's SQLite DDL spells it; PostgreSQL needs "DOUBLE PRECISION"
        return sa.DOUBLE().with_variant(sa.DOUBLE_PRECISION(), "postgresql")
    if code == "R":
        return sa.REAL()
    if code == "L":
        return sa.BIGINT()
    if code == "I":
        return sa.INTEGER()
    if code == "S":
        return sa.SMALLINT()
    if code == "B":
        return sa.BOOLEAN(create_constraint=False)
    if code == "T":
        return sa.Text()
    if code.startswith("C"):
        return sa.CHAR(int(code[1:]))
    if code.startswith("V"):
        return sa.VARCHAR(int(code[1:]))
    msg = f"internal: unknown APDB type code {code!r}"
    raise ValueError(msg)


def _parse(spec: str) -> list[tuple[str, str, bool, str | None]]:
    """``"a L! b R c I!0"`` -> [(name, type code, nullable, server default)]."""
    words = spec.split()
    out = []
    for name, t in zip(words[::2], words[1::2], strict=True):
        code, bang, default = t.partition("!")
        out.append((name, code, not bang, default or None))
    return out


#: table -> column -> (kind, nullable); kind is "f" float, "i" integer, "b" bool, "s" text.
COLUMN_KINDS: dict[str, dict[str, tuple[str, bool]]] = {}
for _name, _spec, _pk, _idx in _TABLES:
    COLUMN_KINDS[_name] = {
        c: ({"D": "f", "R": "f", "L": "i", "I": "i", "S": "i", "B": "b"}.get(code, "s"), nullable)
        for c, code, nullable, _d in _parse(_spec)
    }

#: NOT NULL count-like columns that default to 0 when a caller leaves them out.
NOT_NULL_ZERO: dict[str, tuple[str, ...]] = {
    "DiaObject": tuple(f"{b}_psfFluxNdata" for b in BANDS) + ("nDiaSources",),
    "DiaSource": ("psfNdata", "trailNdata", "dipoleNdata", "bboxSize"),
    "DiaForcedSource": (),
}


def make_metadata() -> sa.MetaData:
    """Build the SQLAlchemy ``MetaData`` holding every APDB table (no database touched).

    Returns
    -------
    sqlalchemy.MetaData
        Tables ``DiaObject``, ``DiaSource``, ``DiaForcedSource``,
        ``DiaObject_To_Object_Match``, ``metadata`` and ``apfast_ccd_visit``.

    Examples
    --------
    >>> md = make_metadata()
    >>> len(md.tables["DiaObject"].columns), len(md.tables["DiaSource"].columns)
    (84, 104)
    """
    md = sa.MetaData()
    for name, spec, pk, indexes in _TABLES:
        cols = [
            sa.Column(c, _sql_type(code), nullable=nullable, server_default=default, autoincrement=False)
            for c, code, nullable, default in _parse(spec)
        ]
        args: list = list(cols)
        if pk:
            args.append(sa.PrimaryKeyConstraint(*pk))
        table = sa.Table(name, md, *args)
        for iname, icols in indexes.items():
            sa.Index(iname, *(table.c[c] for c in icols))
    return md


def metadata_rows(apfast_version: str) -> dict[str, str]:
    """The rows of the ``metadata`` table: Rubin's version and config rows plus ours.

    Parameters
    ----------
    apfast_version : str
        Written as ``apfast:version``.

    Returns
    -------
    dict of str to str
    """
    config = {
        "enable_replica": False,
        "dia_object_index": "baseline",
        "htm_level": HTM_LEVEL,
        "htm_index_column": "pixelId",
        "ra_dec_columns": ["ra", "dec"],
    }
    return {
        "version:schema": SCHEMA_VERSION,
        "version:ApdbSql": APDB_SQL_VERSION,
        "config:apdb-sql.json": json.dumps(config),
        "apfast:version": apfast_version,
    }


# ---------------------------------------------------------------- column sets <-> DB-API rows
def column_length(table: str, cols: dict[str, np.ndarray]) -> int:
    """The common length of a column set's 1-D arrays (ApdbError when they differ)."""
    lengths = {c: np.shape(v)[0] if np.ndim(v) else -1 for c, v in cols.items()}
    sizes = set(lengths.values())
    if len(sizes) > 1 or -1 in sizes:
        msg = f"{table} column set has columns of different lengths or scalars: {lengths}; pass equal-length 1-D arrays"
        raise ApdbError(msg)
    return sizes.pop() if sizes else 0


def to_python(table: str, name: str, arr: Any, kind_null: tuple[str, bool]) -> list:
    """One column as a list of Python scalars / None, cast once with ``tolist``."""
    kind, nullable = kind_null
    a = np.asarray(arr)
    if a.dtype == object:
        null = np.array(
            [v is None or (isinstance(v, float) and math.isnan(v)) for v in a.tolist()], dtype=bool
        )
    elif a.dtype.kind == "f":
        null = np.isnan(a)
    else:
        null = None
    if null is not None and null.any():
        if not nullable:
            msg = f"{table}.{name} is NOT NULL but has {int(null.sum())} NaN/None value(s); fill it"
            raise ApdbError(msg)
        good = ~null
        out = np.empty(a.shape[0], dtype=object)
        out[good] = cast_kind(a[good], kind)
        return out.tolist()
    return cast_kind(a, kind).tolist()


def cast_kind(a: np.ndarray, kind: str) -> np.ndarray:
    """Cast a column to the numpy type whose ``tolist`` gives the DB-API Python type."""
    if kind == "f":
        return a.astype(np.float64, copy=False)
    if kind == "i":
        return a.astype(np.int64, copy=False)
    if kind == "b":
        return a.astype(bool, copy=False)
    return a.astype(str).astype(object)


def to_column_set(table: str, names: list[str], rows: Sequence[Any]) -> dict[str, np.ndarray]:
    """DB-API result rows -> column set (float64 with NaN; int64/bool, or object with None if NULLs)."""
    kinds = COLUMN_KINDS[table]
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    out: dict[str, np.ndarray] = {}
    for name, values in zip(names, cols, strict=True):
        kind = kinds.get(name, ("s", True))[0]
        if kind == "f":
            out[name] = np.array(values, dtype=np.float64)  # None -> NaN
        elif kind == "i":
            try:
                out[name] = np.array(values, dtype=np.int64)
            except TypeError:  # a NULL among them
                out[name] = np.array(values, dtype=object)
        elif kind == "b":
            # not the try/except above: numpy would turn None into False
            if None in values:
                out[name] = np.array(values, dtype=object)
            else:
                out[name] = np.array(values, dtype=bool)
        else:
            out[name] = np.array(values, dtype=object)
    return out


def _null_column(like: np.ndarray, n: int) -> np.ndarray:
    """``n`` NULLs shaped for a column like ``like``: NaN for numbers, None otherwise."""
    if like.dtype.kind in "fiub":
        return np.full(n, np.nan, dtype=like.dtype if like.dtype.kind == "f" else np.float64)
    return np.full(n, None, dtype=object)


def concat_column_sets(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate column sets; a column missing from a part is NULL (NaN or None) in its rows.

    Parts without rows add nothing but their column names (so an all-empty result keeps its
    columns). Mixed numeric dtypes follow numpy's promotion; object dtype wins over anything else.
    """
    keyed = [p for p in parts if p]
    if not keyed:
        return {}
    full = [p for p in keyed if len(next(iter(p.values()))) > 0] or keyed[:1]
    keys = list(dict.fromkeys(k for p in keyed for k in p))
    out = {}
    for k in keys:
        ref = next(np.asarray(p[k]) for p in (*full, *keyed) if k in p)
        arrs = [np.asarray(p[k]) if k in p else _null_column(ref, len(next(iter(p.values())))) for p in full]
        kinds = {a.dtype.kind for a in arrs}
        if "O" in kinds or (len(kinds) > 1 and not kinds <= {"f", "i", "u", "b"}):
            arrs = [a.astype(object) for a in arrs]
        out[k] = np.concatenate(arrs)
    return out
