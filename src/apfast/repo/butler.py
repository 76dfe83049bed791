"""The Butler: get and put datasets by type and dataId (Gen 2 semantics).

``Butler('repo/rerun/processed').get('calexp', visit=289401, ccdnum=35)`` finds
``0289401/calexp/calexp-0289401_35.fits`` in the first repository of the chain
that has it (the rerun, then its parents) and reads it as an
:class:`apfast.exposure.Exposure`. ``put`` writes into the first repository of
the chain. Each dataset type has a path template, a storage class and the kind
of repository it lives in:

- ``"output"``: the repository chain (processing outputs);
- ``"template"``: the ``template=`` repository if given, else the chain;
- ``"calib"``: the calibration registry (``<root>/calibs`` by default); the
  date and filter come from the raw registry row of ``(visit, ccdnum)``;
- ``"raw"``: the raw registry (``registry.sqlite3`` of the root repository).

Storage classes: ``Exposure``, ``SourceCatalog`` (astropy Table <-> FITS binary
table, metadata kept), ``Background``, ``PsfMatch`` (the PSF-matching record of a
difference, :class:`apfast.psfmatch_diag.PsfMatchDiagnostics`; file layout in
:mod:`apfast.psfmatch_diag`), ``Json``, ``Text``, ``Raw`` and ``Calib``.
Later stages add dataset types with :func:`register_dataset_type` and storage
classes with :func:`register_storage`.

dataId values reach paths only through the templates: integer keys are
formatted as integers, and string values containing path separators, ``..``,
NUL or a leading ``.`` are rejected.

Examples
--------
>>> import tempfile, numpy as np
>>> from apfast.exposure import Exposure
>>> repo = Path(tempfile.mkdtemp())
>>> b = Butler(repo)
>>> _ = b.put(Exposure(np.ones((3, 4))), "calexp", visit=5, ccdnum=7)
>>> Path(b.getUri("calexp", visit=5, ccdnum=7)).relative_to(b.repo.path).as_posix()
'0000005/calexp/calexp-0000005_07.fits'
>>> b.get("calexp", dict(visit=5, ccdnum=7)).shape
(3, 4)
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import re
import string
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.utils.exceptions import AstropyUserWarning

from apfast._fileio import atomic_path
from apfast.errors import ApfastError, DataIdError, InputError, NoLocationsError
from apfast.exposure import (
    Background,
    Exposure,
    VisitInfo,
    exposure_hdulist,
    read_background,
    read_exposure,
    wcs_from_header,
    write_background,
    write_hdulist,
)
from apfast.psfmatch_diag import PsfMatchDiagnostics, read_psfmatch_diagnostics, write_psfmatch_diagnostics
from apfast.repo.repository import CONFIG_RELPATH, REGISTRY_NAME, Repository

if TYPE_CHECKING:
    from apfast.repo.writer import OutputConfig

__all__ = [
    "DATASET_TYPES",
    "STORAGES",
    "Butler",
    "DatasetType",
    "Storage",
    "read_catalog",
    "read_raw",
    "register_dataset_type",
    "register_storage",
    "write_catalog",
]

log = logging.getLogger(__name__)

RepoKind = Literal["output", "template", "calib", "raw"]
_REPO_KINDS = ("output", "template", "calib", "raw")
#: dataId keys always formatted as integers, whatever the template's format spec.
INT_KEYS = frozenset({"visit", "ccdnum", "ccd", "tract", "expnum"})
_INT_SPEC = re.compile(r".*[bdoxXn]$")
_INT_TEXT = re.compile(r"^[+-]?[0-9]+$")
#: Longest file or folder name (bytes) most file systems accept.
_MAX_NAME_BYTES = 255


# --------------------------------------------------------------------------- source catalogues
_FITS_KEY = re.compile(r"^[A-Z0-9_-]{1,8}$")
_META_JSON_KEY = "APMETA"


def _header_safe(key: Any, value: Any) -> bool:
    if not isinstance(key, str) or not _FITS_KEY.match(key) or key in {"COMMENT", "HISTORY", _META_JSON_KEY}:
        return False
    if isinstance(value, bool | int | np.integer):
        return True
    if isinstance(value, float | np.floating):
        return math.isfinite(value)
    return isinstance(value, str) and value.isascii() and value.isprintable()


def write_catalog(table: Table, path: str | Path) -> Path:
    """Write an astropy Table as a FITS binary table (extension ``SOURCES``), atomically.

    Scalar metadata with FITS-compatible upper-case keys becomes header cards;
    every other metadata entry (lists, dicts, lower-case keys) is stored as JSON
    in the ``APMETA`` long-string card, so ``read_catalog`` returns the same
    ``meta``. Column units and dtypes are kept.

    Raises
    ------
    InputError
        If ``table`` is not a Table or a metadata value is not JSON-serialisable.
    """
    if not isinstance(table, Table):
        msg = f"a SourceCatalog must be an astropy.table.Table, got {type(table).__name__}"
        raise InputError(msg)
    path = Path(path)
    plain = {k: v for k, v in table.meta.items() if _header_safe(k, v)}
    extra = {k: v for k, v in table.meta.items() if k not in plain}
    out = table.copy(copy_data=False)
    out.meta.clear()
    hdu = fits.table_to_hdu(out)
    hdu.name = "SOURCES"
    for k, v in plain.items():
        hdu.header[k] = v.item() if isinstance(v, np.generic) else v
    if extra:
        try:
            hdu.header[_META_JSON_KEY] = json.dumps(extra, sort_keys=True)
        except TypeError as exc:
            msg = (
                f"catalogue metadata for {path} cannot be stored: {exc}; keep meta values to "
                f"str/numbers/lists/dicts"
            )
            raise InputError(msg) from None
    hdu.header["APFTYPE"] = "SOURCECAT"
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp)
    return path


def read_catalog(path: str | Path) -> Table:
    """Read a FITS binary table written by :func:`write_catalog` (or any FITS table in HDU 1)."""
    path = Path(path)
    try:
        table = Table.read(path, hdu=1, format="fits")
    except (OSError, ValueError, IndexError) as exc:
        msg = f"cannot read a source catalogue from {path}: {exc}"
        raise InputError(msg) from None
    for name in table.colnames:  # FITS is big-endian; numba kernels need native byte order
        col = table[name]
        if col.dtype.byteorder not in ("=", "|") and not col.dtype.isnative:
            table.replace_column(name, col.astype(col.dtype.newbyteorder("=")))
    meta = {k: v for k, v in table.meta.items() if k not in {"EXTNAME", "APFTYPE", _META_JSON_KEY}}
    if _META_JSON_KEY in table.meta:
        meta.update(json.loads(table.meta[_META_JSON_KEY]))
    table.meta.clear()
    table.meta.update(meta)
    return table


# --------------------------------------------------------------------------- raw
def read_raw(
    path: str | Path, hdu: int, row: Mapping[str, Any] | None = None, *, camera: str | None = None
) -> Exposure:
    """Read one raw CCD extension as an :class:`Exposure` (float32, untrimmed).

    ``metadata`` is the primary header merged with the extension header (the
    extension wins); ``wcs`` is the raw-grid WCS of the extension if it has one;
    ``visit_info`` comes from the registry ``row`` when given.
    """
    path = Path(path)
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        msg = f"cannot open raw file {path}: {exc}; re-ingest it or restore the file"
        raise InputError(msg) from None
    with hdul:
        try:
            with warnings.catch_warnings():
                # astropy warns "File may have been truncated" before failing: that is corruption
                warnings.simplefilter("error", AstropyUserWarning)
                n_hdus = len(hdul)
                pixels = hdul[hdu].data if hdu < n_hdus else None
                if pixels is not None:
                    image = np.ascontiguousarray(pixels, dtype=np.float32)
        except (OSError, ValueError, TypeError, IndexError, EOFError, AstropyUserWarning) as exc:
            # a truncated or corrupt file fails here, when astropy first reads (or decompresses) the pixels
            msg = (
                f"raw file {path} HDU {hdu} is truncated or corrupt ({type(exc).__name__}: {exc}); restore the "
                f"file and re-ingest it"
            )
            raise InputError(msg) from None
        if pixels is None:
            msg = (
                f"raw file {path} has no image in HDU {hdu} ({n_hdus} HDUs); the registry is out of date, "
                f"re-ingest"
            )
            raise InputError(msg)
        ext = hdul[hdu]
        meta = fits.Header()
        for card in list(hdul[0].header.cards) + list(ext.header.cards):
            if card.keyword in {
                "SIMPLE",
                "BITPIX",
                "NAXIS",
                "NAXIS1",
                "NAXIS2",
                "EXTEND",
                "XTENSION",
                "PCOUNT",
                "GCOUNT",
                "BZERO",
                "BSCALE",
                "CHECKSUM",
                "DATASUM",
                "",
            }:
                continue
            if card.keyword in {"COMMENT", "HISTORY"}:
                meta.append(card)
            else:
                meta[card.keyword] = (card.value, card.comment)
        try:
            wcs = wcs_from_header(ext.header)
        except (ValueError, KeyError) as exc:
            log.warning("raw %s[%d]: header WCS unreadable (%s); continuing without WCS", path, hdu, exc)
            wcs = None
    vi = None
    if row is not None:
        vi = VisitInfo(
            visit=row.get("visit"),
            ccdnum=row.get("ccdnum"),
            detector=row.get("detector"),
            filter=row.get("filter"),
            mjd=row.get("mjd"),
            date_obs=row.get("taiObs"),
            exptime=row.get("expTime"),
            airmass=row.get("airmass"),
            ra=row.get("ra"),
            dec=row.get("dec"),
            object=row.get("object"),
            camera=camera,
        )
    return Exposure(image, wcs=wcs, visit_info=vi, metadata=meta)


# --------------------------------------------------------------------------- storages and dataset types
@dataclass(frozen=True, slots=True)
class Storage:
    """How a storage class is read from and written to a file (``write`` may be ``None``)."""

    name: str
    read: Callable[[Path], Any]
    write: Callable[[Any, Path], Any] | None
    python_type: type | tuple[type, ...] | None = None


def _write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    msg = f"object of type {type(obj).__name__} is not JSON serialisable"
    raise TypeError(msg)


def _write_text(obj: Any, path: Path) -> None:
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        tmp.write_text(str(obj), encoding="utf-8")


STORAGES: dict[str, Storage] = {}


def register_storage(
    name: str,
    read: Callable[[Path], Any],
    write: Callable[[Any, Path], Any] | None,
    *,
    python_type: type | tuple[type, ...] | None = None,
) -> None:
    """Add or replace a storage class (``read(path) -> obj``, ``write(obj, path)``)."""
    STORAGES[name] = Storage(name, read, write, python_type)


register_storage("Exposure", read_exposure, None, python_type=Exposure)  # write needs config_sha: see put
register_storage("SourceCatalog", read_catalog, lambda obj, p: write_catalog(obj, p), python_type=Table)
register_storage(
    "Background", read_background, lambda obj, p: write_background(p, obj), python_type=Background
)
register_storage(
    "PsfMatch", read_psfmatch_diagnostics, lambda obj, p: write_psfmatch_diagnostics(p, obj),
    python_type=PsfMatchDiagnostics,
)
register_storage("Json", lambda p: json.loads(Path(p).read_text(encoding="utf-8")), _write_json)
register_storage("Text", lambda p: Path(p).read_text(encoding="utf-8"), _write_text, python_type=str)
register_storage("Raw", lambda p: read_raw(p, 0), None)


def _read_avro(path: Path) -> Any:
    from apfast.repo.avro import read_alerts

    return read_alerts(path)


def _write_avro(obj: Any, path: Path) -> None:
    from apfast.repo.avro import write_alerts

    write_alerts(path, obj, codec=getattr(obj, "codec", "null"))


register_storage("Avro", _read_avro, _write_avro, python_type=list)
register_storage("Calib", lambda p: None, None)


@dataclass(frozen=True, slots=True)
class DatasetType:
    """A dataset type: path ``template`` (or calib type name), ``storage`` class and repository kind.

    ``filtered`` marks calib types looked up per filter (flats).
    """

    name: str
    template: str
    storage: str
    repo: RepoKind = "output"
    filtered: bool = False

    def fields(self) -> list[tuple[str, str]]:
        """``(key, format_spec)`` of the template's replacement fields."""
        if self.repo in ("calib", "raw"):
            return []
        return [(f, spec or "") for _, f, spec, _ in string.Formatter().parse(self.template) if f is not None]


DATASET_TYPES: dict[str, DatasetType] = {}


def register_dataset_type(
    name: str,
    template: str,
    storage: str,
    *,
    repo: RepoKind = "output",
    filtered: bool = False,
    replace: bool = False,
) -> DatasetType:
    """Register a dataset type so every Butler can get/put it.

    Parameters
    ----------
    name : str
        Dataset type name, e.g. ``'deepDiff_diaSrc'``.
    template : str
        Path template relative to the repository, with ``str.format`` fields
        named after dataId keys (``'{visit:07d}/calexp/calexp-{visit:07d}_{ccdnum:02d}.fits'``);
        for ``repo='calib'`` the calib type name of the calib registry.
    storage : str
        A key of :data:`STORAGES`.
    repo : {'output', 'template', 'calib', 'raw'}
        Where the dataset lives.
    filtered : bool
        For calib types: look up by the visit's filter too.
    replace : bool
        Allow redefining an existing type differently.

    Raises
    ------
    InputError
        On an unknown storage or repo kind, a bad template, or a conflicting
        redefinition without ``replace=True``.
    """
    if storage not in STORAGES:
        msg = (
            f"dataset type {name!r}: unknown storage {storage!r}; known: {sorted(STORAGES)} (add one with "
            f"register_storage)"
        )
        raise InputError(msg)
    if repo not in _REPO_KINDS:
        msg = f"dataset type {name!r}: repo must be one of {_REPO_KINDS}, got {repo!r}"
        raise InputError(msg)
    dt = DatasetType(name, template, storage, repo, filtered)
    try:
        for key, _ in dt.fields():
            if not key.isidentifier():
                msg = f"dataset type {name!r}: template field {{{key}}} must be a plain dataId key"
                raise InputError(msg)
    except ValueError as exc:
        msg = f"dataset type {name!r}: template {template!r} is not a valid format string ({exc})"
        raise InputError(msg) from None
    old = DATASET_TYPES.get(name)
    if old is not None and old != dt and not replace:
        msg = f"dataset type {name!r} is already registered as {old}; pass replace=True to redefine it"
        raise InputError(msg)
    DATASET_TYPES[name] = dt
    return dt


_VC = "{visit:07d}_{ccdnum:02d}"
for _name, _tmpl, _storage in (
    ("postISRCCD", "{visit:07d}/postISRCCD/postISRCCD-" + _VC + ".fits", "Exposure"),
    ("icExp", "{visit:07d}/icExp/icExp-" + _VC + ".fits", "Exposure"),
    ("icExpBackground", "{visit:07d}/icExp/icExpBackground-" + _VC + ".fits", "Background"),
    ("icSrc", "{visit:07d}/icSrc/icSrc-" + _VC + ".fits", "SourceCatalog"),
    ("calexp", "{visit:07d}/calexp/calexp-" + _VC + ".fits", "Exposure"),
    ("calexpBackground", "{visit:07d}/calexp/bkgd-" + _VC + ".fits", "Background"),
    ("src", "{visit:07d}/src/src-" + _VC + ".fits", "SourceCatalog"),
    ("srcMatch", "{visit:07d}/srcMatch/srcMatch-" + _VC + ".fits", "SourceCatalog"),
    ("deepDiff_differenceExp", "deepDiff/v{visit}/diffexp-{ccdnum:02d}.fits", "Exposure"),
    ("deepDiff_matchedExp", "deepDiff/v{visit}/matchexp-{ccdnum:02d}.fits", "Exposure"),
    ("deepDiff_diaSrc", "deepDiff/v{visit}/diaSrc-{ccdnum:02d}.fits", "SourceCatalog"),
    ("deepDiff_diaSrcRejected", "deepDiff/v{visit}/diaSrcRejected-{ccdnum:02d}.fits", "SourceCatalog"),
    ("deepDiff_kernelSrc", "deepDiff/v{visit}/kernelSrc-{ccdnum:02d}.fits", "SourceCatalog"),
    ("deepDiff_psfMatch", "deepDiff/v{visit}/psfMatch-{ccdnum:02d}.fits", "PsfMatch"),
    ("apdb_marker", "apdb_marker/" + _VC + ".json", "Json"),
    ("alerts", "alerts/{visit}_{ccdnum}.avro", "Avro"),
    ("config", CONFIG_RELPATH.as_posix(), "Text"),
):
    register_dataset_type(_name, _tmpl, _storage)
# fakes of apfast.ccd.inject: one FITS table per CCD-visit (columns: apfast.ccd.inject.CATALOG_COLUMNS)
register_dataset_type("injected_catalog", "deepDiff/v{visit}/injected-{ccdnum:02d}.fits", "SourceCatalog")
register_dataset_type("deepCoadd", "deepCoadd/{filter}/{tract}/{patch}.fits", "Exposure", repo="template")
register_dataset_type("deepCoadd_skyMap", "deepCoadd/skyMap.json", "Json", repo="template")
register_dataset_type("raw", "raw", "Raw", repo="raw")
for _calib in ("bias", "defects", "crosstalk", "linearizer"):
    register_dataset_type(_calib, _calib, "Calib", repo="calib")
register_dataset_type("flat", "flat", "Calib", repo="calib", filtered=True)


# --------------------------------------------------------------------------- dataId handling
def _int_value(key: str, value: Any) -> int:
    out: int | None = None
    if (
        (isinstance(value, int | np.integer) and not isinstance(value, bool))
        or (isinstance(value, str) and _INT_TEXT.match(value.strip()))
        or (isinstance(value, float | np.floating) and float(value).is_integer())
    ):
        out = int(value)
    if out is not None and -(2**63) <= out < 2**63:
        return out
    range_note = " (outside the 64-bit range)" if out is not None else ""
    msg = f"dataId key {key!r} must be an integer, got {value!r}{range_note}"
    raise InputError(msg)


def _str_value(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | np.integer | np.str_):
        msg = f"dataId key {key!r} must be a string or integer, got {type(value).__name__} {value!r}"
        raise InputError(msg)
    text = str(value)
    if not text or "/" in text or "\\" in text or ".." in text or "\x00" in text or text.startswith("."):
        msg = (
            f"dataId value {key}={value!r} is not allowed in a path: it is empty or contains a path "
            f"separator, "
            "'..', NUL or a leading '.'; give the plain value (e.g. filter=g)"
        )
        raise InputError(msg)
    return text


def _merge_data_id(data_id: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if data_id is not None and not isinstance(data_id, Mapping):
        msg = f"dataId must be a dict such as dict(visit=1, ccdnum=2), got {type(data_id).__name__}"
        raise InputError(msg)
    did = dict(data_id or {})
    did.update(kwargs)
    if "ccdnum" not in did and "ccd" in did:
        did["ccdnum"] = did["ccd"]
    return did


def _sort_key(v: Any) -> Any:
    items = v if isinstance(v, tuple) else (v,)
    return tuple((e is None, "" if e is None else e) for e in items)


# --------------------------------------------------------------------------- Butler
@dataclass(frozen=True, slots=True)
class _Location:
    found: Path | None
    searched: list[Path]
    hdu: int | None = None
    extra: Any = None
    why: str = ""

    def no_locations(self, name: str, did: Mapping[str, Any]) -> NoLocationsError:
        why = f" ({self.why})" if self.why else ""
        where = ", ".join(str(p) for p in self.searched)
        msg = f"No locations for get: datasetType:{name} dataId:{dict(did)} searched: {where}{why}"
        return NoLocationsError(msg)


class Butler:
    """Read and write datasets of a repository chain by dataset type and dataId.

    Parameters
    ----------
    path : str or Path
        A repository: the root (with ``registry.sqlite3``) or an output
        repository (``ROOT/rerun/NAME`` or an ``--output`` folder).
    calib : str or Path, optional
        Calibration repository; default ``<root>/calibs``.
    template : str or Path, optional
        Template repository searched for ``repo='template'`` dataset types
        (``deepCoadd``); default: the repository chain.
    output : apfast.repo.writer.OutputConfig, optional
        How :meth:`put` writes Exposure datasets of the output repository (FITS tile
        compression); default ``OutputConfig()``. Template-repository exposures
        (``deepCoadd``) are always written uncompressed. :meth:`get` reads every
        compression.
    """

    def __init__(
        self, path: str | Path, *, calib: str | Path | None = None, template: str | Path | None = None,
        output: OutputConfig | None = None,
    ) -> None:
        from apfast.repo.writer import OutputConfig

        self.output = output if output is not None else OutputConfig()
        self.repo = Repository(path)
        self.template = Repository(template) if template is not None else None
        self._calib = Path(calib).expanduser().resolve() if calib is not None else None
        self._registry: Any = None
        self._calib_registry: Any = None

    def __repr__(self) -> str:
        return f"Butler({str(self.repo.path)!r})"

    # ----------------------------------------------------------------- registries
    @property
    def calib_root(self) -> Path:
        """The calibration repository folder."""
        return self._calib if self._calib is not None else self.repo.root / "calibs"

    @property
    def registry(self) -> Any:
        """The raw registry (:class:`apfast.repo.registry.Registry`) of the root repository."""
        if self._registry is None:
            from apfast.repo.registry import Registry

            self._registry = Registry(self.repo.root)
        return self._registry

    def _camera(self) -> Any:
        """Return the root repository's Camera, or ``None`` if it has no camera description."""
        try:
            return self.registry.camera
        except (ImportError, ApfastError):
            return None

    def _raw_rows(self, did: Mapping[str, Any]) -> list[dict[str, Any]]:
        return list(self.registry.find(dict(did)))

    # ----------------------------------------------------------------- lookup
    def _dataset_type(self, name: str) -> DatasetType:
        dt = DATASET_TYPES.get(name)
        if dt is None:
            known = sorted(DATASET_TYPES)
            close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.4)
            ordered = close + [k for k in known if k not in close]
            hint = f"did you mean {close[0]!r}? " if close else ""
            msg = f"unknown dataset type {name!r}; {hint}known dataset types: {', '.join(ordered)}"
            raise InputError(msg)
        return dt

    def _relpath(self, dt: DatasetType, did: dict[str, Any]) -> str:
        fields = dt.fields()
        missing = sorted({k for k, _ in fields if k not in did})
        if missing and "visit" in did and any((p / REGISTRY_NAME).is_file() for p in self.repo.chain):
            did.update(self._fill_from_registry(did, missing))
            missing = sorted({k for k, _ in fields if k not in did})
        if missing:
            msg = (
                f"dataset type {dt.name!r} (template {dt.template!r}) needs dataId key(s) "
                f"{', '.join(missing)}; "
                f"got {did}; add them, e.g. {missing[0]}=..."
            )
            raise DataIdError(msg)
        out = []
        for literal, key, spec, _conv in string.Formatter().parse(dt.template):
            out.append(literal)
            if key is None:
                continue
            value = did[key]
            if key in INT_KEYS or _INT_SPEC.match(spec or ""):
                out.append(format(_int_value(key, value), spec or "d"))
            else:
                out.append(format(_str_value(key, value), spec or ""))
        rel = "".join(out)
        parts = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
            msg = f"dataset type {dt.name!r}: dataId {did} gives the path {rel!r}, which leaves the repository"
            raise InputError(msg)
        longest = max(parts, key=lambda p: len(p.encode("utf-8", "surrogatepass")))
        if len(longest.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
            msg = (
                f"dataset type {dt.name!r}: dataId {did} gives a file or folder name of "
                f"{len(longest.encode('utf-8', 'surrogatepass'))} bytes ({longest[:40]!r}...), longer than the "
                f"{_MAX_NAME_BYTES} bytes a file system allows; use shorter dataId values"
            )
            raise InputError(msg)
        return rel

    def _fill_from_registry(self, did: dict[str, Any], keys: list[str]) -> dict[str, Any]:
        query: dict[str, Any] = {k: did[k] for k in ("visit", "ccdnum") if k in did}
        try:
            rows = self._raw_rows(query)
        except (ImportError, ApfastError):
            return {}
        filled = {}
        for k in keys:
            values = {r.get(k) for r in rows if r.get(k) is not None}
            if len(values) == 1:
                filled[k] = values.pop()
        return filled

    def _locate(self, dt: DatasetType, did: dict[str, Any]) -> _Location:
        """Return ``(found path or None, paths/registries searched, hdu, extra)`` for any repo kind."""
        if dt.repo == "raw":
            reg_path = self.repo.root / REGISTRY_NAME
            rows = self._raw_rows(did)
            if len(rows) > 1:
                keys = sorted(k for k in rows[0] if len({str(r.get(k)) for r in rows}) > 1)
                msg = (
                    f"dataId {did} matches {len(rows)} raw rows; add one of the keys {keys[:6]} to select one"
                )
                raise DataIdError(msg)
            if not rows:
                return _Location(None, [reg_path])
            row = rows[0]
            path = self.repo.root / row["file"]
            return _Location(
                path if path.is_file() else None, [reg_path, path], int(row.get("hdu") or 0), row
            )
        if dt.repo == "calib":
            return self._locate_calib(dt, did)
        rel = self._relpath(dt, did)
        repo = self.template if (dt.repo == "template" and self.template is not None) else self.repo
        cands = repo.candidates(rel)
        return _Location(next((c for c in cands if c.is_file()), None), cands)

    def _locate_calib(self, dt: DatasetType, did: dict[str, Any]) -> _Location:
        reg_file = self.calib_root / "calibRegistry.sqlite3"
        if "ccdnum" not in did:
            msg = f"calib dataset {dt.name!r} needs ccdnum in the dataId, got {did}"
            raise DataIdError(msg)
        date, band = did.get("date"), did.get("filter")
        if date is None or (dt.filtered and band is None):
            if "visit" not in did:
                msg = (
                    f"calib dataset {dt.name!r} needs visit (or date{' and filter' if dt.filtered else ''}) "
                    f"in the dataId, got {did}"
                )
                raise DataIdError(msg)
            rows = self._raw_rows({"visit": did["visit"], "ccdnum": did["ccdnum"]})
            if not rows:
                why = (
                    f"no raw registry row for visit={did['visit']} ccdnum={did['ccdnum']} to take the date "
                    f"from"
                )
                return _Location(None, [self.repo.root / REGISTRY_NAME, reg_file], why=why)
            row = rows[0]
            date = date if date is not None else (row.get("taiObs") or row.get("date"))
            band = band if band is not None else row.get("filter")
        try:
            from apfast.repo.calibs import CalibRegistry

            if self._calib_registry is None:
                self._calib_registry = CalibRegistry(self.calib_root)
            ref = self._calib_registry.lookup(
                dt.template,
                ccdnum=_int_value("ccdnum", did["ccdnum"]),
                date=date,
                filter=band if dt.filtered else None,
            )
        except (ApfastError, LookupError) as exc:
            return _Location(None, [reg_file], why=str(exc))
        return _Location(Path(ref.path), [reg_file, Path(ref.path)], ref.hdu, ref)

    # ----------------------------------------------------------------- public API
    def get(self, datasetType: str, dataId: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """Read a dataset.

        Parameters
        ----------
        datasetType : str
            A registered dataset type (``'calexp'``, ``'raw'``, ``'flat'`` ...).
        dataId : dict, optional
            Keys such as ``visit``, ``ccdnum``, ``filter``; ``kwargs`` are merged in (and win).
        **kwargs
            More dataId keys.

        Returns
        -------
        object
            The object of the type's storage class (Exposure, Table, Background,
            JSON value, str, or the calib reader's object).

        Raises
        ------
        NoLocationsError
            If the dataset does not exist; the message starts ``No locations for get:``
            and lists every path or registry searched.
        InputError
            On an unknown dataset type (with close matches) or an unsafe dataId value.
        DataIdError
            If a key the path template needs is missing.
        """
        dt = self._dataset_type(datasetType)
        did = _merge_data_id(dataId, kwargs)
        loc = self._locate(dt, did)
        found, hdu, extra = loc.found, loc.hdu, loc.extra
        if found is None:
            raise loc.no_locations(dt.name, did)
        log.debug("get %s %s <- %s", dt.name, did, found)
        if dt.repo == "raw":
            camera = self._camera()
            return read_raw(found, hdu or 0, extra, camera=None if camera is None else camera.name)
        if dt.repo == "calib":
            from apfast.repo.calibs import read_calib

            camera = self._camera()
            return read_calib(extra) if camera is None else read_calib(extra, camera=camera)
        return STORAGES[dt.storage].read(found)

    def put(self, obj: Any, datasetType: str, dataId: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
        """Write a dataset into the first repository of the chain (atomically) and return its path.

        Exposures get the stored config's sha256 (``config/apfast.toml.sha256``) as ``CFGSHA``,
        and the FITS tile compression of ``self.output`` (output-repository types only).

        Raises
        ------
        InputError
            For raw/calib dataset types (written by ingest), a read-only storage,
            or an object of the wrong type.
        OutputError
            If the file could not be written (the previous file, if any, is kept).
        """
        path, write = self.prepare_put(obj, datasetType, dataId, **kwargs)
        try:
            write()
        except OSError as exc:  # disk full, quota, permissions: name the dataset and the file
            from apfast.repo.writer import output_error

            raise output_error(f"{datasetType} {_merge_data_id(dataId, kwargs)} -> {path}", exc) from exc
        return path

    def prepare_put(self, obj: Any, datasetType: str, dataId: Mapping[str, Any] | None = None,
                    **kwargs: Any) -> tuple[Path, Callable[[], Path]]:
        """Check a :meth:`put`; return ``(path, write)``.

        Everything that needs the registry or may fail on bad arguments happens
        here, in the caller's thread; ``write()`` only touches the file system, so
        it may run on another thread (:class:`apfast.repo.writer.OutputWriter`).
        ``write()`` only reads the pixel planes of an exposure (it converts them
        to FITS byte order in copies, never in place), so the caller may go on
        *using* the exposure, but must not change its planes until ``write()``
        has run. Exposure metadata and catalogues are copied here.

        Raises
        ------
        InputError
            As :meth:`put`.
        """
        dt = self._dataset_type(datasetType)
        if dt.repo in ("raw", "calib"):
            msg = (
                f"dataset type {dt.name!r} lives in the {dt.repo} registry; add it with apfast ingest, not "
                f"Butler.put"
            )
            raise InputError(msg)
        storage = STORAGES[dt.storage]
        if storage.python_type is not None and not isinstance(obj, storage.python_type):
            msg = f"put {dt.name!r}: expected a {storage.python_type}, got {type(obj).__name__}"
            raise InputError(msg)
        did = _merge_data_id(dataId, kwargs)
        path = self.repo.write_root / self._relpath(dt, did)
        path.parent.mkdir(parents=True, exist_ok=True)
        name = dt.name
        if dt.storage == "Exposure":
            sha_file = self.repo.write_root / CONFIG_RELPATH.with_name(CONFIG_RELPATH.name + ".sha256")
            sha = sha_file.read_text().strip() if sha_file.is_file() else None
            exp = replace(obj, metadata=obj.metadata.copy())  # the planes are shared and only read
            # deepCoadd patches are read in boxes many times: only uncompressed planes are memory-mapped
            comp = self.output.compression if dt.repo == "output" else "none"
            q = self.output.quantize_level

            def write() -> Path:
                write_hdulist(path, exposure_hdulist(exp, config_sha=sha, compression=comp, quantize_level=q))
                log.debug("put %s %s -> %s", name, did, path)
                return path

            return path, write
        if storage.write is None:
            msg = f"storage {storage.name!r} of dataset type {dt.name!r} cannot be written"
            raise InputError(msg)
        data = obj.copy() if isinstance(obj, Table) else obj
        fn = storage.write

        def write_other() -> Path:
            fn(data, path)
            log.debug("put %s %s -> %s", name, did, path)
            return path

        return path, write_other

    def datasetExists(self, datasetType: str, dataId: Mapping[str, Any] | None = None, **kwargs: Any) -> bool:
        """Whether :meth:`get` would find the dataset."""
        dt = self._dataset_type(datasetType)
        did = _merge_data_id(dataId, kwargs)
        return self._locate(dt, did).found is not None

    def getUri(self, datasetType: str, dataId: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
        """Path :meth:`get` would read; if the dataset does not exist yet, the path :meth:`put` would write.

        For raw and calib types this is the file named by the registry (its HDU is not part of the string).
        """
        dt = self._dataset_type(datasetType)
        did = _merge_data_id(dataId, kwargs)
        loc = self._locate(dt, did)
        if loc.found is not None:
            return str(loc.found)
        if dt.repo in ("raw", "calib"):
            raise loc.no_locations(dt.name, did)
        return str(self.repo.write_root / self._relpath(dt, did))

    def queryMetadata(
        self,
        datasetType: str,
        format: str | list[str] | tuple[str, ...],
        dataId: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Values of raw-registry keys for the rows matching ``dataId`` (Gen 2 ``queryMetadata``).

        Parameters
        ----------
        datasetType : str
            A registered dataset type (checked, then the raw registry is queried).
        format : str or sequence of str
            One key (returns a list of values) or several (a list of tuples).
        dataId : dict, optional
            Restricts the rows (registry columns such as ``filter``, ``visit``).
        **kwargs
            More dataId keys.

        Returns
        -------
        list
            Sorted unique values or tuples.

        Raises
        ------
        DataIdError
            If a key of ``format`` is not a registry column.
        """
        self._dataset_type(datasetType)
        did = _merge_data_id(dataId, kwargs)
        single = isinstance(format, str)
        keys = [format] if isinstance(format, str) else list(format)
        rows = self._raw_rows(did)
        if rows:
            unknown = [k for k in keys if k not in rows[0]]
            if unknown:
                msg = f"queryMetadata: unknown key(s) {unknown}; the raw registry has {sorted(rows[0])}"
                raise DataIdError(msg)
        values = {r[keys[0]] for r in rows} if single else {tuple(r[k] for k in keys) for r in rows}
        return sorted(values, key=_sort_key)
