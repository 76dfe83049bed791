"""``apfast simulate``: realistic raw DECam data, calibrations, reference catalogues and truth.

The simulator writes, under ``OUT``::

    raw/c4d_YYMMDD_HHMMSS_ori.fits.fz   one RICE-compressed MEF per visit (2160x4146 uint16 per CCD)
    calib/bias_20190301.fits            master bias (OBSTYPE zero), one float32 HDU per CCD
    calib/flat_<f>_20190301.fits        dome flat per filter
    calib/defects_20190301.fits         defect boxes (binary table per CCD)
    calib/DECam_xtalk_20190301.txt      crosstalk coefficients (victim source coeff)
    refcat/gaia.csv, refcat/ps1.csv     Gaia-like and Pan-STARRS-like reference catalogues
    truth/sources.csv                   static stars and galaxies (positions at 2016.0, true mags, shapes)
    truth/transients.csv                per (science visit, ccd): injected difference-image sources
    truth/visits.csv                    per visit: filter, MJD, seeing, sky, zero point
    truth/ccd_<visit>_<ccd>.json        true SIP WCS (trimmed grid), header WCS, PSF, sky, amps, defects...
    truth/ccd_<visit>_<ccd>.npz         render lists (to rebuild the noiseless image), CR/saturation masks

Photometric conventions: ``mag = zero_point_e - 2.5 log10(F_e)`` for the total electrons
``F_e`` of a source in the exposure; in ADU of an amplifier ``F_adu = F_e / gain``.
The noiseless post-ISR image (:func:`truth_image`) is in ADU: electrons / gain of the
amplifier, i.e. what ``(raw - overscan - bias) / flat`` gives before crosstalk.

Expected S/N of a transient (``snr_expected`` in ``transients.csv``) is the PSF-photometry
S/N on the difference image: with the unit PSF ``P`` at the position and the variance
``V = S/gain + (rn/gain)^2`` of the static science scene ``S`` (ADU),
``sigma^2 = (1 + 1/N_template) * sum(P^2 V)/(sum P^2)^2 + F * sum(P^3)/gain/(sum P^2)^2``
and ``S/N = |F| / sigma``.

Examples
--------
>>> summary = simulate("/tmp/sim", small=True)          # doctest: +SKIP
>>> img = truth_image("/tmp/sim", summary.science_visits[0], 35)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apfast.camera import get_camera
from apfast.errors import InputError
from apfast.sim.simulate_build import (
    build_ccd_instrument,
    build_visits,
    choose_transients,
    expose_ccd,
    science_transients,
    static_render_list,
    transient_render_list,
    write_calibs,
    write_refcats,
)
from apfast.sim.simulate_files import primary_header, write_csv, write_json, write_raw
from apfast.sim.simulate_scene import (
    FILTER_STRINGS,
    NAMP,
    ccd_centre,
    make_sky_catalogue,
    make_wcs,
    psf_at,
    render_electrons,
    render_sources,
)

__all__ = ["SimulationSummary", "Truth", "load_truth", "psf_fwhm", "simulate", "truth_image"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """What :func:`simulate` wrote (all paths absolute)."""

    out: Path
    raw_files: tuple[Path, ...]
    bias_file: Path
    flat_files: Mapping[str, Path]
    defects_file: Path
    crosstalk_file: Path
    gaia_file: Path
    ps1_file: Path
    truth_dir: Path
    template_visits: tuple[int, ...]
    science_visits: tuple[int, ...]
    ccdnums: tuple[int, ...]
    filters: tuple[str, ...]
    seed: int
    elapsed_s: float

    @property
    def calib_files(self) -> tuple[Path, ...]:
        """Bias, flats, defects and crosstalk files, in that order."""
        return (self.bias_file, *self.flat_files.values(), self.defects_file, self.crosstalk_file)

    @property
    def refcat_files(self) -> tuple[Path, Path]:
        """``(gaia.csv, ps1.csv)``."""
        return (self.gaia_file, self.ps1_file)

    @property
    def visits(self) -> tuple[int, ...]:
        """Template then science visits."""
        return self.template_visits + self.science_visits


def _check_args(ccdnums: Sequence[int], n_template: int, n_science: int, filters: Sequence[str], camera: Any) -> None:
    for c in ccdnums:
        if int(c) not in camera.detectors:
            msg = f"ccdnum {c} is not a DECam CCD; use numbers 1-62 (e.g. 35 for N4)"
            raise InputError(msg)
        if int(c) in camera.dead_detectors:
            msg = f"ccdnum {c} is a dead DECam CCD; choose another (e.g. 35 for N4)"
            raise InputError(msg)
    if len(set(int(c) for c in ccdnums)) != len(ccdnums) or not ccdnums:
        msg = f"ccdnums {list(ccdnums)} must be a non-empty list of distinct CCD numbers"
        raise InputError(msg)
    if n_template < 1 or n_science < 1:
        msg = f"n_template={n_template}, n_science={n_science}: need at least one visit of each kind"
        raise InputError(msg)
    bad = [f for f in filters if f not in FILTER_STRINGS]
    if bad or not filters:
        msg = f"filters {list(filters)}: unknown {bad}; choose from {sorted(FILTER_STRINGS)}"
        raise InputError(msg)


def simulate(
    out: str | Path,
    *,
    small: bool = False,
    seed: int = 0,
    ccdnums: Sequence[int] | None = None,
    n_template: int | None = None,
    n_science: int | None = None,
    filters: Sequence[str] = ("g",),
    progress: Callable[[str], None] | None = None,
) -> SimulationSummary:
    """Simulate raw DECam exposures with calibrations, reference catalogues and truth.

    Parameters
    ----------
    out : str or Path
        Output folder (created; existing simulator files are overwritten).
    small : bool
        Defaults for a quick data set: CCDs 35 and 36, 2 template and 3 science visits
        (otherwise CCDs 34-37, 3 template and 5 science visits). CCDs are always full size.
    seed : int
        Seed of every random choice; the same seed gives identical pixels.
    ccdnums, n_template, n_science : optional
        Override the CCDs and the number of visits per filter and epoch.
    filters : sequence of str
        Any of ``'g'``, ``'r'``, ``'i'``; each filter gets its own visits.
    progress : callable, optional
        Receives one-line progress messages.

    Returns
    -------
    SimulationSummary

    Raises
    ------
    InputError
        For an unknown or dead CCD, an unknown filter or no visits.
    """
    t0 = time.perf_counter()
    camera = get_camera("DECam")
    ccds = tuple(int(c) for c in (ccdnums if ccdnums is not None else ((35, 36) if small else (34, 35, 36, 37))))
    nt = int(n_template if n_template is not None else (2 if small else 3))
    ns = int(n_science if n_science is not None else (3 if small else 5))
    filters = tuple(filters)
    _check_args(ccds, nt, ns, filters, camera)
    out = Path(out).resolve()
    truth_dir = out / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    root = np.random.SeedSequence(int(seed))
    rng_cat, rng_inst, rng_vis, rng_tr, rng_ref = (np.random.default_rng(s) for s in root.spawn(5))
    centres = [ccd_centre(camera, c) for c in ccds]
    cat = make_sky_catalogue(rng_cat, centres)
    say(f"sky catalogue: {int((cat['kind'] == 0).sum())} stars, {int((cat['kind'] == 1).sum())} galaxies")
    inst = {c: build_ccd_instrument(rng_inst, c, camera, filters) for c in ccds}
    visits = build_visits(rng_vis, filters, nt, ns)
    calib = write_calibs(out / "calib", inst, camera, rng_inst)
    say(f"calibrations written to {out / 'calib'}")

    first_sci = {f: next(v for v in visits if v["filter"] == f and v["epoch"] == "science") for f in filters}
    defs = {(f, c): choose_transients(rng_tr, cat, first_sci[f], inst[c], c) for f in filters for c in ccds}
    raw_files: list[Path] = []
    trans_rows: list[dict[str, Any]] = []
    sat_flags: set[int] = set()
    for v in visits:
        hdus = []
        for c in ccds:
            ins = inst[c]
            meta = _ccd_meta(v, ins, camera, c)
            static = static_render_list(cat, v, meta)
            img = render_electrons(meta, static, transient_render_list([]))
            trans: dict[str, np.ndarray] = transient_render_list([])
            rows: list[dict[str, Any]] = []
            if v["epoch"] == "science":
                trans, rows = science_transients(rng_tr, defs[(v["filter"], c)], v, meta, static, img, nt)
                fx, fy = meta["focal_plane_centre"]
                render_sources(img, trans, meta["psf"], fx, fy)
            noise_rng = np.random.default_rng([int(seed), 7, int(v["visit"]), c])
            raw, masks = expose_ccd(noise_rng, meta, ins, img, static)
            del img
            header = meta.pop("header")
            meta["n_cosmic_rays"] = int(masks["n_cr"])
            meta["n_saturated_pixels"] = int(masks["sat_index"].size)
            meta["bleed_trails"] = masks["bleed_trails"]
            stem = truth_dir / f"ccd_{v['visit']}_{c}"
            tmp = truth_dir / f".ccd_{v['visit']}_{c}.tmp.npz"
            arrays: dict[str, Any] = {**{f"static_{k}": a for k, a in static.items()},
                                      **{f"trans_{k}": a for k, a in trans.items()},
                                      "cr_index": masks["cr_index"], "sat_index": masks["sat_index"],
                                      "bias_rows": masks["bias_rows"]}
            np.savez(tmp, **arrays)
            tmp.replace(f"{stem}.npz")
            write_json(Path(f"{stem}.json"), meta)
            sat_flags.update(int(i) for i in static["id"][masks["saturated_sources"]])
            trans_rows.extend(rows)
            hdus.append((raw, header))
        path = out / "raw" / v["filename"]
        write_raw(path, primary_header(v, len(ccds)), hdus)
        raw_files.append(path)
        say(f"visit {v['visit']} ({v['epoch']}, {v['filter']}): wrote {path.name}")

    in_gaia, in_ps1, gaia_path, ps1_path = write_refcats(out / "refcat", rng_ref, cat)
    write_csv(truth_dir / "sources.csv", {
        "id": cat["id"], "type": cat["type"], "ra": cat["ra"], "dec": cat["dec"],
        "ref_epoch": np.full(cat["id"].size, 2016.0),
        "pmra": cat["pmra"], "pmdec": cat["pmdec"], "g_mag": cat["g"], "r_mag": cat["r"], "i_mag": cat["i"],
        "z_mag": cat["z"], "re_arcsec": cat["re_arcsec"], "q": cat["q"], "pa_deg": cat["pa_deg"],
        "in_gaia": in_gaia, "in_ps1": in_ps1, "saturated": np.isin(cat["id"], sorted(sat_flags)),
        "variable": np.isin(cat["id"], [d for dd in defs.values() for d in dd["variable_ids"]]),
    })
    tcols = ["visit", "ccdnum", "detector", "id", "kind", "ra", "dec", "x", "y", "amp", "flux_adu", "flux_e",
             "flux_njy", "mag", "snr_expected", "host_id", "base_flux_adu", "trail_px", "psf_fwhm_px"]
    write_csv(truth_dir / "transients.csv", {k: [r[k] for r in trans_rows] for k in tcols})
    vcols = ["visit", "filter", "epoch", "mjd", "date_obs", "exptime", "airmass", "ra", "dec", "seeing_fwhm_arcsec",
             "sky_e", "sky_mag_arcsec2", "zero_point_e", "filename"]
    write_csv(truth_dir / "visits.csv", {k: [v[k] for v in visits] for k in vcols})
    elapsed = time.perf_counter() - t0
    say(f"simulation done in {elapsed:.1f} s: {len(visits)} visits x {len(ccds)} CCDs under {out}")
    return SimulationSummary(
        out=out, raw_files=tuple(raw_files), bias_file=calib["bias"], flat_files=calib["flats"],
        defects_file=calib["defects"], crosstalk_file=calib["crosstalk"], gaia_file=gaia_path, ps1_file=ps1_path,
        truth_dir=truth_dir,
        template_visits=tuple(v["visit"] for v in visits if v["epoch"] == "template"),
        science_visits=tuple(v["visit"] for v in visits if v["epoch"] == "science"),
        ccdnums=ccds, filters=filters, seed=int(seed), elapsed_s=elapsed,
    )


def _ccd_meta(v: Mapping[str, Any], ins: Mapping[str, Any], camera: Any, ccdnum: int) -> dict[str, Any]:
    """The per-(visit, ccd) truth dict (everything but the masks and render lists)."""
    from apfast.sim.simulate_build import ccd_wcs

    fx, fy = ccd_centre(camera, ccdnum)
    true_wcs, approx_trim, approx_raw = ccd_wcs(v, fx, fy, ins)
    u = np.array([-1023.5, 1023.5, -1023.5, 1023.5, 0.0]) + fx
    w = np.array([-2047.5, -2047.5, 2047.5, 2047.5, 0.0]) + fy
    fw, e1, e2 = psf_at(v["psf"], u, w)
    level = v["sky_e"] * (1 + v["sky_gu"] * fx / 1e4 + v["sky_gv"] * fy / 1e4)
    amps = {}
    for a in ("A", "B"):
        amp = dict(ins["amps"][a])
        amp["bias_level_adu"] = float(amp["bias_base_adu"] + v["bias_jitter"][ccdnum][a])
        amp["zero_point_adu"] = v["zero_point_e"] - 2.5 * math.log10(amp["gain"])
        amp["sky_adu"] = level / amp["gain"]
        amps[a] = amp
    from apfast.sim.simulate_files import ccd_header

    return {
        "visit": v["visit"], "ccdnum": ccdnum, "detector": camera.detector_name(ccdnum), "filter": v["filter"],
        "epoch": v["epoch"], "mjd": v["mjd"], "year": v["year"], "exptime": v["exptime"],
        "zero_point_e": v["zero_point_e"],
        "focal_plane_centre": [fx, fy],
        "true_wcs": true_wcs, "header_wcs_trimmed": approx_trim, "header_wcs_raw": approx_raw,
        "psf": v["psf"],
        "psf_fwhm_px_corners_centre": fw.tolist(), "psf_e1_corners_centre": e1.tolist(),
        "psf_e2_corners_centre": e2.tolist(),
        "sky": {"level_e": level, "gu": v["sky_gu"], "gv": v["sky_gv"],
                "formula": "level_e * (1 + gu*(u - fx)/1e4 + gv*(v - fy)/1e4), u,v focal-plane px"},
        "amps": amps,
        "crosstalk": ins["crosstalk"],
        "defects": ins["defects"],
        "header": ccd_header(ccdnum, camera.detector_name(ccdnum), amps, approx_raw),
    }


# ---------------------------------------------------------------------------------------------- truth API


@dataclass(frozen=True)
class Truth:
    """Truth of a simulation: tables (astropy) and per-(visit, ccd) metadata dicts."""

    root: Path
    sources: Any
    transients: Any
    visits: Any
    ccds: Mapping[tuple[int, int], dict[str, Any]] = field(repr=False)

    def ccd(self, visit: int, ccdnum: int) -> dict[str, Any]:
        """The truth dict of one (visit, ccd); raises InputError if it was not simulated."""
        try:
            return self.ccds[(int(visit), int(ccdnum))]
        except KeyError:
            have = sorted(self.ccds)
            msg = f"no truth for visit {visit} ccdnum {ccdnum} under {self.root}; simulated (visit, ccd): {have}"
            raise InputError(msg) from None

    def true_wcs(self, visit: int, ccdnum: int):
        """astropy WCS (TAN-SIP) of the trimmed 2048x4096 CCD, 0-based pixels via ``all_world2pix(..., 0)``."""
        return make_wcs(self.ccd(visit, ccdnum)["true_wcs"])

    def masks(self, visit: int, ccdnum: int) -> dict[str, np.ndarray]:
        """Boolean (4096, 2048) ``cr`` and ``saturated`` masks of one CCD exposure."""
        with np.load(self.root / f"ccd_{int(visit)}_{int(ccdnum)}.npz") as z:
            out = {}
            for name, key in (("cr", "cr_index"), ("saturated", "sat_index")):
                m = np.zeros(4096 * 2048, bool)
                m[z[key]] = True
                out[name] = m.reshape(4096, 2048)
        return out


def load_truth(sim_root: str | Path) -> Truth:
    """Read the truth folder of a simulation (``sim_root`` or ``sim_root/truth``).

    Raises
    ------
    InputError
        If the folder has no ``visits.csv`` (not a finished simulation).
    """
    from astropy.table import Table

    root = Path(sim_root)
    if (root / "truth").is_dir():
        root = root / "truth"
    if not (root / "visits.csv").exists():
        msg = f"{root} holds no simulation truth (visits.csv missing); run `apfast simulate OUT` first"
        raise InputError(msg)
    ccds = {}
    for p in sorted(root.glob("ccd_*_*.json")):
        _, visit, ccd = p.stem.split("_")
        ccds[(int(visit), int(ccd))] = json.loads(p.read_text())
    tables = {}
    for name in ("sources", "transients", "visits"):
        t = Table.read(root / f"{name}.csv", format="ascii.csv")
        for col in t.colnames:  # CSV booleans come back as 'True'/'False' strings
            if t[col].dtype.kind == "U" and len(t) and set(np.unique(t[col])) <= {"True", "False"}:
                t[col] = np.asarray(t[col]) == "True"
        tables[name] = t
    return Truth(root=root, ccds=ccds, **tables)


def truth_image(sim_root: str | Path, visit: int, ccdnum: int, *, sky: bool = True, sources: bool = True) -> np.ndarray:
    """The noiseless post-ISR image of one CCD exposure in ADU, float32 (4096, 2048).

    It is the rendered sky and sources (electrons, before the flat field) divided
    by each amplifier's gain: what ``(raw - overscan - bias) / flat`` gives after
    crosstalk correction, without noise, cosmic rays, defects or saturation.

    Parameters
    ----------
    sim_root : str or Path
        The simulation folder (or its ``truth`` folder).
    visit, ccdnum : int
    sky, sources : bool
        Include the sky background / the sources (stars, galaxies, transients).
    """
    root = Path(sim_root)
    if (root / "truth").is_dir():
        root = root / "truth"
    stem = root / f"ccd_{int(visit)}_{int(ccdnum)}"
    if not Path(f"{stem}.json").exists():
        msg = f"no truth for visit {visit} ccdnum {ccdnum} in {root}; check the visit and CCD numbers"
        raise InputError(msg)
    meta = json.loads(Path(f"{stem}.json").read_text())
    with np.load(f"{stem}.npz") as z:
        static = {k[7:]: z[k] for k in z.files if k.startswith("static_")}
        trans = {k[6:]: z[k] for k in z.files if k.startswith("trans_")}
    e = render_electrons(meta, static, trans, sky=sky, sources=sources)
    e[:, :NAMP] /= np.float32(meta["amps"]["B"]["gain"])
    e[:, NAMP:] /= np.float32(meta["amps"]["A"]["gain"])
    return e


def psf_fwhm(meta: Mapping[str, Any], x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
    """True PSF FWHM (pixels) at trimmed pixel ``(x, y)`` of a per-(visit, ccd) truth dict."""
    fx, fy = meta["focal_plane_centre"]
    fw, _, _ = psf_at(meta["psf"], np.asarray(x) - 1023.5 + fx, np.asarray(y) - 2047.5 + fy)
    return fw
