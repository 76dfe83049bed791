"""``apfast ingest --calibrated``: register calibrated images (image + weight + mask) and read them back.

Calibrated products (DECam Community Pipeline InstCal, ZTF sciimg/mskimg, any FITS with a WCS and
a ``[calibrated]`` camera table, see :mod:`apfast.camera.calibrated`) go into the same registry as
raws: one ``raw`` row per CCD (or ZTF quadrant) whose ``file``/``hdu`` are the image, plus one row
of the ``calibrated`` table naming the weight and mask files and the camera's extra dataId keys
(ZTF ``field``, ``ccdid``, ``qid``). Like raw ingest, everything is checked before anything is
placed or written, and a failure leaves the repository unchanged.

Examples
--------
>>> rep = ingest_calibrated("repo", ["ztf_..._sciimg.fits.fz"], camera="ztf")   # doctest: +SKIP
>>> rep.n_rows                                                                    # doctest: +SKIP
1
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from apfast._fileio import atomic_path
from apfast.camera.calibrated import CalibratedCamera, get_calibrated_camera
from apfast.errors import IngestError, InputError
from apfast.exposure import wcs_from_header
from apfast.repo.fitsutil import HeaderInfo, fingerprint, image_wcs, scan_headers
from apfast.repo.ingest import IngestMode, IngestReport, _as, _repo_camera, _safe, exposure_values, placed_files
from apfast.repo.registry import CAMERA_NAME, Registry

__all__ = ["CalibratedPixels", "ingest_calibrated", "read_calibrated"]


@dataclass(frozen=True, slots=True)
class _Product:
    """One file of a calibrated group: where it goes and its ``ccdnum -> HDU`` map."""

    source: Path
    dest: str
    fingerprint: str
    size: int
    hdus: dict[int, int]


@dataclass(frozen=True, slots=True)
class _Group:
    image: _Product
    weight: _Product | None
    mask: _Product | None
    rows: tuple[dict[str, Any], ...]
    cal_rows: tuple[dict[str, Any], ...]


def _merged(primary: fits.Header, ext: fits.Header) -> dict[str, Any]:
    """Primary then extension keywords (the extension wins: FITS INHERIT)."""
    return {**dict(primary.items()), **dict(ext.items())}


def _ccd_of(cal: CalibratedCamera, header: dict[str, Any], path: Path, hdu: int) -> int:
    value = cal.ccdnum.resolve(header, filename=path.name, what=f"the ccdnum of HDU {hdu}")
    n = _as(int, value, path=path, key=cal.ccdnum.key, what="detector number") + cal.ccdnum_offset
    return int(n)


def _image_hdus(cal: CalibratedCamera, infos: list[HeaderInfo], path: Path) -> dict[int, tuple[int, dict[str, Any]]]:
    """``ccdnum -> (HDU index, merged header)`` of the 2-d image HDUs of one file."""
    primary = infos[0].header
    images = [i for i in infos if len(i.image_shape) == 2]
    if not images:
        msg = f"{path}: no image HDU found"
        raise IngestError(msg)
    if not cal.camera.multi_extension:
        images = images[:1]
    out: dict[int, tuple[int, dict[str, Any]]] = {}
    for info in images:
        merged = _merged(primary, info.header)
        n = _ccd_of(cal, merged, path, info.index)
        if not 1 <= n <= cal.camera.max_detector:
            continue  # guide/focus CCDs of a mosaic
        if n in out:
            msg = f"{path}: HDUs {out[n][0]} and {info.index} both claim ccdnum {n}"
            raise IngestError(msg)
        out[n] = (info.index, merged)
    if not out:
        msg = f"{path}: no CCD with ccdnum 1..{cal.camera.max_detector} ({cal.ccdnum.key})"
        raise IngestError(msg)
    return out


def _footprint(header: dict[str, Any], shape: tuple[int, int]) -> dict[str, Any]:
    wcs = image_wcs(fits.Header(header), shape)
    if wcs is None:
        return {}
    ny, nx = shape
    px = np.array([0, nx - 1, nx - 1, 0, (nx - 1) / 2], float)
    py = np.array([0, 0, ny - 1, ny - 1, (ny - 1) / 2], float)
    ra, dec = wcs.all_pix2world(px, py, 0)
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        return {}
    out: dict[str, Any] = {f"corner_ra_{i}": float(ra[i] % 360.0) for i in range(4)}
    out.update({f"corner_dec_{i}": float(dec[i]) for i in range(4)})
    out.update(ra_center=float(ra[4] % 360.0), dec_center=float(dec[4]))
    return out


def _partner(cal: CalibratedCamera, image: Path, kind: str, given: dict[str, Path],
             template: str, exp: dict[str, Any], shapes: dict[int, tuple[int, ...]]) -> _Product | None:
    name = cal.partner_name(image.name, kind)
    if name is None:
        return None
    path = given.get(name)
    if path is None:
        beside = image.parent / name
        if not beside.exists():
            return None
        path = beside
    infos = scan_headers(path)
    if cal.camera.multi_extension:
        hdus = _image_hdus(cal, infos, path)
    else:  # one CCD per file: the partner's first image HDU (its header need not carry the ccdnum keys)
        first = next((i for i in infos if len(i.image_shape) == 2), None)
        if first is None:
            msg = f"{path}: no image HDU found in this {kind} file"
            raise IngestError(msg)
        hdus = {n: (first.index, {}) for n in shapes}
    by_index = {i.index: i for i in infos}
    for n, shape in shapes.items():
        if n not in hdus:
            msg = f"{path}: the {kind} file has no CCD ccdnum={n}, which its image {image} has; give the full file"
            raise IngestError(msg)
        got = tuple(by_index[hdus[n][0]].image_shape)
        if got != tuple(shape):
            msg = f"{path}: ccdnum={n} {kind} has shape {got}, its image {image} has {tuple(shape)}"
            raise IngestError(msg)
    dest = template.format(date=exp["date"], filter=_safe(exp["filter"]), basename=path.name, visit=exp["visit"])
    return _Product(path, dest, fingerprint(infos), path.stat().st_size, {n: hdus[n][0] for n in shapes})


def _inspect(cal: CalibratedCamera, image: Path, given: dict[str, Path]) -> _Group:
    infos = scan_headers(image)
    hdus = _image_hdus(cal, infos, image)
    first = next(iter(hdus.values()))[1]
    if not cal.camera.matches(first):
        found = {k: first.get(k) for k in cal.camera.match}
        msg = (f"{image}: not a {cal.camera.name} image ({', '.join(f'{k}={v!r}' for k, v in found.items())}, "
               f"expected {cal.camera.match}); give the right --camera")
        raise IngestError(msg)
    exp = exposure_values(cal.camera, first, image)
    exp["filter"] = cal.map_filter(exp["filter"])
    by_index = {i.index: i for i in infos}
    shapes = {n: tuple(by_index[h].image_shape) for n, (h, _) in hdus.items()}
    template = cal.camera.raw_template
    dest = template.format(date=exp["date"], filter=_safe(exp["filter"]), basename=image.name, visit=exp["visit"])
    img = _Product(image, dest, fingerprint(infos), image.stat().st_size, {n: h for n, (h, _) in hdus.items()})
    weight = _partner(cal, image, "weight", given, template, exp, shapes)
    mask = _partner(cal, image, "mask", given, template, exp, shapes)
    rows, cal_rows = [], []
    for n, (h, header) in sorted(hdus.items()):
        extra = {}
        for k, key in cal.dataid.items():
            if key not in header:
                msg = f"{image}: HDU {h} lacks keyword {key} (dataId key {k!r} of camera {cal.camera.name})"
                raise IngestError(msg)
            extra[k] = _as(int, header[key], path=image, key=key, what=f"dataId {k}")
        row = dict(exp)
        extname = str(header.get("EXTNAME", "") or "").strip()
        detector = cal.camera.detector_name(n) if cal.camera.detectors or not extname else extname
        row.update(ccdnum=n, ccd=n, detector=detector, hdu=h, file=dest)
        row.update(_footprint(header, (int(shapes[n][0]), int(shapes[n][1]))))
        rows.append(row)
        cal_rows.append(dict(visit=exp["visit"], ccdnum=n, image=dest, image_hdu=h,
                             weight=weight.dest if weight else None, weight_hdu=weight.hdus[n] if weight else None,
                             mask=mask.dest if mask else None, mask_hdu=mask.hdus[n] if mask else None,
                             dataid=json.dumps(extra, sort_keys=True)))
    return _Group(img, weight, mask, tuple(rows), tuple(cal_rows))


def _group_files(cal: CalibratedCamera, files: Sequence[str | Path]) -> tuple[list[Path], dict[str, Path]]:
    """The image files, and every given file by name; a weight or mask without its image is an error."""
    images: list[Path] = []
    by_name: dict[str, Path] = {}
    partners: list[tuple[Path, str]] = []
    for f in files:
        p = Path(f)
        kind = cal.kind_of(p.name)
        if kind is None:
            tokens = ", ".join(f"{k} {v!r}" for k, v in cal.files.items())
            msg = (f"{p}: the name matches no {cal.camera.name} product ({tokens}); "
                   "give image, weight and mask files named as the camera description says")
            raise IngestError(msg)
        by_name[p.name] = p
        if kind == "image":
            images.append(p)
        else:
            partners.append((p, kind))
    image_names = {p.name for p in images}
    for p, kind in partners:
        want = p.name.replace(cal.files[kind], cal.files["image"], 1)
        if want not in image_names:
            msg = f"{p}: a {kind} file without its image {want}; add {p.parent / want} to the files ingested"
            raise IngestError(msg)
    return images, by_name


def ingest_calibrated(
    repo: str | Path,
    files: Sequence[str | Path],
    *,
    camera: str | Path | Any,
    mode: IngestMode = "link",
    progress: Callable[[str], None] | None = None,
) -> IngestReport:
    """Register calibrated images with their weight and mask files in ``REPO/registry.sqlite3``.

    Parameters
    ----------
    repo : str or Path
        The repository root (created if needed).
    files : sequence of paths
        Image files, with or without their weight and mask files (partners next to an image are
        found by name when not given).
    camera : str, Path or Camera
        ``'decam-instcal'``, ``'ztf'`` or a TOML description with a ``[calibrated]`` table.
    mode : {"link", "copy", "move"}
        How files enter ``REPO/calibrated/<date>/<filter>/``.
    progress : callable, optional
        Called with one line per image file.

    Returns
    -------
    IngestReport

    Raises
    ------
    IngestError
        A file of no known kind, a weight or mask file without its image, a missing keyword, a
        partner lacking a CCD, or a (visit, ccdnum) already registered. Nothing is changed then.
    ConfigError
        Unknown camera name or a description without a ``[calibrated]`` table.
    """
    repo = Path(repo)
    if not files:
        msg = "no files given to ingest"
        raise IngestError(msg)
    cal = get_calibrated_camera(camera)
    cam, write_camera = _repo_camera(repo, cal.camera)
    images, by_name = _group_files(cal, files)
    reg = Registry(repo, create=True)
    try:
        todo: list[_Group] = []
        present: list[Path] = []
        claimed: dict[tuple[int, int], Path] = {}
        for image in images:
            g = _inspect(cal, image, by_name)
            if reg.file_by_fingerprint(g.image.fingerprint) is not None or any(
                    t.image.fingerprint == g.image.fingerprint for t in todo):
                present.append(image)
                if progress:
                    progress(f"{image}: already ingested, skipped")
                continue
            for row in g.rows:
                key = (int(row["visit"]), int(row["ccdnum"]))
                if key in claimed or reg.find({"visit": key[0], "ccdnum": key[1]}):
                    origin = claimed.get(key, "the registry")
                    msg = f"{image} claims visit={key[0]} ccdnum={key[1]}, already claimed by {origin}"
                    raise IngestError(msg)
                claimed[key] = image
            todo.append(g)
        products = [p for g in todo for p in (g.image, g.weight, g.mask) if p is not None]
        with placed_files(repo, products, mode) as file_rows:
            reg.insert_calibrated([r for g in todo for r in g.rows], [r for g in todo for r in g.cal_rows], file_rows)
        if write_camera:
            with atomic_path(repo / CAMERA_NAME) as tmp:
                tmp.write_text(cam.to_toml())
        for g in todo:
            kinds = "image" + (" + weight" if g.weight else "") + (" + mask" if g.mask else "")
            msg = (f"{g.image.source.name}: {len(g.rows)} calibrated CCD(s) of visit {g.rows[0]['visit']} "
                   f"({kinds}) -> {g.image.dest}")
            if progress:
                progress(msg)
        return IngestReport(repo=repo, ingested=tuple(g.image.source for g in todo), already_present=tuple(present),
                            n_rows=sum(len(g.rows) for g in todo))
    finally:
        reg.close()


@dataclass(frozen=True, slots=True)
class CalibratedPixels:
    """One calibrated CCD as read from its files (native-endian, the file's units)."""

    image: np.ndarray
    weight: np.ndarray | None
    mask: np.ndarray | None
    header: fits.Header
    wcs: Any


def _read_hdu(path: Path, hdu: int, what: str, dtype: Any) -> tuple[np.ndarray, fits.Header, fits.Header]:
    try:
        with fits.open(path, memmap=False) as hdul:
            data = hdul[hdu].data
            if data is None:
                raise ValueError(f"HDU {hdu} has no data")
            return np.ascontiguousarray(data, dtype=dtype), hdul[0].header.copy(), hdul[hdu].header.copy()
    except (OSError, ValueError, IndexError, TypeError) as exc:
        msg = f"cannot read the {what} {path}[{hdu}] ({exc}); restore the file or re-ingest it"
        raise InputError(msg) from None


def read_calibrated(repo: str | Path, cal_row: dict[str, Any]) -> CalibratedPixels:
    """Read the image, weight and mask of one ``calibrated`` registry row.

    The header is the primary merged with the image extension (extension wins); ``wcs`` is its
    celestial WCS (TPV and SIP as astropy reads them), ``None`` if it has none.

    Raises
    ------
    InputError
        A missing, truncated or corrupt file (the message names it).
    """
    root = Path(repo)
    image, primary, ext = _read_hdu(root / cal_row["image"], int(cal_row["image_hdu"]), "image", np.float32)
    weight = mask = None
    if cal_row.get("weight"):
        weight, _, _ = _read_hdu(root / cal_row["weight"], int(cal_row["weight_hdu"]), "weight map", np.float32)
    if cal_row.get("mask"):
        mask, _, _ = _read_hdu(root / cal_row["mask"], int(cal_row["mask_hdu"]), "mask", np.int64)
    header = fits.Header()
    skip = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT",
            "BZERO", "BSCALE", "CHECKSUM", "DATASUM", "ZIMAGE", "ZBITPIX", "ZNAXIS", "ZNAXIS1", "ZNAXIS2",
            "ZCMPTYPE", "ZQUANTIZ", "ZDITHER0", "", "COMMENT", "HISTORY"}
    for card in list(primary.cards) + list(ext.cards):
        if card.keyword not in skip:
            header[card.keyword] = (card.value, card.comment)
    try:
        wcs = wcs_from_header(ext) or wcs_from_header(header)
    except (ValueError, KeyError):
        wcs = None
    return CalibratedPixels(image, weight, mask, header, wcs)
