"""Templates for image differencing: build ``deepCoadd`` patches, and retrieve them for a science CCD.

Retrieval (:func:`get_template`) follows Rubin's Gen 3 ``GetTemplateTask``
(Rubin's AP pipeline, stage 5) rather than the Gen 2 one: every patch of the sky
map that overlaps the science CCD (grown by ``template_border`` pixels, testing
the whole CCD outline, not its centre) is read from
``<template root>/deepCoadd/{filter}/{tract}/{patch}.fits``, **warped onto the
science CCD's WCS and shape** (:func:`apfast.diffim.warp.warp_exposure`, Lanczos-3),
and the warped patches are averaged where several cover a pixel (patch overlaps
and tract overlaps): plain mean of the images, variance ``sum var / n^2``, OR of
the masks. Pixels no patch covers are ``NO_DATA`` (image 0, variance inf, as
the warp writes them). Missing patch files are logged as warnings and skipped.

The template's PSF is a :class:`apfast.diffim.warp.WarpedPsf` of the coadd PSF of the
patch that covers the CCD centre (else of the patch covering most pixels); its
``photo_calib`` is the coadd's (nJy for apfast coadds: the differencing stage
must scale the template to the science zero point, or vice versa). If fewer
than ``min_coverage`` of the science pixels have template data, or no patch
file exists, :class:`apfast.errors.NoWorkFound` says which CCD, filter and
repository were searched and which patches the repository has.

Building (:func:`build_templates`) makes the sky map from the calexps when none
is given (:func:`apfast.diffim.skymap.skymap_for_calexps`: one tract per field),
writes it to ``deepCoadd/skyMap.json`` and writes a coadd
(:func:`apfast.diffim.coadd.make_coadd`) for every patch that any calexp reaches.

Examples
--------
>>> TemplateConfig().template_border
20
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from apfast import masks
from apfast._configbase import ConfigSection, opt
from apfast.diffim.coadd import CoaddConfig, make_coadd
from apfast.diffim.skymap import SKYMAP_RELPATH, SkyMap, overlap_bbox, read_skymap, skymap_for_calexps, write_skymap
from apfast.errors import InputError, MissingTemplateError, NoWorkFound
from apfast.exposure import Exposure, VisitInfo, read_exposure, wcs_from_header, write_exposure
from apfast.kernels import coadd as _kcoadd
from apfast.repo.butler import DATASET_TYPES

if TYPE_CHECKING:
    from apfast.diffim.warp import WarpConfig

__all__ = ["TemplateConfig", "build_templates", "check_template_repository", "get_template", "patch_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class TemplateConfig(ConfigSection):
    """Template retrieval from a ``deepCoadd`` repository (Rubin ``GetTemplateTask``)."""

    _key_prefix: ClassVar[str] = "template."

    coadd_name: str = opt("deep", "Coadd name: patches are read from the '<coadd_name>Coadd' dataset.")
    template_border: int = opt(
        20, "Pixels added around the science CCD when searching for overlapping patches (>= 0)."
    )
    min_coverage: float = opt(
        0.02, "Smallest fraction of science pixels with template data; below it the CCD is skipped (NoWorkFound)."
    )

    def _validate(self) -> None:
        if not self.coadd_name or not self.coadd_name.isidentifier():
            self._fail("coadd_name", self.coadd_name, "use a plain name such as 'deep'")
        if self.template_border < 0:
            self._fail("template_border", self.template_border, "use an integer >= 0, e.g. 20")
        if not (0.0 <= self.min_coverage <= 1.0):
            self._fail("min_coverage", self.min_coverage, "use a fraction in [0, 1], e.g. 0.02")


def patch_path(template_root: str | Path, filter: str, tract: int, patch: str, *, coadd_name: str = "deep") -> Path:
    """Path of a coadd patch, laid out as the Butler's ``deepCoadd`` dataset type.

    Examples
    --------
    >>> patch_path("/t", "g", 0, "1,2").as_posix()
    '/t/deepCoadd/g/0/1,2.fits'
    """
    dt = DATASET_TYPES.get(f"{coadd_name}Coadd")
    tmpl = dt.template if dt is not None else f"{coadd_name}Coadd/{{filter}}/{{tract}}/{{patch}}.fits"
    for key, value in (("filter", filter), ("patch", patch)):
        text = str(value)
        if not text or "/" in text or "\\" in text or ".." in text or text.startswith("."):
            msg = f"{key}={value!r} cannot be used in a template path; give the plain value (e.g. filter=g)"
            raise InputError(msg)
    return Path(template_root) / tmpl.format(filter=filter, tract=int(tract), patch=patch)


def _existing_patches(template_root: Path, coadd_name: str) -> dict[str, list[str]]:
    """``{filter: ['tract/patch', ...]}`` of the patch files a template repository holds."""
    base = template_root / f"{coadd_name}Coadd"
    found: dict[str, list[str]] = {}
    if base.is_dir():
        for f in sorted(base.glob("*/*/*.fits")):
            found.setdefault(f.parent.parent.name, []).append(f"{f.parent.name}/{f.stem}")
    return found


def check_template_repository(template_root: str | Path, filters: Sequence[str], *, coadd_name: str = "deep",
                              how: str = "--template") -> None:
    """Fail early when a template repository holds no templates at all for ``filters``.

    Parameters
    ----------
    template_root : str or Path
        The template repository (``apfast process --template``).
    filters : sequence of str
        The bands of the science CCDs to be processed.
    coadd_name : str
        Patches are the ``<coadd_name>Coadd`` dataset.
    how : str
        How the user named the folder, for the message.

    Raises
    ------
    MissingTemplateError
        If the folder does not exist, has no sky map, or no patch of a needed filter;
        the message names the folder, the dataset, filter and path searched.
    """
    root = Path(template_root)
    build = f"build them with `apfast make-templates REPO --id visit=... --output {root}`"
    skip = "or pass --skip-missing-templates to skip CCDs without a template"
    if not root.is_dir():
        msg = f"{how} {root}: no such folder, so no templates; {build} or point {how} at them"
        raise MissingTemplateError(msg)
    if not (root / SKYMAP_RELPATH).is_file():
        msg = (
            f"{how} {root} holds no templates: no sky map {root / SKYMAP_RELPATH} "
            f"(dataset deepCoadd_skyMap); {build}, point {how} at the folder make-templates wrote, {skip}"
        )
        raise MissingTemplateError(msg)
    have = _existing_patches(root, coadd_name)
    missing = sorted(set(filters) - set(have))
    if missing:
        msg = (
            f"{how} {root} holds no {coadd_name}Coadd patch for filter {', '.join(map(repr, missing))} "
            f"(looked for {root / coadd_name}Coadd/FILTER/TRACT/PATCH.fits; it has filters "
            f"{', '.join(sorted(have)) or 'none'}); {build} for that filter, {skip}"
        )
        raise MissingTemplateError(msg)


def _describe_ccd(science: Exposure) -> str:
    vi = science.visit_info
    if vi is None:
        return "the science CCD (no visit info)"
    return f"visit {vi.visit} ccdnum {vi.ccdnum}"


def _parent_wcs(wcs: WCS, xy0: tuple[int, int]) -> WCS:
    """WCS of parent coordinates (``local + xy0``) for an exposure whose ``wcs`` is local."""
    if xy0 == (0, 0):
        return wcs
    hdr = wcs.to_header(relax=True)
    hdr["CRPIX1"] = hdr["CRPIX1"] + xy0[0]
    hdr["CRPIX2"] = hdr["CRPIX2"] + xy0[1]
    out = wcs_from_header(hdr)
    if out is None:  # pragma: no cover - to_header always writes CTYPE
        msg = "could not shift the science WCS to parent coordinates"
        raise InputError(msg)
    return out


def _patch_box(path: Path, sci_wcs: WCS, shape: tuple[int, int], pad: int = 16) -> tuple[int, int, int, int] | None:
    """The box of a patch file (y0, y1, x0, x1) that the science CCD needs, from the header alone.

    The CCD's edges (sampled every 64 px) are projected onto the patch and the box is grown by
    ``pad`` pixels (Lanczos-3 needs 3); ``None`` (read everything) if the header has no usable WCS
    or the CCD falls entirely off the patch.
    """

    try:
        hdr = fits.getheader(path, "IMAGE")
        pwcs = wcs_from_header(hdr)
        pny, pnx = int(hdr["NAXIS2"]), int(hdr["NAXIS1"])
    except (OSError, KeyError):
        return None
    if pwcs is None:
        return None
    ny, nx = shape
    xs = np.r_[np.arange(0, nx, 64), nx - 1]
    ys = np.r_[np.arange(0, ny, 64), ny - 1]
    ex = np.concatenate([xs, xs, np.zeros_like(ys), np.full_like(ys, nx - 1)]).astype(float)
    ey = np.concatenate([np.zeros_like(xs), np.full_like(xs, ny - 1), ys, ys]).astype(float)
    ra, dec = sci_wcs.all_pix2world(ex, ey, 0)
    px, py = pwcs.all_world2pix(ra, dec, 0)
    if not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
        return None
    x0, x1 = int(np.floor(px.min())) - pad, int(np.ceil(px.max())) + pad + 1
    y0, y1 = int(np.floor(py.min())) - pad, int(np.ceil(py.max())) + pad + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, pnx), min(y1, pny)
    if x0 >= x1 or y0 >= y1:
        return None
    return y0, y1, x0, x1


def _read_template_skymap(root: Path, science: Exposure, filter: str) -> SkyMap:
    """The sky map of the template repository; InputError without a science WCS, NoWorkFound without a sky map."""
    if science.wcs is None:
        msg = f"{_describe_ccd(science)} has no WCS, so no template can be placed on it; run calibrate first"
        raise InputError(msg)
    try:
        return read_skymap(root)
    except InputError:
        msg = (
            f"no template for {_describe_ccd(science)} in filter {filter!r}: template repository {root} "
            f"has no sky map {root / SKYMAP_RELPATH} (dataset deepCoadd_skyMap); build templates with "
            f"`apfast make-templates REPO --id visit=... --output {root}` or point --template at them"
        )
        raise NoWorkFound(msg) from None


def _no_template(
    reason: str, root: Path, config: TemplateConfig, filter: str, ccd: str, found: Sequence[tuple[int, str]]
) -> NoWorkFound:
    """The NoWorkFound of a CCD without a usable template: what was looked for and what the repository has."""
    have = _existing_patches(root, config.coadd_name)
    listing = "; ".join(f"{f}: {', '.join(p[:20])}{' ...' if len(p) > 20 else ''}" for f, p in have.items())
    wanted = ", ".join(f"{t}/{p}" for t, p in found) or "none (the CCD is outside the sky map)"
    msg = (
        f"no template for {ccd} in filter {filter!r} from template repository {root}: {reason}; "
        f"looked for dataset {config.coadd_name}Coadd, filter {filter!r}, tract/patch {wanted} "
        f"({root / config.coadd_name}Coadd/{filter}/TRACT/PATCH.fits); the repository has "
        f"{listing or 'no coadd patches'}; build templates for this field and filter "
        f"(`apfast make-templates`) or lower template.min_coverage"
    )
    return NoWorkFound(msg)


def _mosaic_patches(
    root: Path,
    science: Exposure,
    filter: str,
    found: Sequence[tuple[int, str]],
    config: TemplateConfig,
    warp_config: WarpConfig,
    nodata: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str, Exposure, int]]]:
    """Warp each patch onto the science grid and add it to the sums: (sum_img, sum_var, count, mask_or, used)."""
    from apfast.diffim import warp as _warp

    assert science.wcs is not None  # checked by _read_template_skymap
    ny, nx = science.shape
    ccd = _describe_ccd(science)
    sum_img = np.zeros((ny, nx), dtype=np.float32)
    sum_var = np.zeros((ny, nx), dtype=np.float32)
    count = np.zeros((ny, nx), dtype=np.int16)
    mask_or = np.zeros((ny, nx), dtype=np.int32)
    used: list[tuple[int, str, Exposure, int]] = []
    for tract, patch in found:
        path = patch_path(root, filter, tract, patch, coadd_name=config.coadd_name)
        if not path.is_file():
            log.warning("template patch %s (tract %d patch %s, filter %s) is missing; skipping it",
                        path, tract, patch, filter)
            continue
        coadd = read_exposure(path, bbox=_patch_box(path, science.wcs, (ny, nx)))
        if coadd.wcs is None:
            log.warning("template patch %s has no WCS; skipping it", path)
            continue
        box = overlap_bbox(coadd.wcs, coadd.shape, science.wcs, (ny, nx))
        if box is None:
            continue
        y0, y1, x0, x1 = box
        sub_wcs = science.wcs.slice((slice(y0, y1), slice(x0, x1)))
        warped = _warp.warp_exposure(coadd, sub_wcs, (y1 - y0, x1 - x0), config=warp_config)
        wmask = warped.mask if warped.mask is not None else np.zeros(warped.shape, np.int32)
        wvar = warped.variance if warped.variance is not None else np.zeros(warped.shape, np.float32)
        n_good = int(_kcoadd.mosaic_add(sum_img, sum_var, count, mask_or,
                                        np.ascontiguousarray(warped.image, np.float32),
                                        np.ascontiguousarray(wvar, np.float32), np.ascontiguousarray(wmask, np.int32),
                                        y0, x0, nodata))
        if n_good == 0:
            continue
        used.append((tract, patch, coadd, n_good))
        log.debug("template %s: patch %d/%s covers %d pixels", ccd, tract, patch, n_good)
    return sum_img, sum_var, count, mask_or, used


def _psf_patch(
    science: Exposure, used: Sequence[tuple[int, str, Exposure, int]]
) -> tuple[int, str, Exposure, int]:
    """The patch whose PSF and calibration the template takes: the one covering the CCD centre, else the one
    covering most pixels."""
    assert science.wcs is not None  # checked by _read_template_skymap
    ny, nx = science.shape
    cy, cx = (ny - 1) / 2.0, (nx - 1) / 2.0
    ra, dec = science.wcs.all_pix2world([cx], [cy], 0)
    chosen = max(used, key=lambda u: u[3])
    for u in used:
        assert u[2].wcs is not None  # patches without a WCS were skipped
        px, py = u[2].wcs.all_world2pix(ra, dec, 0)
        if 0 <= px[0] <= u[2].shape[1] - 1 and 0 <= py[0] <= u[2].shape[0] - 1:
            chosen = u
            break
    return chosen


def _template_exposure(
    science: Exposure,
    image: np.ndarray,
    mask: np.ndarray,
    variance: np.ndarray,
    *,
    filter: str,
    chosen: tuple[int, str, Exposure, int],
    used: Sequence[tuple[int, str, Exposure, int]],
    coverage: float,
) -> Exposure:
    """The template Exposure on the science grid, with the chosen patch's PSF and calibration and TMPL* metadata."""
    from apfast.diffim import warp as _warp

    assert science.wcs is not None  # checked by _read_template_skymap
    tract, patch, coadd, _ = chosen
    psf = None
    if coadd.psf is not None:
        psf = _warp.WarpedPsf(coadd.psf, coadd.wcs, _parent_wcs(science.wcs, science.xy0), src_xy0=coadd.xy0)
    vi = science.visit_info
    template = Exposure(
        image,
        mask,
        variance,
        wcs=science.wcs,
        psf=psf,
        photo_calib=coadd.photo_calib,
        visit_info=VisitInfo(
            filter=filter,
            visit=None if vi is None else vi.visit,
            ccdnum=None if vi is None else vi.ccdnum,
            detector=None if vi is None else vi.detector,
            camera=None if vi is None else vi.camera,
        ),
        metadata=fits.Header(),
        xy0=science.xy0,
    )
    template.metadata["TMPLCOV"] = (coverage, "fraction of the CCD with template data")
    template.metadata["TMPLPSF"] = (f"{tract}/{patch}", "patch whose coadd PSF is used")
    for k, (t, p, _, _) in enumerate(used[:99]):
        template.metadata[f"TMPLP{k:02d}"] = (f"{t}/{p}", "tract/patch used")
    return template


def get_template(
    template_root: str | Path,
    science: Exposure,
    *,
    filter: str,
    config: TemplateConfig | None = None,
    warp_config: WarpConfig | None = None,
) -> Exposure:
    """Build the template for a science CCD from the coadd patches of a template repository.

    Parameters
    ----------
    template_root : str or Path
        Template repository (holds ``deepCoadd/skyMap.json`` and the patches).
    science : Exposure
        The science CCD; its ``wcs`` and shape define the template grid.
    filter : str
        Band of the coadds to use (``'g'``).
    config : TemplateConfig, optional
        Border, coverage threshold, coadd name.
    warp_config : apfast.diffim.warp.WarpConfig, optional
        Warping options.

    Returns
    -------
    Exposure
        Same shape, WCS and ``xy0`` as ``science``; image/variance in the
        coadd's units (``photo_calib`` of the coadd); NO_DATA where no patch has
        data; ``psf`` a WarpedPsf of the coadd PSF; metadata ``TMPLCOV``
        (covered fraction) and ``TMPLPnn`` (patches used).

    Raises
    ------
    InputError
        If ``science`` has no WCS or the repository has no sky map.
    NoWorkFound
        If no patch file overlaps the CCD or the covered fraction is below
        ``config.min_coverage``.
    """
    from apfast.diffim import warp as _warp

    config = TemplateConfig() if config is None else config
    warp_config = _warp.WarpConfig() if warp_config is None else warp_config
    root = Path(template_root)
    skymap = _read_template_skymap(root, science, filter)
    assert science.wcs is not None  # checked by _read_template_skymap
    ny, nx = science.shape
    found = skymap.find_tracts_patches(science.wcs, (ny, nx), border=config.template_border)
    ccd = _describe_ccd(science)

    nodata = masks.bitmask("NO_DATA")
    sum_img, sum_var, count, mask_or, used = _mosaic_patches(
        root, science, filter, found, config, warp_config, nodata
    )
    if not used:
        raise _no_template(
            "none of the overlapping patch files exists or has data there", root, config, filter, ccd, found
        )
    coverage = float(np.count_nonzero(count)) / float(ny * nx)
    if coverage < config.min_coverage:
        raise _no_template(
            f"only {coverage:.1%} of the CCD is covered, below template.min_coverage={config.min_coverage}",
            root, config, filter, ccd, found,
        )
    image = np.empty((ny, nx), np.float32)
    variance = np.empty((ny, nx), np.float32)
    mask = np.empty((ny, nx), np.int32)
    _kcoadd.mosaic_finish(sum_img, sum_var, count, mask_or, nodata, image, variance, mask)

    chosen = _psf_patch(science, used)
    template = _template_exposure(
        science, image, mask, variance, filter=filter, chosen=chosen, used=used, coverage=coverage
    )
    log.info("template for %s (%s): %d patch(es), %.1f%% covered", ccd, filter, len(used), 100 * coverage)
    return template


def build_templates(
    calexps_by_filter: Mapping[str, Sequence[Exposure]],
    out_root: str | Path,
    *,
    skymap: SkyMap | None = None,
    coadd_config: CoaddConfig | None = None,
    warp_config: WarpConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Path]:
    """Coadd calexps into ``deepCoadd`` patches and write them (and the sky map) to a template repository.

    Parameters
    ----------
    calexps_by_filter : mapping of str to sequence of Exposure
        Calibrated exposures per band; each needs wcs, variance, psf and photo_calib.
        They are all held in memory by the caller (about 100 MB per DECam CCD).
    out_root : str or Path
        Template repository folder (created).
    skymap : SkyMap, optional
        Default: :func:`apfast.diffim.skymap.skymap_for_calexps` over every calexp of every filter.
    coadd_config : CoaddConfig, optional
        Coadd options.
    warp_config : apfast.diffim.warp.WarpConfig, optional
        Warping options.
    progress : callable, optional
        Called with a one-line message after each patch.

    Returns
    -------
    list of Path
        The sky map file, then every patch file written.

    Raises
    ------
    InputError
        If there are no calexps or one lacks a WCS.
    """
    out_root = Path(out_root)
    coadd_config = CoaddConfig() if coadd_config is None else coadd_config
    everything = [e for exps in calexps_by_filter.values() for e in exps]
    if not everything:
        msg = "build_templates got no calexps; give at least one calibrated exposure per filter"
        raise InputError(msg)
    for i, e in enumerate(everything):
        if e.wcs is None:
            msg = f"calexp {i} ({_describe_ccd(e)}) has no WCS; templates need calibrated exposures"
            raise InputError(msg)
    if skymap is None:
        skymap = skymap_for_calexps([e.wcs for e in everything], [e.shape for e in everything])
    written = [write_skymap(out_root, skymap)]
    for band, exps in calexps_by_filter.items():
        by_patch: dict[tuple[int, str], list[Exposure]] = {}
        for e in exps:
            for key in skymap.find_tracts_patches(e.wcs, e.shape):
                by_patch.setdefault(key, []).append(e)
        for k, ((tract, patch), inputs) in enumerate(sorted(by_patch.items())):
            try:
                coadd = make_coadd(inputs, tract, patch, skymap, config=coadd_config, warp_config=warp_config)
            except NoWorkFound as exc:
                log.info("no coadd for %s tract %d patch %s: %s", band, tract, patch, exc)
                continue
            npix = int(coadd.metadata.get("NPIXDATA", 0))
            if npix == 0:
                continue
            path = patch_path(out_root, band, tract, patch)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_exposure(path, coadd)
            written.append(path)
            if progress is not None:
                progress(
                    f"deepCoadd {band} tract {tract} patch {patch}: {len(inputs)} inputs, "
                    f"{npix / math.prod(coadd.shape):.0%} covered ({k + 1}/{len(by_patch)})"
                )
    return written
