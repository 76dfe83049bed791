"""``apfast ingest``: register raw exposures in ``REPO/registry.sqlite3``.

Ingest reads headers only (see :func:`apfast.repo.fitsutil.scan_headers`), checks
everything first, then places the files (link, copy or move) and writes all
registry rows in one transaction. A bad file anywhere in the call leaves the
registry and the repository exactly as they were.

Examples
--------
>>> report = ingest_raws("repo", ["c4d_190305_060708_ori.fits.fz"])   # doctest: +SKIP
>>> report.n_rows                                                      # doctest: +SKIP
62
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from astropy.coordinates import Angle

from apfast._fileio import atomic_path
from apfast.camera import Camera, get_camera, parse_section
from apfast.errors import IngestError
from apfast.repo.fitsutil import HeaderInfo, fingerprint, image_wcs, scan_headers
from apfast.repo.registry import CAMERA_NAME, Registry

__all__ = ["IngestReport", "RawFile", "ingest_raws", "read_raw_file"]

log = logging.getLogger(__name__)

IngestMode = Literal["link", "copy", "move"]


@dataclass(frozen=True, slots=True)
class RawFile:
    """One validated raw file: where it goes and the registry rows it brings."""

    source: Path
    dest: str
    fingerprint: str
    size: int
    rows: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class IngestReport:
    """What an ingest call did."""

    repo: Path
    ingested: tuple[Path, ...] = ()
    already_present: tuple[Path, ...] = ()
    n_rows: int = 0
    skipped_hdus: tuple[str, ...] = field(default_factory=tuple)


def _parse_angle(value: Any, unit: str | None, *, path: Path, key: str | None) -> float:
    try:
        if isinstance(value, int | float):
            ang = Angle(float(value), unit=("hourangle" if unit == "hourangle" else "deg"))
        else:
            ang = Angle(str(value).strip(), unit=("hourangle" if unit == "hourangle" else "deg"))
        return float(ang.deg)
    except (ValueError, TypeError):
        msg = f"{path}: keyword {key} = {value!r} is not an angle ({unit or 'deg'}); fix the header"
        raise IngestError(msg) from None


def _as(kind: type, value: Any, *, path: Path, key: str | None, what: str) -> Any:
    try:
        if kind is int:
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                f: int | float = int(value)  # exact, however long
            else:
                f = float(value)
                if not math.isfinite(f) or f != int(f):
                    raise ValueError
            if not -(2**63) <= int(f) < 2**63:  # the registry stores signed 64-bit integers
                raise ValueError
            return int(f)
        if kind is float:
            return float(value)
        return str(value).strip()
    except (ValueError, TypeError):
        msg = f"{path}: keyword {key} = {value!r} is not a valid {what} ({kind.__name__}); fix the header"
        raise IngestError(msg) from None


def exposure_values(camera: Camera, header: Any, path: Path) -> dict[str, Any]:
    """Read the exposure-level registry values from a primary header via the camera's key map."""
    ek = camera.exposure_keys
    name = path.name

    def get(k: str, required: bool = True) -> Any:
        spec = ek.get(k)
        if spec is None:
            return None
        return spec.resolve(header, filename=name, what=k, required=required)

    out: dict[str, Any] = {}
    out["visit"] = _as(int, get("visit"), path=path, key=ek["visit"].key, what="visit number")
    if out["visit"] < 0:
        msg = f"{path}: keyword {ek['visit'].key} = {out['visit']} is negative; a visit number must be >= 0"
        raise IngestError(msg)
    out["filter"] = _as(str, get("filter"), path=path, key=ek["filter"].key, what="filter")
    if not out["filter"]:
        msg = f"{path}: keyword {ek['filter'].key} is empty; the filter of a raw must be known"
        raise IngestError(msg)
    date_obs = _as(str, get("date_obs"), path=path, key=ek["date_obs"].key, what="date")
    try:
        parsed = datetime.fromisoformat(date_obs)
    except ValueError:
        msg = f"{path}: keyword {ek['date_obs'].key} = {date_obs!r} is not an ISO date (YYYY-MM-DDThh:mm:ss)"
        raise IngestError(msg) from None
    out["taiObs"] = date_obs
    out["date"] = parsed.date().isoformat()
    out["mjd"] = _as(float, get("mjd"), path=path, key=ek["mjd"].key, what="MJD")
    out["expTime"] = _as(float, get("exptime"), path=path, key=ek["exptime"].key, what="exposure time")
    if not math.isfinite(out["expTime"]) or out["expTime"] < 0:
        msg = f"{path}: keyword {ek['exptime'].key} = {out['expTime']} is not a valid exposure time"
        raise IngestError(msg)
    out["object"] = _as(str, get("object", False) or "", path=path, key=None, what="object")
    out["obstype"] = _as(str, get("obstype", False) or "", path=path, key=None, what="obstype")
    out["proposal"] = _as(str, get("proposal", False) or "", path=path, key=None, what="proposal")
    airmass = get("airmass", False)
    out["airmass"] = (_as(float, airmass, path=path, key=ek["airmass"].key, what="airmass")
                      if airmass is not None else None)
    for k in ("ra", "dec"):
        v = get(k, False)
        out[k] = _parse_angle(v, ek[k].unit, path=path, key=ek[k].key) if v is not None and v != "" else None
    return out


def _footprint(camera: Camera, header: Any, shape: tuple[int, ...], path: Path, hdu: int) -> dict[str, Any]:
    """Centre and corners of the trimmed area on the sky, from the header WCS (NULL if none)."""
    out: dict[str, Any] = {}
    wcs = image_wcs(header, (shape[-2], shape[-1]) if len(shape) >= 2 else None)
    if wcs is None:
        return out
    xs0, xs1, ys0, ys1 = [], [], [], []
    for amp in camera.amplifiers:
        text = amp.data_section.resolve(header, filename=path.name, what=f"amp {amp.name} data section")
        try:
            sec = parse_section(text, what=f"{path}: HDU {hdu} amp {amp.name} data section")
        except ValueError as exc:
            raise IngestError(str(exc)) from None
        xs0.append(sec.x0)
        xs1.append(sec.x1)
        ys0.append(sec.y0)
        ys1.append(sec.y1)
    x0, x1, y0, y1 = min(xs0), max(xs1) - 1, min(ys0), max(ys1) - 1
    px = np.array([x0, x1, x1, x0, (x0 + x1) / 2], dtype=float)
    py = np.array([y0, y0, y1, y1, (y0 + y1) / 2], dtype=float)
    ra, dec = wcs.all_pix2world(px, py, 0)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        return out
    for i in range(4):
        out[f"corner_ra_{i}"] = float(ra[i] % 360.0)
        out[f"corner_dec_{i}"] = float(dec[i])
    out["ra_center"] = float(ra[4] % 360.0)
    out["dec_center"] = float(dec[4])
    return out


def _ccd_hdus(camera: Camera, infos: list[HeaderInfo], path: Path) -> tuple[list[tuple[int, HeaderInfo]], list[str]]:
    """The (ccdnum, HDU) pairs of science CCDs in a file, and the HDUs skipped (guide/focus CCDs)."""
    skipped: list[str] = []
    if not camera.multi_extension:
        for info in infos:
            if len(info.image_shape) == 2:
                return [(1, info)], skipped
        msg = f"{path}: no image HDU found (camera {camera.name} expects the image in one HDU)"
        raise IngestError(msg)
    out = []
    for info in infos[1:]:
        if len(info.image_shape) != 2:
            continue
        key = camera.detector_key or "CCDNUM"
        if key not in info.header:
            extname = info.header.get("EXTNAME", "?")
            msg = f"{path}: HDU {info.index} (EXTNAME {extname}) lacks keyword {key}; it cannot be assigned a ccdnum"
            raise IngestError(msg)
        ccdnum = _as(int, info.header[key], path=path, key=key, what="detector number")
        if not 1 <= ccdnum <= camera.max_detector:
            skipped.append(f"{path.name}[{info.index}] {key}={ccdnum}")
            continue
        out.append((ccdnum, info))
    if not out:
        msg = f"{path}: no science CCD extensions (with {camera.detector_key} 1..{camera.max_detector}) found"
        raise IngestError(msg)
    return out, skipped


def inspect_raw(path: str | Path, camera: Camera) -> tuple[RawFile, list[str]]:
    """Validate one raw file from its headers and build its registry rows (no side effects).

    Raises
    ------
    IngestError
        For an unreadable, truncated or foreign file, or a missing or malformed keyword;
        the message names the file and the keyword.
    """
    path = Path(path)
    infos = scan_headers(path)
    primary = infos[0].header
    if not camera.matches(primary):
        found = {k: primary.get(k) for k in camera.match}
        msg = (
            f"{path}: not a {camera.name} raw ({', '.join(f'{k}={v!r}' for k, v in found.items())}, "
            f"expected {camera.match}); ingest it into a repository made for its camera (--camera FILE.toml)"
        )
        raise IngestError(msg)
    exp = exposure_values(camera, primary, path)
    ccds, skipped = _ccd_hdus(camera, infos, path)
    rows = []
    seen: dict[int, int] = {}
    for ccdnum, info in ccds:
        if ccdnum in seen:
            msg = f"{path}: HDUs {seen[ccdnum]} and {info.index} both claim ccdnum {ccdnum}"
            raise IngestError(msg)
        seen[ccdnum] = info.index
        shape = info.image_shape
        if camera.raw_shape is not None and tuple(shape) != tuple(camera.raw_shape):
            msg = (
                f"{path}: HDU {info.index} (ccdnum {ccdnum}) has shape {shape}, expected "
                f"{tuple(camera.raw_shape)} for a {camera.name} raw CCD"
            )
            raise IngestError(msg)
        # Extension keywords first, then the primary's (FITS INHERIT convention).
        merged = {**{k: v for k, v in primary.items()}, **{k: v for k, v in info.header.items()}}
        for amp in camera.amplifiers:
            for spec, what in ((amp.data_section, "data section"), (amp.bias_section, "overscan section")):
                text = spec.resolve(merged, filename=path.name, what=f"amp {amp.name} {what}")
                try:
                    sec = parse_section(text, what=f"{path}: HDU {info.index} amp {amp.name} {what} ({spec.key})")
                except ValueError as exc:
                    raise IngestError(str(exc)) from None
                if sec.y1 > shape[0] or sec.x1 > shape[1]:
                    msg = f"{path}: HDU {info.index} amp {amp.name} {what} {text} lies outside the image {shape}"
                    raise IngestError(msg)
        row = dict(exp)
        row.update(
            ccdnum=ccdnum,
            ccd=ccdnum,
            detector=(str(info.header.get("EXTNAME", camera.detector_name(ccdnum))).strip()
                      or camera.detector_name(ccdnum)),
            hdu=info.index,
        )
        row.update(_footprint(camera, info.header if camera.multi_extension else merged, shape, path, info.index))
        rows.append(row)
    dest = camera.raw_template.format(
        date=exp["date"], filter=_safe(exp["filter"]), basename=path.name, visit=exp["visit"]
    )
    for row in rows:
        row["file"] = dest
    return RawFile(path, dest, fingerprint(infos), path.stat().st_size, tuple(rows)), skipped


def _safe(text: str) -> str:
    """A filter name fit for a path component."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "_"


def _repo_camera(repo: Path, camera: Camera | str | None) -> tuple[Camera, bool]:
    """The camera to ingest with, and whether ``camera.toml`` must be written."""
    stored = repo / CAMERA_NAME
    if stored.exists():
        from apfast.camera import load_camera

        have = load_camera(stored)
        if camera is not None:
            want = camera if isinstance(camera, Camera) else get_camera(camera)
            if want.name != have.name:
                msg = (
                    f"{repo} holds {have.name} data ({stored}); it cannot also take {want.name} raws. "
                    "Use a separate repository per camera"
                )
                raise IngestError(msg)
        return have, False
    if camera is None:
        return get_camera("DECam"), True
    return (camera if isinstance(camera, Camera) else get_camera(camera)), True


class _Placeable(Protocol):
    """A file to place in the repository (:class:`RawFile`, a calibrated image/weight/mask)."""

    @property
    def source(self) -> Path: ...
    @property
    def dest(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def size(self) -> int: ...


@contextlib.contextmanager
def placed_files(repo: Path, items: Sequence[_Placeable], mode: IngestMode) -> Iterator[list[dict[str, Any]]]:
    """Put every item's ``source`` at ``repo / item.dest``; yield their ``raw_file`` registry rows.

    If placing fails, or the block raises (the registry insert), every file placed so far is undone
    (a moved file goes back, a link or copy is removed), so a failed ingest leaves the repository as
    it was. Shared by raw and calibrated ingest.
    """
    placed: list[tuple[_Placeable, Path]] = []
    try:
        for it in items:
            dest = repo / it.dest
            _place(it.source, dest, mode)
            placed.append((it, dest))
        now = datetime.now(UTC).isoformat(timespec="seconds")
        yield [dict(file=it.dest, source=str(it.source.resolve() if mode != "move" else it.source),
                    fingerprint=it.fingerprint, size=it.size, ingested=now, mode=mode) for it in items]
    except BaseException:
        for it, dest in reversed(placed):
            with contextlib.suppress(OSError):
                if mode == "move":
                    shutil.move(dest, it.source)
                else:
                    dest.unlink()
        raise


def _place(src: Path, dest: Path, mode: IngestMode) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        tmp = dest.with_name(f".{dest.name}.link")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(src.resolve(), tmp)
        os.replace(tmp, dest)
    elif mode == "copy":
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    else:
        shutil.move(src, dest)


def ingest_raws(
    repo: str | Path,
    files: Sequence[str | Path],
    *,
    mode: IngestMode = "link",
    camera: Camera | str | None = None,
    progress: Callable[[str], None] | None = None,
) -> IngestReport:
    """Register raw files in ``REPO/registry.sqlite3`` (creating it if needed).

    Parameters
    ----------
    repo : str or Path
        The repository root.
    files : sequence of paths
        Raw files, e.g. DECam ``c4d_YYMMDD_HHMMSS_ori.fits.fz``.
    mode : {"link", "copy", "move"}
        How files enter ``REPO/raw/<date>/<filter>/``: a symlink, a copy or a move.
    camera : Camera or str, optional
        The camera for a new repository (default DECam); an existing repository keeps its own.
    progress : callable, optional
        Called with a one-line message per file.

    Returns
    -------
    IngestReport

    Raises
    ------
    IngestError
        If any file is unreadable, truncated, foreign or lacks a keyword, or claims a
        (visit, ccdnum) already registered from a different file. Nothing is changed then.
    """
    repo = Path(repo)
    if mode not in ("link", "copy", "move"):
        msg = f"ingest mode {mode!r} is not one of link, copy, move"
        raise IngestError(msg)
    if not files:
        msg = "no files given to ingest"
        raise IngestError(msg)
    cam, write_camera = _repo_camera(repo, camera)
    reg = Registry(repo, create=True)
    try:
        todo: list[RawFile] = []
        present: list[Path] = []
        skipped: list[str] = []
        claimed: dict[tuple[int, int], Path] = {}
        for f in files:
            raw, skip = inspect_raw(f, cam)
            skipped.extend(skip)
            known = reg.file_by_fingerprint(raw.fingerprint)
            if known is not None:
                present.append(raw.source)
                if progress:
                    progress(f"{raw.source}: already ingested as {known['file']}, skipped")
                continue
            if any(t.fingerprint == raw.fingerprint for t in todo):
                present.append(raw.source)
                continue
            for row in raw.rows:
                key = (row["visit"], row["ccdnum"])
                if key in claimed:
                    msg = f"{raw.source} and {claimed[key]} both claim visit={key[0]} ccdnum={key[1]}"
                    raise IngestError(msg)
                have = reg.find({"visit": key[0], "ccdnum": key[1]})
                if have:
                    other = reg.file_row(have[0]["file"])
                    origin = other["source"] if other else have[0]["file"]
                    msg = (
                        f"{raw.source} claims visit={key[0]} ccdnum={key[1]}, already registered from "
                        f"{origin} (stored as {repo / have[0]['file']}); a different file cannot replace it"
                    )
                    raise IngestError(msg)
                claimed[key] = raw.source
            other_file = reg.file_row(raw.dest)
            if other_file is not None or (repo / raw.dest).exists() and not (repo / raw.dest).is_symlink():
                msg = f"{raw.source}: destination {repo / raw.dest} already exists for a different file"
                raise IngestError(msg)
            todo.append(raw)
        with placed_files(repo, todo, mode) as file_rows:
            reg.insert([row for raw in todo for row in raw.rows], file_rows)
        if write_camera:
            with atomic_path(repo / CAMERA_NAME) as tmp:
                tmp.write_text(cam.to_toml())
        for raw in todo:
            msg = f"{raw.source.name}: {len(raw.rows)} CCD(s) of visit {raw.rows[0]['visit']} -> {raw.dest}"
            (progress or log.info)(msg)
        return IngestReport(
            repo=repo,
            ingested=tuple(r.source for r in todo),
            already_present=tuple(present),
            n_rows=sum(len(r.rows) for r in todo),
            skipped_hdus=tuple(skipped),
        )
    finally:
        reg.close()


def read_raw_file(repo: str | Path, row: dict[str, Any]) -> tuple[np.ndarray, Any, Any]:
    """Read one raw CCD's pixels and headers: ``(image float32, primary header, extension header)``.

    The image is native-endian float32 (raw ADU, untrimmed), ready for the ISR kernels.
    """
    from astropy.io import fits

    path = Path(repo) / row["file"]
    try:
        with fits.open(path, memmap=False) as hdul:
            primary = hdul[0].header.copy()
            hdu = hdul[int(row["hdu"])]
            data = np.ascontiguousarray(hdu.data, dtype=np.float32)
            ext = hdu.header.copy()
    except (OSError, ValueError, IndexError) as exc:
        msg = f"{path}: cannot read HDU {row['hdu']} (visit {row['visit']}, ccdnum {row['ccdnum']}): {exc}"
        raise IngestError(msg) from None
    return data, primary, ext
