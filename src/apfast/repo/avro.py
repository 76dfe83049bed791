"""Rubin's Avro alert schemas and alert container files: the ``Avro`` storage of the repository.

The schemas come from the ``lsst-alert-packet`` package (:func:`load_alert_schema`), the files are
written and read with ``fastavro`` (:func:`write_alerts`, :func:`read_alerts`). The Butler stores
and reads ``alerts`` datasets through these functions; :mod:`apfast.dia.alerts` builds the
records and re-exports them. Imports only the core.

Examples
--------
>>> load_alert_schema("10.0")["name"]
'lsst.v10_0.alert'
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from apfast._fileio import atomic_path
from apfast.errors import ApfastError, InputError

__all__ = [
    "MissingDependencyError",
    "available_schema_versions",
    "load_alert_schema",
    "read_alerts",
    "write_alerts",
]


class MissingDependencyError(ApfastError, ImportError):
    """An optional package that this feature needs is not installed."""


# --------------------------------------------------------------------------- schema
def _schema_root() -> Path:
    try:
        spec = importlib.util.find_spec("lsst.alert.packet")
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        msg = (
            "Rubin's alert schemas come from the lsst-alert-packet package, which is not installed; "
            "run 'pip install lsst-alert-packet' (it also installs fastavro)"
        )
        raise MissingDependencyError(msg)
    return Path(next(iter(spec.submodule_search_locations))) / "schema"


def available_schema_versions() -> tuple[str, ...]:
    """Return the alert schema versions installed with lsst-alert-packet, oldest first.

    Returns
    -------
    tuple of str
        ``"major.minor"`` strings, e.g. ``('3.0', ..., '11.1')``.

    Raises
    ------
    MissingDependencyError
        If lsst-alert-packet is not installed.
    """
    root = _schema_root()
    found = []
    for path in root.glob("*/*/lsst.v*_*.alert.avsc"):
        found.append((int(path.parent.parent.name), int(path.parent.name)))
    return tuple(f"{a}.{b}" for a, b in sorted(found))


def _latest_version() -> str:
    text = (_schema_root() / "latest.txt").read_text().strip()
    return text


@lru_cache(maxsize=8)
def _load_schema_cached(version: str) -> dict[str, Any]:
    import fastavro.schema

    major, minor = version.split(".")
    path = _schema_root() / major / minor / f"lsst.v{major}_{minor}.alert.avsc"
    schema = fastavro.schema.load_schema(str(path))
    assert isinstance(schema, dict)  # an alert schema is a record
    return schema


def load_alert_schema(version: str | None = None) -> dict[str, Any]:
    """Load Rubin's Avro alert schema (parsed by fastavro, cached per version).

    Parameters
    ----------
    version : str, optional
        ``"major.minor"`` such as ``"11.1"``; ``None`` loads the latest installed
        (``lsst/alert/packet/schema/latest.txt``).

    Returns
    -------
    dict
        The parsed schema, ready for ``fastavro.writer`` and ``fastavro.validate``;
        do not modify it (it is shared).

    Raises
    ------
    MissingDependencyError
        If lsst-alert-packet (or fastavro) is not installed.
    InputError
        If ``version`` is not one of the installed schema versions.

    Examples
    --------
    >>> load_alert_schema("10.0")["name"]
    'lsst.v10_0.alert'
    """
    try:
        import fastavro  # noqa: F401
    except ModuleNotFoundError as exc:
        msg = "writing alerts needs fastavro; run 'pip install lsst-alert-packet fastavro'"
        raise MissingDependencyError(msg) from exc
    if version is None:
        version = _latest_version()
    version = str(version).strip()
    if version not in available_schema_versions():
        msg = (
            f"alert schema version {version!r} is not installed; use one of {available_schema_versions()} "
            f"(or None for the latest), or upgrade lsst-alert-packet"
        )
        raise InputError(msg)
    return _load_schema_cached(version)


# --------------------------------------------------------------------------- files
def write_alerts(
    path: str | Path,
    alerts: Sequence[Mapping[str, Any]],
    *,
    schema_version: str | None = None,
    codec: Literal["null", "deflate"] = "null",
) -> Path:
    """Write alerts into one Avro container file, atomically (temporary name + ``os.replace``).

    Parameters
    ----------
    path : str or Path
        Output file, e.g. ``<repo>/alerts/<visit>_<ccdnum>.avro``; parent folders are created.
    alerts : sequence of dict
        Records from :func:`make_alert` / :func:`build_ccd_alerts` (may be empty).
    schema_version : str, optional
        The schema the records follow (default: latest installed); it is stored in the file.
    codec : {"null", "deflate"}
        Block compression. Measured on 200 alerts with real DECam cutouts (10.4 MB):
        ``null`` 25 ms; ``deflate`` 4.2 MB (2.5x smaller) but 245-300 ms, which alone
        would exceed the 0.3 s per-CCD alert budget, hence the ``null`` default.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        If a record does not follow the schema (the message names the alert).
    """
    import fastavro

    path = Path(path)
    schema = load_alert_schema(schema_version)
    try:
        with atomic_path(path, reserve=False) as tmp, open(tmp, "wb") as fh:
            fastavro.writer(fh, schema, list(alerts), codec=codec, validator=False)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        bad = next((i for i, a in enumerate(alerts) if not _is_valid(a, schema)), None)
        msg = (
            f"cannot write alerts to {path}: alert #{bad} does not follow schema {schema['name']} ({exc}); "
            f"build records with apfast.dia.alerts.make_alert"
        )
        raise InputError(msg) from exc
    return path


def _is_valid(record: Mapping[str, Any], schema: dict[str, Any]) -> bool:
    import fastavro.validation

    return bool(fastavro.validation.validate(record, schema, raise_errors=False))


def read_alerts(path: str | Path) -> list[dict[str, Any]]:
    """Read all alert records of an Avro file written by :func:`write_alerts`.

    Parameters
    ----------
    path : str or Path
        The ``.avro`` file (its own schema is used to decode it).

    Returns
    -------
    list of dict

    Raises
    ------
    InputError
        If the file does not exist or is not an Avro container file.
    """
    import fastavro

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            records: list[Any] = list(fastavro.reader(fh))  # alert files hold records (dicts)
            return records
    except FileNotFoundError as exc:
        msg = f"alert file {path} does not exist; check the path (alerts/<visit>_<ccdnum>.avro in the output repo)"
        raise InputError(msg) from exc
    except ValueError as exc:
        msg = f"{path} is not an Avro alert file ({exc}); give a file written by apfast.dia.alerts.write_alerts"
        raise InputError(msg) from exc
