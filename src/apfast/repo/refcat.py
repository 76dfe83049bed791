"""Reference catalogues: ingest Gaia / Pan-STARRS exports into HEALPix shards, load sky regions.

Rubin keeps reference catalogues as HTM shards under ``ref_cats/<name>/``; apfast keeps the
same idea with HEALPix (nested ordering, astropy-healpix). A catalogue lives in
``REPO/ref_cats/NAME/``:

- ``config.json``: kind, nside, ordering, the column map used, the stored columns, every
  ingested file with its sha256 and row count, and per shard its source count and ``rmax``
  (the largest distance, in degrees, of any of its sources from the pixel centre).
- ``<pix>.fits``: one FITS binary table per non-empty HEALPix pixel, with the standard columns.

Standard columns (same names for every catalogue): ``id`` (int64), ``ra``, ``dec`` (deg),
``ra_err``, ``dec_err`` (deg), ``pm_ra`` (mas/yr, already times cos(dec)), ``pm_dec`` (mas/yr),
``epoch`` (Julian year), and for each band ``<band>_mag``, ``<band>_magErr`` (AB/Vega as given),
``<band>_flux``, ``<band>_fluxErr`` (nJy, ``10**(-0.4 * (mag - 31.4))``). Absent values are NaN.

A load opens only the shards that can hold a source of the region: candidates come from
``HEALPix.cone_search_lonlat`` on the circumscribed cone widened by the pixel size (the
astropy-healpix cone search can miss partially overlapping pixels, astropy-healpix #287), and
a candidate is kept only if ``distance(centre, pixel centre) - rmax <= radius``, which the
triangle inequality makes exact for the stored data. Sources are then filtered exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import astropy.units as u
import numpy as np
from astropy_healpix import HEALPix

from apfast._fileio import atomic_path
from apfast.errors import InputError, RefcatError
from apfast.repo.refcat_io import (
    _KINDS,
    _MAS_TO_DEG,
    AB_NJY_ZEROPOINT,
    _convert,
    _detect_kind,
    _dtype,
    _Input,
    _read_input,
    _read_shard,
    _resolve_map,
    _sha256,
    _unit,
    _write_shard,
    mag_to_njy,
)

__all__ = [
    "AB_NJY_ZEROPOINT",
    "DEFAULT_NSIDE",
    "RefcatIngestReport",
    "RefcatRegion",
    "apply_proper_motion",
    "ingest_refcat",
    "list_refcats",
    "load_polygon",
    "load_region",
    "mag_to_njy",
    "shards_for_region",
]

_LOG = logging.getLogger(__name__)

#: HEALPix nside of a new catalogue: 12288 pixels of 1.83 deg.
DEFAULT_NSIDE = 32
FORMAT_VERSION = 1
_CONFIG = "config.json"
_LOCK = "ingest.lock"

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class RefcatIngestReport:
    """What :func:`ingest_refcat` did.

    Attributes
    ----------
    name, kind : str
        Catalogue name and kind (``gaia``, ``ps1`` or ``generic``).
    nside : int
        HEALPix nside of the shards (nested ordering).
    path : Path
        The catalogue folder ``REPO/ref_cats/NAME``.
    files_ingested, files_skipped : tuple of str
        Input files added, and those skipped because their sha256 was already ingested.
    n_added, n_total : int
        Sources added by this call and sources in the catalogue afterwards.
    shards_written : tuple of int
        HEALPix pixels whose shard files were (re)written.
    elapsed_s : float
        Wall time of the ingest.
    """

    name: str
    kind: str
    nside: int
    path: Path
    files_ingested: tuple[str, ...]
    files_skipped: tuple[str, ...]
    n_added: int
    n_total: int
    shards_written: tuple[int, ...]
    elapsed_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RefcatRegion:
    """Sources of a reference catalogue inside a sky region.

    Attributes
    ----------
    sources : numpy.ndarray
        Structured array (native byte order) with the standard columns; a fresh copy the
        caller owns.
    shards_read : tuple of int
        HEALPix pixels whose shard files the load opened (sorted).
    name, kind : str
        Catalogue name and kind.
    region : str
        Human-readable description of the region, for logs and messages.
    """

    sources: np.ndarray
    shards_read: tuple[int, ...]
    name: str
    kind: str
    region: str

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def bands(self) -> tuple[str, ...]:
        """Bands present, from the ``<band>_mag`` columns."""
        names = self.sources.dtype.names
        assert names is not None  # a structured array
        return tuple(n[:-4] for n in names if n.endswith("_mag"))


# ----------------------------------------------------------------------------------------------
# Catalogue folder helpers
# ----------------------------------------------------------------------------------------------

def list_refcats(repo: str | Path) -> list[str]:
    """Names of the reference catalogues ingested under ``REPO/ref_cats``.

    Parameters
    ----------
    repo : str or Path
        Repository root.

    Returns
    -------
    list of str
        Sorted names of folders holding a ``config.json``.
    """
    root = Path(repo) / "ref_cats"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / _CONFIG).is_file())


def _catalogue_dir(repo: str | Path, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        msg = f"reference catalogue name {name!r} is not a plain folder name; use e.g. 'gaia_dr3'"
        raise InputError(msg)
    return Path(repo) / "ref_cats" / name


def _read_config(repo: str | Path, name: str) -> dict[str, Any]:
    path = _catalogue_dir(repo, name) / _CONFIG
    if not path.is_file():
        present = list_refcats(repo)
        msg = (f"no reference catalogue {name!r} in {Path(repo) / 'ref_cats'} (catalogues present: "
               f"{present or 'none'}); ingest it with 'apfast ingest-refcat {repo} {name} FILES...'")
        raise RefcatError(msg)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        msg = f"{path}: unreadable catalogue config ({exc}); re-create the catalogue with ingest-refcat"
        raise RefcatError(msg) from exc


def _rmax(rows: np.ndarray, hp: HEALPix, pix: int) -> float:
    lon, lat = hp.healpix_to_lonlat(pix)
    d = _separation(float(lon.to_value(u.deg)), float(lat.to_value(u.deg)), rows["ra"], rows["dec"])
    return float(d.max()) if d.size else 0.0


# ----------------------------------------------------------------------------------------------
# Ingest
# ----------------------------------------------------------------------------------------------

def ingest_refcat(
    repo: str | Path,
    name: str,
    files: Sequence[str | Path],
    *,
    kind: Literal["auto", "gaia", "ps1", "generic"] = "auto",
    column_map: Mapping[str, str] | None = None,
    nside: int | None = None,
    progress: Progress | None = None,
) -> RefcatIngestReport:
    """Ingest CSV or FITS catalogue files into HEALPix shards under ``REPO/ref_cats/NAME``.

    Every input file is read and validated before anything is written; shards are written to
    temporary names and moved into place, then ``config.json`` last, so a failed ingest leaves
    an existing catalogue unchanged. A file whose sha256 was already ingested is skipped;
    new files merge into the existing shards.

    Parameters
    ----------
    repo : str or Path
        Repository root (``ref_cats/`` is created inside it).
    name : str
        Catalogue name, a plain folder name such as ``gaia_dr3``.
    files : sequence of str or Path
        CSV (comma separated, header row) or FITS binary-table files.
    kind : {"auto", "gaia", "ps1", "generic"}, optional
        Column convention. ``auto`` uses the existing catalogue's kind, else detects it from
        the column names (Gaia archive: ``source_id`` + ``phot_g_mean_mag``; PS1: ``obj_id`` or
        ``*_mean_psf_mag``; generic: ``id``, ``ra``, ``dec``).
    column_map : mapping of str to str, optional
        Overrides ``{standard column: input column}``, e.g. ``{"id": "objID"}``; an empty value
        means "absent" (stored as NaN; not allowed for id/ra/dec). Input ``ra_err``/``dec_err``
        units are mas for Gaia, arcsec for PS1, degrees for generic; ``pm_*`` in mas/yr.
        Default: the existing catalogue's map when merging.
    nside : int, optional
        HEALPix nside (power of two). Default 32 (1.8 deg pixels) for a new catalogue and the
        existing value when merging; a different value is an error.
    progress : callable, optional
        Called with one-line messages (``"read FILE (i/n): N sources"``,
        ``"wrote shard P (i/n)"``), like the other apfast ingest commands.

    Returns
    -------
    RefcatIngestReport

    Raises
    ------
    RefcatError
        Unreadable file, missing column, bad ra/dec, duplicate ids, or a kind/nside/column
        conflict with the existing catalogue.
    InputError
        Bad arguments (no files, bad nside, unknown column-map key).

    Examples
    --------
    >>> report = ingest_refcat(repo, "gaia", ["gaia_patch.csv"])  # doctest: +SKIP
    >>> report.n_added  # doctest: +SKIP
    12034
    """
    t0 = time.perf_counter()
    _check_ingest_args(name, files, kind, nside)
    catdir = _catalogue_dir(repo, name)
    old_text = (catdir / _CONFIG).read_text() if (catdir / _CONFIG).is_file() else None
    old = _read_config(repo, name) if old_text is not None else None
    nside = _resolve_nside(name, nside, old)
    hp = HEALPix(nside=nside, order="nested")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            msg = f"reference catalogue input {p} does not exist or is not a file; check the path"
            raise RefcatError(msg)

    # --- read and validate everything first ---------------------------------------------
    read = _read_inputs(paths, name, kind=kind, column_map=column_map, old=old, hp=hp, progress=progress)
    inputs, skipped = read.inputs, read.skipped
    if not inputs:
        total = int(old["n_sources"]) if old else 0
        return RefcatIngestReport(name=name, kind=old["kind"] if old else str(kind), nside=nside,
                                  path=catdir, files_ingested=(), files_skipped=tuple(skipped),
                                  n_added=0, n_total=total, shards_written=(),
                                  elapsed_s=time.perf_counter() - t0)
    assert read.kind is not None and read.bands is not None  # set by every input read
    new_rows, new_pix = _concatenate_inputs(inputs)
    dtype = _dtype(read.bands)

    # --- write under a lock ---------------------------------------------------------------
    with _ingest_lock(catdir, name):
        now_text = (catdir / _CONFIG).read_text() if (catdir / _CONFIG).is_file() else None
        if now_text != old_text:
            msg = f"catalogue {name!r} changed while this ingest was validating; run the ingest again"
            raise RefcatError(msg)
        shard_info: dict[str, dict] = dict(old["shards"]) if old else {}
        _check_ids_not_stored(catdir, shard_info, new_rows, name)
        upix = _write_shards(catdir, new_rows, new_pix, shard_info, dtype, name=name, kind=read.kind, nside=nside,
                             hp=hp, progress=progress)  # fmt: skip
        config = _catalogue_config(name, read, inputs, old, shard_info, dtype, nside=nside, column_map=column_map)
        with atomic_path(catdir / _CONFIG, mkdir=False, reserve=False) as tmp:
            tmp.write_text(json.dumps(config, indent=1))
    elapsed = time.perf_counter() - t0
    _LOG.info("refcat %s: ingested %d sources from %d files into %d shards in %.2f s",
              name, len(new_rows), len(inputs), len(upix), elapsed)
    return RefcatIngestReport(name=name, kind=read.kind, nside=nside, path=catdir,
                              files_ingested=tuple(str(x.path) for x in inputs),
                              files_skipped=tuple(skipped), n_added=len(new_rows),
                              n_total=config["n_sources"], shards_written=tuple(upix.tolist()),
                              elapsed_s=elapsed)


# ----------------------------------------------------------------------------------------------
# The steps of ingest_refcat
# ----------------------------------------------------------------------------------------------

def _check_ingest_args(name: str, files: Sequence[str | Path], kind: str, nside: int | None) -> None:
    """Raise InputError for no files, an unknown kind or an nside that is not a power of two."""
    if not files:
        msg = f"ingest_refcat({name!r}): no input files given; pass one or more CSV/FITS catalogue files"
        raise InputError(msg)
    if kind not in ("auto", *_KINDS):
        msg = f"kind={kind!r} is not one of 'auto', 'gaia', 'ps1', 'generic'"
        raise InputError(msg)
    if nside is not None and (int(nside) != nside or nside < 1 or int(nside) & (int(nside) - 1)):
        msg = f"nside={nside!r} is not a power of two; use e.g. 16, 32 (default) or 64"
        raise InputError(msg)


def _resolve_nside(name: str, nside: int | None, old: dict[str, Any] | None) -> int:
    """The existing catalogue's nside (asking for another is a RefcatError), else ``nside`` or the default."""
    if old is not None:
        if nside is not None and nside != old["nside"]:
            msg = (f"catalogue {name!r} has nside={old['nside']} but nside={nside} was asked; "
                   f"omit nside to merge, or ingest into a new catalogue name")
            raise RefcatError(msg)
        nside = int(old["nside"])
    return int(nside or DEFAULT_NSIDE)


@dataclass
class _ReadInputs:
    """The new input files read and converted, the files skipped, and the convention they share."""

    inputs: list[_Input]
    skipped: list[str]
    kind: str | None = None
    bands: tuple[str, ...] | None = None
    column_map: dict | None = None


def _read_inputs(
    paths: list[Path],
    name: str,
    *,
    kind: str,
    column_map: Mapping[str, str] | None,
    old: dict[str, Any] | None,
    hp: HEALPix,
    progress: Progress | None,
) -> _ReadInputs:
    """Read, convert and place on the sky every file not ingested before; RefcatError on any conflict."""
    known = {f["sha256"] for f in old["files"]} if old else set()
    inputs: list[_Input] = []
    skipped: list[str] = []
    used_kind = used_bands = used_map = None
    seen_sha: set[str] = set()
    for i, path in enumerate(paths):
        sha = _sha256(path)
        if sha in known or sha in seen_sha:
            _LOG.info("refcat %s: %s already ingested (sha256 %s...), skipped", name, path, sha[:12])
            skipped.append(str(path))
            continue
        seen_sha.add(sha)
        data = _read_input(path)
        k = kind if kind != "auto" else (old["kind"] if old else _detect_kind(list(data), path))
        if used_kind is not None and k != used_kind:
            msg = f"{path}: looks like a {k} catalogue but earlier files are {used_kind}; ingest them separately"
            raise RefcatError(msg)
        cmap = column_map if column_map is not None else (old["column_map_override"] if old else None)
        bands, spec = _resolve_map(k, cmap)
        if old is not None and (k != old["kind"] or list(bands) != old["bands"]):
            msg = (f"{path}: a {k} catalogue with bands {list(bands)} cannot merge into {name!r} "
                   f"({old['kind']}, bands {old['bands']}); use a new catalogue name")
            raise RefcatError(msg)
        rows, used = _convert(path, data, bands, spec)
        pix = np.asarray(hp.lonlat_to_healpix(rows["ra"] * u.deg, rows["dec"] * u.deg), dtype=np.int64)
        inputs.append(_Input(path, sha, rows, pix))
        used_kind, used_bands, used_map = k, bands, used
        if progress is not None:
            progress(f"read {path} ({i + 1}/{len(paths)}): {len(rows)} sources")
    return _ReadInputs(inputs, skipped, used_kind, used_bands, used_map)


def _concatenate_inputs(inputs: list[_Input]) -> tuple[np.ndarray, np.ndarray]:
    """All new rows and their HEALPix pixels; RefcatError if a source id appears twice."""
    new_rows = np.concatenate([x.rows for x in inputs])
    new_pix = np.concatenate([x.pix for x in inputs])
    ids = np.sort(new_rows["id"])
    dup = ids[1:][ids[1:] == ids[:-1]]
    if dup.size:
        msg = (f"{dup.size} source ids appear in more than one of the input files "
               f"(e.g. {int(dup[0])}); ingest each source once")
        raise RefcatError(msg)
    return new_rows, new_pix


@contextlib.contextmanager
def _ingest_lock(catdir: Path, name: str) -> Iterator[None]:
    """Hold ``catdir/ingest.lock`` for the block; a failed first ingest removes the folder it created."""
    created = not catdir.exists()
    catdir.mkdir(parents=True, exist_ok=True)
    lock = catdir / _LOCK
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        msg = (f"{lock} exists: another ingest into {name!r} is running; if none is, the lock is "
               f"stale from a killed run: delete it and ingest again")
        raise RefcatError(msg) from None
    os.close(fd)
    try:
        yield
    except BaseException:
        if created and not any(p.name != _LOCK for p in catdir.iterdir()):
            lock.unlink(missing_ok=True)
            catdir.rmdir()
        raise
    finally:
        lock.unlink(missing_ok=True)


def _check_ids_not_stored(catdir: Path, shard_info: dict[str, dict], new_rows: np.ndarray, name: str) -> None:
    """RefcatError if a new source id is already stored in any shard."""
    if shard_info:  # a source id already stored anywhere is an error
        stored = np.concatenate([_read_shard(catdir / f"{p}.fits", np.dtype([("id", "<i8")]))["id"]
                                 for p in shard_info])
        clash = np.intersect1d(stored, new_rows["id"])
        if clash.size:
            msg = (f"{clash.size} source ids of the input are already in catalogue {name!r} "
                   f"(e.g. {int(clash[0])}) from other files; drop them or use a new catalogue name")
            raise RefcatError(msg)


def _write_shards(
    catdir: Path,
    new_rows: np.ndarray,
    new_pix: np.ndarray,
    shard_info: dict[str, dict],
    dtype: np.dtype,
    *,
    name: str,
    kind: str,
    nside: int,
    hp: HEALPix,
    progress: Progress | None,
) -> np.ndarray:
    """Merge the new rows into their shards (all staged, then moved into place); update ``shard_info``.

    Returns the pixels written.
    """
    order = np.argsort(new_pix, kind="stable")
    upix, starts = np.unique(new_pix[order], return_index=True)
    bounds = np.append(starts, len(order))
    staged: list[tuple[Path, Path]] = []
    try:
        for j, p in enumerate(upix.tolist()):
            part = new_rows[order[bounds[j]:bounds[j + 1]]]
            final = catdir / f"{p}.fits"
            if str(p) in shard_info:
                part = np.concatenate([_read_shard(final, dtype), part])
            part = part[np.argsort(part["id"], kind="stable")]
            tmp = catdir / f".{p}.fits.tmp{os.getpid()}"
            staged.append((tmp, final))
            _write_shard(tmp, part, name=name, kind=kind, nside=nside, pix=p)
            shard_info[str(p)] = {"n": len(part), "rmax": _rmax(part, hp, p)}
            if progress is not None and ((j + 1) % max(1, len(upix) // 10) == 0 or j + 1 == len(upix)):
                progress(f"wrote shard {p} ({j + 1}/{len(upix)})")  # about ten messages
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return upix


def _catalogue_config(
    name: str,
    read: _ReadInputs,
    inputs: list[_Input],
    old: dict[str, Any] | None,
    shard_info: dict[str, dict],
    dtype: np.dtype,
    *,
    nside: int,
    column_map: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The new ``config.json`` content: the old files plus the new ones, and every shard's count and rmax."""
    assert read.bands is not None
    now = datetime.now(UTC).isoformat(timespec="seconds")
    ingested = (old["files"] if old else []) + [
        {"path": str(x.path.resolve()), "sha256": x.sha256, "n_sources": len(x.rows), "ingested": now}
        for x in inputs]
    return {
        "format_version": FORMAT_VERSION, "name": name, "kind": read.kind, "nside": nside,
        "ordering": "nested", "frame": "icrs", "bands": list(read.bands),
        "column_map": read.column_map,
        "column_map_override": dict(column_map) if column_map is not None else
        (old["column_map_override"] if old else None),
        "columns": [{"name": n, "dtype": dtype[n].str, "unit": _unit(n)} for n in dtype.names or ()],
        "files": ingested, "n_sources": int(sum(s["n"] for s in shard_info.values())),
        "n_shards": len(shard_info),
        "shards": {k: shard_info[k] for k in sorted(shard_info, key=int)},
    }


# ----------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------

def _separation(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Angular distance in degrees (haversine: accurate at small and large separations)."""
    r0, d0 = math.radians(ra0), math.radians(dec0)
    r, d = np.radians(ra), np.radians(dec)
    h = np.sin((d - d0) / 2) ** 2 + math.cos(d0) * np.cos(d) * np.sin((r - r0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(np.asarray(ra, dtype=np.float64)), np.radians(np.asarray(dec, dtype=np.float64))
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def _to_radec(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    ra = np.degrees(np.arctan2(v[..., 1], v[..., 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(v[..., 2], -1.0, 1.0)))
    return ra, dec


def _check_cone(ra: float, dec: float, radius: float) -> None:
    if not (np.isfinite(ra) and np.isfinite(dec) and np.isfinite(radius)) or abs(dec) > 90:
        msg = f"region ra={ra}, dec={dec} is not a finite sky position (need -90 <= dec <= 90 deg)"
        raise InputError(msg)
    if not 0 < radius <= 180:
        msg = f"region radius={radius} deg must be > 0 and <= 180 deg"
        raise InputError(msg)


def _select_shards(config: dict, ra: float, dec: float, radius: float) -> list[int]:
    """Shards that can hold a source within ``radius`` of (ra, dec), from the stored rmax."""
    hp = HEALPix(nside=int(config["nside"]), order="nested")
    # Widen by the pixel size: cone_search_lonlat can miss partially covered pixels
    # (astropy-healpix #287); the largest centre-to-corner distance is ~1.04x the resolution.
    pad = 1.1 * float(hp.pixel_resolution.to_value(u.deg))
    cand = hp.cone_search_lonlat(ra * u.deg, dec * u.deg, min(radius + pad, 180.0) * u.deg)
    shards = config["shards"]
    cand = np.array([p for p in cand.tolist() if str(p) in shards], dtype=np.int64)
    if cand.size == 0:
        return []
    lon, lat = hp.healpix_to_lonlat(cand)
    d = _separation(ra, dec, lon.to_value(u.deg), lat.to_value(u.deg))
    rmax = np.array([shards[str(p)]["rmax"] for p in cand.tolist()])
    # Triangle inequality: no stored source of the shard is closer than d - rmax.
    keep = d - rmax <= radius + 1e-9
    return sorted(cand[keep].tolist())


def _load(repo: str | Path, name: str, config: dict, shards: list[int], region: str,
          select: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    dtype = _dtype(config["bands"])
    catdir = _catalogue_dir(repo, name)
    if not shards:
        msg = (f"reference catalogue {name!r} has no shards overlapping {region}; the catalogue "
               f"covers {config['n_shards']} HEALPix nside={config['nside']} pixels: ingest a "
               f"catalogue that covers this field, or check the coordinates")
        raise RefcatError(msg)
    parts = []
    for p in shards:
        try:
            parts.append(_read_shard(catdir / f"{p}.fits", dtype, select))
        except (OSError, KeyError) as exc:
            msg = f"{catdir / f'{p}.fits'}: unreadable shard of {name!r} ({exc}); re-ingest the catalogue"
            raise RefcatError(msg) from exc
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _no_sources(name: str, region: str, shards: list[int]) -> RefcatError:
    msg = (f"reference catalogue {name!r} has no sources in {region} (shards read: {shards}); "
           f"enlarge the region or ingest a catalogue that covers this field")
    return RefcatError(msg)


# ----------------------------------------------------------------------------------------------
# Loads
# ----------------------------------------------------------------------------------------------

def shards_for_region(repo: str | Path, name: str, *, ra: float, dec: float, radius: float) -> list[int]:
    """HEALPix pixels whose shard files :func:`load_region` would open.

    Parameters
    ----------
    repo : str or Path
        Repository root.
    name : str
        Catalogue name.
    ra, dec, radius : float
        Cone centre and radius in degrees.

    Returns
    -------
    list of int
        Sorted nested pixel numbers of existing shards that can hold a source of the cone.

    Raises
    ------
    RefcatError
        The catalogue does not exist.
    InputError
        Non-finite position or radius outside (0, 180].
    """
    _check_cone(ra, dec, radius)
    return _select_shards(_read_config(repo, name), float(ra), float(dec), float(radius))


def load_region(repo: str | Path, name: str, *, ra: float, dec: float, radius: float) -> RefcatRegion:
    """Load the sources of a catalogue within ``radius`` degrees of (ra, dec).

    Parameters
    ----------
    repo : str or Path
        Repository root.
    name : str
        Catalogue name under ``REPO/ref_cats``.
    ra, dec : float
        Cone centre (ICRS degrees).
    radius : float
        Cone radius in degrees, in (0, 180]; the boundary is inclusive.

    Returns
    -------
    RefcatRegion
        The sources (sorted by shard then id) and the shards opened.

    Raises
    ------
    RefcatError
        Missing catalogue (the message lists those present), or no shard / no source in the cone.
    InputError
        Non-finite position or bad radius.

    Examples
    --------
    >>> region = load_region(repo, "gaia", ra=150.1, dec=2.2, radius=0.3)  # doctest: +SKIP
    >>> region.sources["G_mag"][:3]  # doctest: +SKIP
    """
    _check_cone(ra, dec, radius)
    config = _read_config(repo, name)
    desc = f"the cone ra={ra:.6f} dec={dec:+.6f} radius={radius:g} deg"
    shards = _select_shards(config, float(ra), float(dec), float(radius))
    rows = _load(repo, name, config, shards, desc,
                 lambda r, d: _separation(float(ra), float(dec), r, d) <= radius)
    if rows.size == 0:
        raise _no_sources(name, desc, shards)
    return RefcatRegion(sources=rows, shards_read=tuple(shards), name=name, kind=config["kind"], region=desc)


def _polygon(corners_ra: Sequence[float], corners_dec: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit-vector corners sorted counter-clockwise about their centre, and the centre."""
    ra = np.asarray(corners_ra, dtype=np.float64).ravel()
    dec = np.asarray(corners_dec, dtype=np.float64).ravel()
    if ra.size != dec.size or ra.size < 3 or not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        msg = (f"polygon needs >= 3 finite corners with as many ra as dec values; got "
               f"{ra.size} ra and {dec.size} dec")
        raise InputError(msg)
    v = _unit_vectors(ra, dec)
    c = v.sum(axis=0)
    if np.linalg.norm(c) < 1e-12:
        msg = "polygon corners are spread around the whole sphere; give a footprint smaller than a hemisphere"
        raise InputError(msg)
    c /= np.linalg.norm(c)
    east = np.cross([0.0, 0.0, 1.0], c)
    east = east / np.linalg.norm(east) if np.linalg.norm(east) > 1e-12 else np.array([0.0, 1.0, 0.0])
    north = np.cross(c, east)
    v = v[np.argsort(np.arctan2(v @ north, v @ east))]
    if np.max(np.degrees(np.arccos(np.clip(v @ c, -1, 1)))) >= 90:
        msg = "polygon corners lie more than 90 deg from their centre; give a footprint smaller than a hemisphere"
        raise InputError(msg)
    normals = np.cross(v, np.roll(v, -1, axis=0))
    if np.any(np.linalg.norm(normals, axis=1) < 1e-15) or np.any(v @ normals.T < -1e-12):
        msg = "polygon is not convex or has repeated corners; give the corners of a convex footprint (e.g. a CCD)"
        raise InputError(msg)
    return v, c


def _in_polygon(v: np.ndarray, p: np.ndarray, margin: float) -> np.ndarray:
    """True for points p (N, 3) inside the convex spherical polygon v or within margin deg of it."""
    n_edges = len(v)
    normals = np.cross(v, np.roll(v, -1, axis=0))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    side = p @ normals.T  # (N, n_edges); >= 0 on the inner side of every edge (counter-clockwise)
    inside = np.all(side >= 0, axis=1)
    if margin <= 0:
        return inside
    # Distance to each great-circle arc: perpendicular if the foot falls on the arc, else to a corner.
    near = np.zeros(len(p), dtype=bool)
    for i in range(n_edges):
        a, b, n = v[i], v[(i + 1) % n_edges], normals[i]
        foot = p - np.outer(p @ n, n)
        on_arc = (np.cross(a, foot) @ n >= 0) & (np.cross(foot, b) @ n >= 0)
        d_line = np.degrees(np.arcsin(np.clip(np.abs(p @ n), 0, 1)))
        d_corner = np.degrees(np.arccos(np.clip(np.maximum(p @ a, p @ b), -1, 1)))
        near |= np.where(on_arc, d_line, d_corner) <= margin
    return inside | near


def load_polygon(
    repo: str | Path,
    name: str,
    *,
    corners_ra: Sequence[float],
    corners_dec: Sequence[float],
    margin: float = 0.0,
) -> RefcatRegion:
    """Load the sources inside a convex sky polygon, such as a CCD footprint.

    Parameters
    ----------
    repo : str or Path
        Repository root.
    name : str
        Catalogue name.
    corners_ra, corners_dec : sequence of float
        Corners in degrees (any order: they are sorted around their centre; edges are great
        circles), e.g. the registry's ``corner_ra_0..3`` / ``corner_dec_0..3``.
    margin : float, optional
        Also keep sources within this many degrees of the polygon (default 0).

    Returns
    -------
    RefcatRegion
        The sources and the shards opened (those overlapping the circumscribed cone).

    Raises
    ------
    RefcatError
        Missing catalogue, or no shard / no source in the polygon.
    InputError
        Fewer than 3 corners, non-finite values, negative margin, or a non-convex polygon.
    """
    if not (np.isfinite(margin) and margin >= 0):
        msg = f"polygon margin={margin} must be a finite angle >= 0 deg"
        raise InputError(msg)
    v, c = _polygon(corners_ra, corners_dec)
    cra, cdec = _to_radec(c)
    radius = float(np.degrees(np.arccos(np.clip(v @ c, -1, 1))).max()) + margin
    config = _read_config(repo, name)
    ra_txt = ", ".join(f"{x:.5f}" for x in np.ravel(corners_ra))
    dec_txt = ", ".join(f"{x:+.5f}" for x in np.ravel(corners_dec))
    desc = f"the polygon ra=[{ra_txt}] dec=[{dec_txt}] margin={margin:g} deg"
    shards = _select_shards(config, float(cra), float(cdec), radius + 1e-9)
    rows = _load(repo, name, config, shards, desc,
                 lambda r, d: _in_polygon(v, _unit_vectors(r, d), float(margin)))
    if rows.size == 0:
        raise _no_sources(name, desc, shards)
    return RefcatRegion(sources=rows, shards_read=tuple(shards), name=name, kind=config["kind"], region=desc)


def apply_proper_motion(cat: RefcatRegion | np.ndarray | Mapping[str, Any], epoch: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Positions of catalogue sources at a Julian-year epoch.

    Moves each source along a great circle by ``|pm| * (epoch - source epoch)``, in the direction
    set by ``pm_ra`` (east, already including cos(dec)) and ``pm_dec`` (north). To first order
    this is ``ra + pm_ra*dt/cos(dec)``, ``dec + pm_dec*dt``, but it stays well defined at the poles.
    Sources with NaN ``pm_ra``, ``pm_dec`` or ``epoch`` keep their catalogue position.

    Parameters
    ----------
    cat : RefcatRegion, structured ndarray, or table/mapping
        Needs columns ``ra``, ``dec`` (deg), ``pm_ra``, ``pm_dec`` (mas/yr), ``epoch`` (yr).
    epoch : float
        Target epoch as a Julian year (e.g. ``2019.17``; MJD ``m`` is ``2000 + (m - 51544.5)/365.25``).

    Returns
    -------
    ra, dec : numpy.ndarray
        float64 degrees, ra in [0, 360). The input is not modified.

    Examples
    --------
    >>> cat = {"ra": [10.0], "dec": [0.0], "pm_ra": [3600e3], "pm_dec": [0.0], "epoch": [2000.0]}
    >>> ra, dec = apply_proper_motion(cat, 2001.0)
    >>> round(float(ra[0]), 6)
    11.0
    """
    if not np.isfinite(epoch):
        msg = f"epoch={epoch} is not a finite Julian year; pass e.g. 2019.2"
        raise InputError(msg)
    src = cat.sources if isinstance(cat, RefcatRegion) else cat
    try:
        ra, dec, pm_ra, pm_dec, ep = (np.asarray(src[k], dtype=np.float64)
                                      for k in ("ra", "dec", "pm_ra", "pm_dec", "epoch"))
    except (KeyError, ValueError) as exc:
        msg = f"apply_proper_motion needs columns ra, dec, pm_ra, pm_dec, epoch: {exc}"
        raise InputError(msg) from exc
    dt = epoch - ep
    move = np.isfinite(pm_ra) & np.isfinite(pm_dec) & np.isfinite(dt)
    d_east = np.radians(np.where(move, pm_ra * dt, 0.0) * _MAS_TO_DEG)
    d_north = np.radians(np.where(move, pm_dec * dt, 0.0) * _MAS_TO_DEG)
    r, d = np.radians(ra), np.radians(dec)
    p = _unit_vectors(ra, dec)
    east = np.stack([-np.sin(r), np.cos(r), np.zeros_like(r)], axis=-1)
    north = np.stack([-np.sin(d) * np.cos(r), -np.sin(d) * np.sin(r), np.cos(d)], axis=-1)
    # Rotate along the great circle through the direction of motion by the total angle.
    theta = np.hypot(d_east, d_north)
    safe = np.where(theta > 0, theta, 1.0)
    t = (d_east / safe)[..., None] * east + (d_north / safe)[..., None] * north
    new_ra, new_dec = _to_radec(p * np.cos(theta)[..., None] + t * np.sin(theta)[..., None])
    # Untouched sources keep their stored values exactly (no round trip through vectors).
    return np.where(move, new_ra, ra % 360.0), np.where(move, new_dec, dec)
