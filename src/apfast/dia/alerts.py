"""Rubin-format Avro alerts: one record per DIA source, with history, DiaObject and FITS cutouts.

This is apfast's version of Rubin's ``PackageAlertsTask`` (ap_association). Inputs are
APDB rows (schema 10.0.0; its SQLite DDL is ``tests/data/rubin_apdb_schema_sqlite.sql`` in the
source tree); outputs are records of Rubin's Avro alert schema as shipped by the
``lsst-alert-packet`` package (latest: 11.1), written with ``fastavro`` into one Avro container
file per CCD-visit.

Field mapping (APDB column -> alert field)
------------------------------------------
Alert schemas 9.0 - 11.x use exactly the APDB 10.0.0 column names, so a field is filled
from the APDB column of the same name. The table :data:`ALERT_FIELD_SOURCES` lists the
fields whose names differ (they occur in older schemas, still loadable by version):

===================  ==========================  ===========================================
alert record         alert field                 APDB column
===================  ==========================  ===========================================
diaSource            ``time_processed`` (8.0)    ``timeProcessedMjdTai`` (*)
diaForcedSource      ``time_processed`` (8.0)    ``timeProcessedMjdTai`` (*)
diaObject            ``validityStart`` (8.0)     ``validityStartMjdTai`` (*)
alert                ``diaSourceId`` (>= 8.0)    the ``alert_id`` argument (= diaSourceId)
alert                ``alertId`` (< 8.0)         the ``alert_id`` argument
===================  ==========================  ===========================================

(*) schema 8.0 stores these as ``timestamp-micros``: MJD TAI is converted to microseconds
since 1970-01-01 UTC (TAI - UTC = 37 s). Schemas older than 8.0 (different field sets) are
not supported.

APDB-only columns (``pixelId``, ``validityEndMjdTai``, ``ssObjectReassocTimeMjdTai``, and
anything else the schema does not know) are dropped.

Values and defaults
-------------------
* numpy scalars become Python ``int``/``float``/``bool``/``str``; ``bytes`` are decoded;
* a nullable field gets ``None`` when the column is missing, ``None`` or NaN;
* a required (non-nullable) field with no value gets the default in
  :data:`REQUIRED_DEFAULTS` (counts such as ``psfNdata``, ``nDiaSources``, ``bboxSize``:
  ``0``; ``timeProcessedMjdTai``: the time the alerts are made, MJD TAI); any other missing
  required field (``diaSourceId``, ``ra``, ``dec``, ``x``, ``midpointMjdTai`` ...) is an
  :class:`~apfast.errors.InputError`. A NaN in a required float field is kept (Avro
  floats hold NaN);
* alert-level fields we have no data for (``observation_reason``, ``target_name``,
  ``ssSource``, ``mpc_orbits``) are ``None``;
* as in Rubin's ``PackageAlertsTask``: ``prvDiaSources`` is ``None`` when the object has no
  earlier DiaSource, ``prvDiaForcedSources`` is a (possibly empty) list;
* a DiaSource whose DiaObject row is not given gets ``diaObject = None`` (the schema
  allows it; Rubin does the same for Solar System sources).

Cutouts
-------
Built by :mod:`apfast.dia.alert_cutouts` (:func:`cutout_fits_bytes`, re-exported here):
Rubin's layout (calibrated image in nJy + variance HDU, local TAN WCS at the source).

Files
-----
Schema loading and the Avro files (:func:`load_alert_schema`, :func:`write_alerts`,
:func:`read_alerts`) live in :mod:`apfast.repo.avro`, the Butler's ``Avro`` storage, and are
re-exported here.

Examples
--------
>>> schema = load_alert_schema()
>>> schema["name"]
'lsst.v11_1.alert'
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np

from apfast._configbase import ConfigSection, opt
from apfast.dia.alert_cutouts import cutout_fits_bytes, cutouts_at
from apfast.errors import InputError
from apfast.repo.avro import (
    MissingDependencyError,
    available_schema_versions,
    load_alert_schema,
    read_alerts,
    write_alerts,
)

__all__ = [
    "ALERT_FIELD_SOURCES",
    "REQUIRED_DEFAULTS",
    "AlertsConfig",
    "MissingDependencyError",
    "available_schema_versions",
    "build_ccd_alerts",
    "cutout_fits_bytes",
    "load_alert_schema",
    "make_alert",
    "read_alerts",
    "write_alerts",
]

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]

#: Alert field -> APDB column, per alert record, where the names differ (older schemas).
ALERT_FIELD_SOURCES: dict[str, dict[str, str]] = {
    "diaSource": {"time_processed": "timeProcessedMjdTai"},
    "diaForcedSource": {"time_processed": "timeProcessedMjdTai"},
    "diaObject": {"validityStart": "validityStartMjdTai"},
}

#: Values of required (non-nullable) alert fields when the APDB row has none. ``None`` here
#: means "the time the alerts are made" (MJD TAI).
REQUIRED_DEFAULTS: dict[str, Any] = {
    "psfNdata": 0,
    "trailNdata": 0,
    "dipoleNdata": 0,
    "bboxSize": 0,
    "nDiaSources": 0,
    "u_psfFluxNdata": 0,
    "g_psfFluxNdata": 0,
    "r_psfFluxNdata": 0,
    "i_psfFluxNdata": 0,
    "z_psfFluxNdata": 0,
    "y_psfFluxNdata": 0,
    "pmParallaxNdata": 0,
    "timeProcessedMjdTai": None,
    "time_processed": None,
}

#: TAI - UTC since 2017-01-01 (no leap second announced since), seconds.
_TAI_MINUS_UTC = 37.0
_MJD_UNIX_EPOCH = 40587.0


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertsConfig(ConfigSection):
    """Avro alerts: schema version, cutout size and file compression (``alerts``)."""

    schema_version: str | None = opt(
        None,
        "Rubin alert schema version from lsst-alert-packet, e.g. '11.1'; none uses the latest installed.",
    )
    cutout_size: int = opt(30, "Side of the square cutouts in pixels (Rubin: 30).")
    min_reliability: float = opt(
        0.5,
        "Send an alert only for a DIA source whose reliability is at least this (0..1; Rubin: 0.5); sources "
        "below it are still stored in the APDB. Sources without a score (reliability.model = none) always alert.",
    )
    cutout_mask: bool = opt(
        False, "Add the mask plane as a MASK HDU to each cutout (Rubin's cutouts have none)."
    )
    codec: Literal["null", "deflate"] = opt(
        "null",
        "Avro block compression of the alert files.",
        choices={
            "null": "uncompressed: 200 alerts with 3 cutouts each write in ~25 ms (~10 MB)",
            "deflate": "zlib blocks: 2.5x smaller on DECam cutouts but ~250 ms more per 200 alerts",
        },
    )

    def _validate(self) -> None:
        if not 0.0 <= self.min_reliability <= 1.0:
            self._fail("min_reliability", self.min_reliability, "use a number between 0 and 1, e.g. 0.5 (0 = all)")
        if not 1 <= self.cutout_size <= 1000:
            self._fail("cutout_size", self.cutout_size, "use a side between 1 and 1000 pixels, e.g. 30")
        if self.schema_version is not None and self.schema_version not in available_schema_versions():
            self._fail(
                "schema_version",
                self.schema_version,
                f"use one of {available_schema_versions()} or none for the latest",
            )


# --------------------------------------------------------------------------- field plans
@dataclass(frozen=True, slots=True)
class _Field:
    name: str  # alert field
    column: str  # APDB column it is filled from
    kind: str  # avro primitive: long, int, float, double, boolean, string, bytes
    nullable: bool


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to fill the records of one alert schema version."""

    id_field: str
    top_fields: tuple[tuple[str, bool], ...]  # (name, nullable) of every alert-level field
    records: dict[str, tuple[_Field, ...]]  # "diaSource"/"diaObject"/"diaForcedSource" -> fields


def _primitive(tp: Any) -> tuple[str, bool]:
    """Return (avro primitive name, nullable) of a field type."""
    if isinstance(tp, list):
        rest = [t for t in tp if t != "null"]
        if len(rest) == 1 and isinstance(rest[0], str):
            return rest[0], "null" in tp
        return "complex", "null" in tp
    if isinstance(tp, str):
        return tp, False
    if isinstance(tp, dict) and tp.get("logicalType") == "timestamp-micros":
        return "timestamp", False
    return "complex", False


@lru_cache(maxsize=8)
def _plan(version: str | None) -> _Plan:
    schema = load_alert_schema(version)
    major = int(schema["name"].split(".v", 1)[1].split("_", 1)[0])
    if major < 8:
        msg = f"alert schema {schema['name']} is older than 8.0, which apfast does not fill; use 8.0 or later"
        raise InputError(msg)
    named = schema.get("__named_schemas", {})
    records: dict[str, tuple[_Field, ...]] = {}
    for short in ("diaSource", "diaObject", "diaForcedSource"):
        definition = next((d for n, d in named.items() if n.rsplit(".", 1)[-1] == short), None)
        if definition is None:
            continue
        renames = ALERT_FIELD_SOURCES.get(short, {})
        fields = []
        for f in definition["fields"]:
            kind, nullable = _primitive(f["type"])
            if kind == "complex":
                if not nullable:
                    msg = (
                        f"alert schema {schema['name']} field {short}.{f['name']} has a complex type apfast "
                        f"cannot fill; use schema version 9.0 or later"
                    )
                    raise InputError(msg)
                continue  # filled with None
            fields.append(_Field(f["name"], renames.get(f["name"], f["name"]), kind, nullable))
        records[short] = tuple(fields)
    names = [f["name"] for f in schema["fields"]]
    id_field = "diaSourceId" if "diaSourceId" in names else "alertId"
    top = tuple((f["name"], _primitive(f["type"])[1]) for f in schema["fields"])
    return _Plan(id_field, top, records)


def _now_mjd_tai() -> float:
    return time.time() / 86400.0 + _MJD_UNIX_EPOCH + _TAI_MINUS_UTC / 86400.0


# --------------------------------------------------------------------------- value conversion
def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float | np.floating) and math.isnan(v))


def _cast_scalar(v: Any, kind: str) -> Any:
    if kind in ("long", "int"):
        return int(v)
    if kind == "timestamp":
        return _convert_column(np.array([float(v)]), kind)[0]
    if kind in ("float", "double"):
        return float(v)
    if kind == "boolean":
        return bool(v)
    if kind == "string":
        return v.decode() if isinstance(v, bytes | np.bytes_) else str(v)
    if kind == "bytes":
        return bytes(v)
    return v


def _convert_column(values: Any, kind: str) -> list[Any]:
    """Convert one column to a list of Python values of an Avro primitive; NULL -> None.

    Numeric columns go through ``ndarray.tolist`` (C speed); object columns element by element.
    """
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        nulls = np.flatnonzero(np.isnan(arr))
        if kind in ("float", "double"):
            out = arr.astype(np.float64, copy=False).tolist()
        elif kind == "timestamp":  # MJD TAI -> microseconds since 1970-01-01 UTC
            safe = np.where(np.isnan(arr), _MJD_UNIX_EPOCH, arr)
            out = (
                np.round(((safe - _MJD_UNIX_EPOCH) * 86400.0 - _TAI_MINUS_UTC) * 1e6)
                .astype(np.int64)
                .tolist()
            )
        elif kind in ("long", "int"):
            safe = np.where(np.isnan(arr), 0, arr)
            # integers stored in float64 columns (NULL-able ints) are exact below 2**53
            out = safe.astype(np.int64).tolist()
        elif kind == "boolean":
            out = (np.nan_to_num(arr) != 0).tolist()
        else:
            out = [_cast_scalar(v, kind) for v in arr.tolist()]
        for i in nulls:
            out[i] = None
        return out
    if arr.dtype.kind in "iub" and kind != "string":
        if kind in ("float", "double", "timestamp"):
            return _convert_column(arr.astype(np.float64), kind)
        if kind == "boolean":
            return arr.astype(bool).tolist()
        return arr.astype(np.int64).tolist() if arr.dtype.kind == "u" else arr.tolist()
    return [None if _is_null(v) else _cast_scalar(v, kind) for v in arr.tolist()]


def _records_from_columns(
    fields: Sequence[_Field], cols: Mapping[str, Any], n: int, what: str, now: float
) -> list[dict[str, Any]]:
    """Turn a column set (or the columns of a list of rows) into alert records."""
    names: list[str] = []
    converted: list[list[Any]] = []
    for f in fields:
        col = cols.get(f.column)
        if col is None and f.column != f.name:
            col = cols.get(f.name)
        if col is None:
            vals: list[Any] = [None] * n
        else:
            if len(col) != n:
                msg = f"{what} column {f.column!r} has {len(col)} values but the others have {n}; give equal lengths"
                raise InputError(msg)
            vals = _convert_column(col, f.kind)
        if not f.nullable:
            missing = [i for i, v in enumerate(vals) if v is None]
            if missing:
                if f.name not in REQUIRED_DEFAULTS:
                    msg = (
                        f"{what} row {missing[0]} has no value for the required alert field {f.name!r} "
                        f"(APDB column {f.column!r}); fill it (it is NOT NULL in the APDB) before making alerts"
                    )
                    raise InputError(msg)
                default = REQUIRED_DEFAULTS[f.name]
                default = now if default is None else default
                if f.kind == "timestamp":
                    default = _cast_scalar(default, "timestamp")
                for i in missing:
                    vals[i] = default
        names.append(f.name)
        converted.append(vals)
    return [dict(zip(names, row, strict=True)) for row in zip(*converted, strict=True)] if names else [{}] * n


def _rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    out = {}
    for k in keys:
        col = np.empty(len(rows), dtype=object)
        col[:] = [r.get(k) for r in rows]
        out[k] = col
    return out


def _convert_rows(
    plan: _Plan, short: str, rows: Sequence[Mapping[str, Any]], now: float
) -> list[dict[str, Any]]:
    if not rows:
        return []
    return _records_from_columns(plan.records[short], _rows_to_columns(rows), len(rows), short, now)


def _assemble(
    plan: _Plan,
    alert_id: int,
    source: dict[str, Any],
    prv_sources: list[dict[str, Any]],
    prv_forced: list[dict[str, Any]],
    dia_object: dict[str, Any] | None,
    cutouts: Mapping[str, bytes | None],
) -> dict[str, Any]:
    alert: dict[str, Any] = {}
    for name, nullable in plan.top_fields:
        if name == plan.id_field:
            alert[name] = int(alert_id)
        elif name == "diaSource":
            alert[name] = source
        elif name == "prvDiaSources":
            alert[name] = prv_sources or None
        elif name == "prvDiaForcedSources":
            alert[name] = prv_forced
        elif name == "diaObject":
            alert[name] = dia_object
        elif name.startswith("cutout"):
            alert[name] = cutouts.get(name)
        elif nullable:
            alert[name] = None
        else:  # pragma: no cover - no installed schema has another required top-level field
            msg = f"alert schema field {name!r} is required but apfast has no data for it; use schema 9.0 or later"
            raise InputError(msg)
    return alert


_CUTOUT_KEYS = ("cutoutDifference", "cutoutScience", "cutoutTemplate")


def make_alert(
    alert_id: int,
    dia_source: Mapping[str, Any],
    prv_dia_sources: Sequence[Mapping[str, Any]],
    prv_dia_forced_sources: Sequence[Mapping[str, Any]],
    dia_object: Mapping[str, Any] | None,
    cutouts: Mapping[str, bytes | None],
    *,
    schema_version: str | None = None,
) -> dict[str, Any]:
    """Build one alert record from APDB rows (see the module docstring for the field rules).

    Parameters
    ----------
    alert_id : int
        The alert's id; apfast uses the diaSourceId (Rubin does the same).
    dia_source : mapping
        The triggering DiaSource row, keyed by APDB 10.0.0 column names.
    prv_dia_sources : sequence of mapping
        Earlier DiaSource rows of the same DiaObject (excluding ``dia_source``).
    prv_dia_forced_sources : sequence of mapping
        DiaForcedSource rows of the DiaObject.
    dia_object : mapping or None
        The (new version of the) DiaObject row, or ``None`` if there is none.
    cutouts : mapping of str to bytes or None
        FITS bytes keyed ``cutoutDifference``, ``cutoutScience``, ``cutoutTemplate``
        (from :func:`cutout_fits_bytes`); missing keys become ``None``.
    schema_version : str, optional
        Alert schema version (default: latest installed).

    Returns
    -------
    dict
        A record of the alert schema (validates with ``fastavro.validate``).

    Raises
    ------
    InputError
        If a required field (e.g. ``ra``) has no value, or an unknown cutout key is given.

    Examples
    --------
    >>> src = {"diaSourceId": 5, "visit": 1, "detector": 2, "midpointMjdTai": 60000.0,
    ...        "ra": 10.0, "dec": -5.0, "x": 1.0, "y": 2.0, "psfFlux": np.float32(12.5)}
    >>> a = make_alert(5, src, [], [], None, {})
    >>> a["diaSource"]["psfFlux"], a["diaSource"]["apFlux"], a["prvDiaSources"], a["diaObject"]
    (12.5, None, None, None)
    """
    unknown = set(cutouts) - set(_CUTOUT_KEYS)
    if unknown:
        msg = f"unknown cutout key(s) {sorted(unknown)}; use {list(_CUTOUT_KEYS)}"
        raise InputError(msg)
    plan = _plan(schema_version)
    now = _now_mjd_tai()
    source = _convert_rows(plan, "diaSource", [dia_source], now)[0]
    prv = _convert_rows(plan, "diaSource", list(prv_dia_sources), now)
    forced = _convert_rows(plan, "diaForcedSource", list(prv_dia_forced_sources), now)
    obj = None if dia_object is None else _convert_rows(plan, "diaObject", [dia_object], now)[0]
    return _assemble(plan, alert_id, source, prv, forced, obj, cutouts)


# --------------------------------------------------------------------------- per CCD-visit
def _n_rows(cols: Mapping[str, Any] | None) -> int:
    if not cols:
        return 0
    return len(next(iter(cols.values())))


def _int_ids(col: Any) -> np.ndarray:
    """diaObjectId-like column -> int64 with -1 for NULL."""
    arr = np.asarray(col)
    if arr.dtype.kind == "O":
        return np.array([-1 if _is_null(v) else int(v) for v in arr.tolist()], dtype=np.int64)
    if arr.dtype.kind == "f":
        return np.where(np.isnan(arr), -1, arr).astype(np.int64)
    return arr.astype(np.int64)


def _group(ids: np.ndarray, order_key: np.ndarray | None) -> dict[int, np.ndarray]:
    """Row indices per id (ids < 0 skipped), each group sorted by ``order_key``."""
    if len(ids) == 0:
        return {}
    if order_key is None:
        order = np.argsort(ids, kind="stable")
    else:
        order = np.lexsort((order_key, ids))
    sid = ids[order]
    starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
    ends = np.r_[starts[1:], len(sid)]
    return {int(sid[s]): order[s:e] for s, e in zip(starts, ends, strict=True) if sid[s] >= 0}


def _latest_object_records(
    plan: _Plan, objects: Mapping[str, np.ndarray] | None, now: float
) -> dict[int, dict[str, Any]]:
    """DiaObject records by id; of several versions of an id, the one with the latest validity start."""
    obj_rows: dict[int, dict[str, Any]] = {}
    n_obj = _n_rows(objects)
    if n_obj and objects is not None:
        recs = _records_from_columns(plan.records["diaObject"], objects, n_obj, "DiaObject", now)
        version_oids = _int_ids(objects["diaObjectId"])
        start = np.asarray(objects.get("validityStartMjdTai", np.zeros(n_obj)), float)
        for j in np.lexsort((start, version_oids)):  # the latest version wins
            obj_rows[int(version_oids[j])] = recs[j]
    return obj_rows


def _history_records(
    plan: _Plan, cols: Mapping[str, np.ndarray] | None, short: str, what: str, now: float
) -> tuple[list, dict, np.ndarray]:
    """History records, their row indices by diaObjectId (time-sorted) and their own diaSourceIds."""
    m = _n_rows(cols)
    if not m or cols is None:
        return [], {}, np.zeros(0, np.int64)
    if "diaObjectId" not in cols:
        msg = f"{what} column set has no 'diaObjectId' column; give the APDB columns"
        raise InputError(msg)
    recs = _records_from_columns(plan.records[short], cols, m, what, now)
    t = np.asarray(cols["midpointMjdTai"], float) if "midpointMjdTai" in cols else None
    own = _int_ids(cols["diaSourceId"]) if "diaSourceId" in cols else np.full(m, -2, np.int64)
    return recs, _group(_int_ids(cols["diaObjectId"]), t), own


def _ccd_cutouts(
    sources: Mapping[str, np.ndarray],
    n: int,
    images: Mapping[str, Any],
    difference: Any,
    cutout_size: int,
    cutout_mask: bool,
) -> dict[str, list[bytes | None]]:
    """The cutouts of every source by alert field; InputError when an image is off the difference's grid."""
    xs = np.asarray(sources["x"], float)
    ys = np.asarray(sources["y"], float)
    cut: dict[str, list[bytes | None]] = {}
    for key, exp in images.items():
        if exp is None:
            cut[key] = [None] * n
            continue
        if exp.shape != difference.shape or tuple(exp.xy0) != tuple(difference.xy0):
            msg = (
                f"{key} image is {exp.shape} at xy0 {exp.xy0} but the difference is {difference.shape} at "
                f"{difference.xy0}; give images on the difference image's pixel grid (warp the template first)"
            )
            raise InputError(msg)
        cut[key] = cutouts_at(exp, xs, ys, cutout_size, variance=True, mask=cutout_mask)
    return cut


def build_ccd_alerts(
    sources: Mapping[str, np.ndarray],
    objects: Mapping[str, np.ndarray] | None,
    history_sources: Mapping[str, np.ndarray] | None,
    history_forced: Mapping[str, np.ndarray] | None,
    *,
    difference: Any,
    science: Any = None,
    template: Any = None,
    cutout_size: int = 30,
    cutout_mask: bool = False,
    schema_version: str | None = None,
) -> list[dict[str, Any]]:
    """Build the alerts of one CCD-visit: one per DiaSource, grouped by ``diaObjectId``.

    Parameters
    ----------
    sources : dict of str to ndarray
        This CCD-visit's DiaSources as an APDB column set (``diaSourceId``, ``diaObjectId``,
        ``x``, ``y``, ``ra``, ``dec`` ... equal-length 1-D arrays). NULL: NaN in float
        columns, ``None`` in object columns (integer columns may be float with NaN).
    objects : dict of str to ndarray or None
        DiaObject rows (the new versions); if an id occurs more than once the row with the
        largest ``validityStartMjdTai`` is used. A source whose object is absent (or whose
        ``diaObjectId`` is NULL) gets ``diaObject = None``.
    history_sources : dict of str to ndarray or None
        Earlier DiaSources of those objects; rows with the alert's own ``diaSourceId``
        are skipped. Sorted by ``midpointMjdTai`` in each alert.
    history_forced : dict of str to ndarray or None
        DiaForcedSources of those objects, sorted by ``midpointMjdTai`` in each alert.
    difference, science, template : apfast.exposure.Exposure
        The difference image the sources were measured on, the calexp and the matched
        template, all on the same pixel grid (apfast warps the template to the science
        frame); ``None`` for science/template gives no such cutout. Cutouts are centred
        on the source ``x``, ``y``.
    cutout_size : int
        Cutout side in pixels.
    cutout_mask : bool
        Add the MASK HDU to the cutouts.
    schema_version : str, optional
        Alert schema version (default: latest installed).

    Returns
    -------
    list of dict
        Alert records in the order of ``sources``; ``alertId = diaSourceId``.

    Raises
    ------
    InputError
        If a column set has unequal column lengths, lacks a required column, or the
        images are not on the same pixel grid.

    Examples
    --------
    >>> from apfast.exposure import Exposure
    >>> src = {"diaSourceId": np.array([7]), "diaObjectId": np.array([7]), "visit": np.array([1]),
    ...        "detector": np.array([2]), "midpointMjdTai": np.array([6e4]), "ra": np.array([0.0]),
    ...        "dec": np.array([0.0]), "x": np.array([3.0]), "y": np.array([4.0])}
    >>> alerts = build_ccd_alerts(src, None, None, None, difference=Exposure(np.zeros((9, 9))))
    >>> alerts[0]["diaSourceId"], alerts[0]["cutoutDifference"][:6]
    (7, b'SIMPLE')
    """
    plan = _plan(schema_version)
    now = _now_mjd_tai()
    n = _n_rows(sources)
    if n == 0:
        return []
    for col in ("diaSourceId", "x", "y"):
        if col not in sources:
            msg = f"DiaSource column set has no {col!r} column; give the APDB DiaSource columns"
            raise InputError(msg)
    records = _records_from_columns(plan.records["diaSource"], sources, n, "DiaSource", now)
    src_ids = _int_ids(sources["diaSourceId"])
    obj_ids = _int_ids(sources["diaObjectId"]) if "diaObjectId" in sources else np.full(n, -1, np.int64)
    obj_rows = _latest_object_records(plan, objects, now)
    hist_recs, hist_groups, hist_src_ids = _history_records(
        plan, history_sources, "diaSource", "DiaSource history", now
    )
    forced_recs, forced_groups, _ = _history_records(
        plan, history_forced, "diaForcedSource", "DiaForcedSource history", now
    )
    images = {"cutoutDifference": difference, "cutoutScience": science, "cutoutTemplate": template}
    cut = _ccd_cutouts(sources, n, images, difference, cutout_size, cutout_mask)

    alerts = []
    n_orphan = 0
    for i in range(n):
        oid = int(obj_ids[i])
        rows = hist_groups.get(oid)
        prv = [hist_recs[j] for j in rows if hist_src_ids[j] != src_ids[i]] if rows is not None else []
        frows = forced_groups.get(oid)
        forced = [forced_recs[j] for j in frows] if frows is not None else []
        obj = obj_rows.get(oid)
        if obj is None:
            n_orphan += 1
        alerts.append(
            _assemble(plan, int(src_ids[i]), records[i], prv, forced, obj, {k: v[i] for k, v in cut.items()})
        )
    if n_orphan:
        log.warning(
            "%d of %d DiaSources have no DiaObject row: their alerts carry diaObject=None", n_orphan, n
        )
    return alerts
