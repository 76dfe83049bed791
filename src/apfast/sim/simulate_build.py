"""Random choices and pixel production of the DECam simulator (used by :mod:`apfast.sim.simulate`).

Instrument (per CCD: gains, read noise, saturation, bias structure, flat, defects,
crosstalk), visits (pointing, seeing, sky, zero point), transients, and the
exposure itself: flat field, Poisson noise, cosmic rays, defects, bleeding,
crosstalk, bias and read noise, all through :mod:`apfast.kernels.render`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from apfast.kernels.render import add_cosmic_rays, apply_defects, assemble_raw, bleed_columns
from apfast.sim.simulate_files import write_crosstalk, write_csv, write_defects, write_master
from apfast.sim.simulate_scene import (
    DATA_X0,
    DATA_Y0,
    EXTINCTION,
    FIELD_DEC,
    FIELD_RA,
    KIND_GALAXY,
    KIND_STAR,
    NAMP,
    NX,
    NY,
    PIXEL_SCALE,
    RAW_NX,
    RAW_NY,
    SKY_MAG,
    ZP_1S,
    approx_wcs_header,
    ccd_centre,
    flux_snr,
    make_wcs,
    mjd_to_year,
    positions_at_epoch,
    psf_stamp,
    snr_to_flux,
    true_wcs_header,
)

CALIB_DATE = "2019-03-01T12:00:00"
CALIB_MJD = 58543.5
RENDER_KEYS = ("id", "x", "y", "flux", "kind", "re_px", "q", "pa")


# ----------------------------------------------------------------------------------------- instrument


def build_ccd_instrument(rng: np.random.Generator, ccdnum: int, camera: Any, filters: Sequence[str]) -> dict[str, Any]:
    """Fixed properties of one CCD: amplifiers, crosstalk, defects, 2-D bias structure and flats."""
    fx, fy = ccd_centre(camera, ccdnum)
    amps = {}
    for a in ("A", "B"):
        amps[a] = {
            "gain": float(rng.uniform(3.8, 4.4)),
            "read_noise_e": float(rng.uniform(6.0, 7.5)),
            "saturation_adu": float(np.round(rng.uniform(42000, 46000))),
            "bias_base_adu": float(rng.uniform(1000, 3000)),
        }
    xt = {"A<-B": float(rng.uniform(1e-3, 3e-3)), "B<-A": float(rng.uniform(1e-3, 3e-3))}
    defects = []
    for k in range(3):  # bad columns (full or partial height)
        x0 = int(rng.integers(40, NX - 40))
        full = k == 0
        y0 = 0 if full else int(rng.integers(0, NY // 2))
        h = NY if full else int(rng.integers(300, NY - y0))
        hot = k == 1
        defects.append({"x0": x0, "y0": y0, "width": 1, "height": h, "kind": "hot" if hot else "dead",
                        "value": float(rng.uniform(3000, 15000)) if hot else 0.03})
    for k in range(3):  # bad boxes
        w, h = int(rng.integers(2, 20)), int(rng.integers(2, 20))
        defects.append({"x0": int(rng.integers(40, NX - 60)), "y0": int(rng.integers(40, NY - 60)), "width": w,
                        "height": h, "kind": "hot" if k == 0 else "dead",
                        "value": float(rng.uniform(3000, 15000)) if k == 0 else 0.03})
    xs = (np.arange(NX) - 1023.5) / 1024.0
    ys = (np.arange(NY) - 2047.5) / 2048.0
    c1, c2 = rng.uniform(-2, 2, 2)
    bias2d = (c1 * (xs[None, :] ** 2 - 1.0 / 3.0) + c2 * ys[:, None] + rng.normal(0, 0.3, NX)[None, :]
              + rng.normal(0, 0.5, (NY, NX))).astype(np.float32)
    # flat: vignetting over the focal plane, a per-CCD QE tilt, amp QE offsets, pixel-to-pixel 0.5%
    u = xs * 1024.0 + fx
    v = ys * 2048.0 + fy
    r2 = (u[None, :] ** 2 + v[:, None] ** 2) / 15000.0**2
    tx, ty = rng.uniform(-0.02, 0.02, 2)
    large = (1.0 - 0.04 * r2) * (1.0 + tx * xs[None, :] + ty * ys[:, None])
    large[:, :NAMP] *= 1.0 + rng.uniform(-0.01, 0.01)
    large[:, NAMP:] *= 1.0 + rng.uniform(-0.01, 0.01)
    common = rng.normal(0, 1, (NY, NX)).astype(np.float32)
    flats = {}
    for f in filters:
        pix = 0.8 * common + 0.6 * rng.normal(0, 1, (NY, NX)).astype(np.float32)
        flats[f] = (large * (1.0 + 0.005 * pix)).astype(np.float32)
    return {
        "ccdnum": ccdnum, "detector": camera.detector_name(ccdnum), "focal_plane_centre": [fx, fy],
        "amps": amps, "crosstalk": xt, "defects": defects, "bias2d": bias2d, "flats": flats,
        "wcs_jitter_arcsec": [float(x) for x in rng.normal(0, 0.15, 2)],
    }


def write_calibs(calib_dir: Path, inst: Mapping[int, Mapping[str, Any]], camera: Any,
                 rng: np.random.Generator) -> dict[str, Any]:
    """Master bias, per-filter dome flats, defects and the crosstalk text, all dated :data:`CALIB_DATE`."""
    ccds = sorted(inst)
    tag = CALIB_DATE[:10].replace("-", "")
    bias = calib_dir / f"bias_{tag}.fits"
    write_master(bias, "zero", CALIB_DATE, CALIB_MJD,
                 [(c, inst[c]["detector"], inst[c]["bias2d"] + rng.normal(0, 0.15, (NY, NX)).astype(np.float32))
                  for c in ccds])
    flats = {}
    for f in inst[ccds[0]]["flats"]:
        p = calib_dir / f"flat_{f}_{tag}.fits"
        write_master(p, "dome flat", CALIB_DATE, CALIB_MJD,
                     [(c, inst[c]["detector"],
                       inst[c]["flats"][f] * (1.0 + rng.normal(0, 3e-4, (NY, NX))).astype(np.float32)) for c in ccds],
                     filt=f)
        flats[f] = p
    defects = calib_dir / f"defects_{tag}.fits"
    write_defects(defects, CALIB_DATE, CALIB_MJD,
                  [(c, inst[c]["detector"], [[d["x0"], d["y0"], d["width"], d["height"]] for d in inst[c]["defects"]])
                   for c in ccds])
    coeffs = {}
    for c in sorted(camera.detectors):  # the file covers every CCD, like DECam's
        if c in inst:
            coeffs[c] = inst[c]["crosstalk"]
        else:
            coeffs[c] = {"A<-B": float(rng.uniform(1e-3, 3e-3)), "B<-A": float(rng.uniform(1e-3, 3e-3))}
    xtalk = calib_dir / f"DECam_xtalk_{tag}.txt"
    write_crosstalk(xtalk, CALIB_DATE[:10], coeffs)
    return {"bias": bias, "flats": flats, "defects": defects, "crosstalk": xtalk}


# ---------------------------------------------------------------------------------------------- visits


def build_visits(rng: np.random.Generator, filters: Sequence[str], n_template: int,
                 n_science: int) -> list[dict[str, Any]]:
    """Visit list: templates in March 2019 (seeing 0.9-1.0"), science in March 2020 (1.0-1.6")."""
    from astropy.time import Time

    sip = {"k": 3e-12, **{k: float(rng.normal(0, 1e-8)) for k in ("a20", "a11", "a02", "b20", "b11", "b02")}}
    visits = []
    it = iscience = 0
    for fi, f in enumerate(filters):
        for epoch, n in (("template", n_template), ("science", n_science)):
            for i in range(n):
                if epoch == "template":
                    start = datetime(2019, 3, 5, 5, 0, 0) + timedelta(days=i)
                    expnum = 288900 + it
                    it += 1
                else:
                    start = datetime(2020, 3, 1, 5, 0, 0) + timedelta(days=2 * i)
                    expnum = 289400 + iscience
                    iscience += 1
                start += timedelta(minutes=15 * fi, seconds=float(rng.uniform(0, 600)))
                date_obs = start.strftime("%Y-%m-%dT%H:%M:%S.%f")
                mjd = float(Time(date_obs, format="isot", scale="utc").mjd)
                exptime = 90.0 if epoch == "template" else 60.0
                airmass = float(rng.uniform(1.05, 1.4))
                zp = ZP_1S[f] + 2.5 * math.log10(exptime) - EXTINCTION[f] * (airmass - 1.0) - abs(rng.normal(0, 0.04))
                sky_mag = SKY_MAG[f] + float(rng.normal(0, 0.3))
                seeing = float(rng.uniform(0.9, 1.0) if epoch == "template" else rng.uniform(1.0, 1.6))
                off = rng.normal(1.0, 0.25)
                ang = rng.uniform(0, 2 * math.pi)
                psf = {
                    "model": "double_gaussian", "core_fraction": 0.85, "wing_sigma_ratio": 2.0,
                    "fwhm0_arcsec": seeing, "fwhm0_px": seeing / PIXEL_SCALE,
                    "cu": float(rng.choice([-1, 1]) * rng.uniform(0.06, 0.14)),
                    "cv": float(rng.choice([-1, 1]) * rng.uniform(0.06, 0.14)),
                    "cr": float(rng.uniform(0.0, 0.05)),
                    **{k: float(rng.normal(0, 0.03)) for k in ("e1_0", "e1_u", "e1_v", "e2_0", "e2_u", "e2_v")},
                    "formula": ("fwhm0_px*(1+cu*u/1e4+cv*v/1e4+cr*(u^2+v^2)/1e8); "
                                "e1=e1_0+e1_u*u/1e4+e1_v*v/1e4 (e2 alike)"),
                }
                visits.append({
                    "visit": expnum, "filter": f, "epoch": epoch, "date_obs": date_obs, "mjd": mjd,
                    "year": mjd_to_year(mjd), "exptime": exptime, "airmass": airmass,
                    "ra": FIELD_RA + rng.normal(0, 8.0) / 3600.0 / math.cos(math.radians(FIELD_DEC)),
                    "dec": FIELD_DEC + rng.normal(0, 8.0) / 3600.0, "rot_deg": float(rng.normal(0, 0.01)),
                    "sip": sip, "hdr_offset_arcsec": [off * math.cos(ang), off * math.sin(ang)],
                    "seeing_fwhm_arcsec": seeing, "psf": psf, "zero_point_e": zp, "sky_mag_arcsec2": sky_mag,
                    "sky_e": 10 ** (-0.4 * (sky_mag - zp)) * PIXEL_SCALE**2,
                    "sky_gu": float(rng.uniform(-0.02, 0.02)), "sky_gv": float(rng.uniform(-0.02, 0.02)),
                    "filename": start.strftime("c4d_%y%m%d_%H%M%S_ori.fits.fz"),
                    "object": "apfast-sim field", "bias_jitter": {c: {"A": float(rng.normal(0, 3)),
                                                                      "B": float(rng.normal(0, 3))}
                                                                  for c in range(1, 63)},
                })
    return visits


def ccd_wcs(v: Mapping[str, Any], fx: float, fy: float, ins: Mapping[str, Any]) -> tuple[dict, dict, dict]:
    """``(true TAN-SIP on the trimmed grid, header TAN on the trimmed grid, header TAN on the raw grid)``."""
    true = true_wcs_header(v["ra"], v["dec"], v["rot_deg"], fx, fy, v["sip"])
    dra = v["hdr_offset_arcsec"][0] + ins["wcs_jitter_arcsec"][0]
    ddec = v["hdr_offset_arcsec"][1] + ins["wcs_jitter_arcsec"][1]
    return true, approx_wcs_header(true, dra, ddec, raw=False), approx_wcs_header(true, dra, ddec, raw=True)


# ------------------------------------------------------------------------------------------ render lists


def _empty_list() -> dict[str, np.ndarray]:
    return {"id": np.zeros(0, np.int64), "x": np.zeros(0), "y": np.zeros(0), "flux": np.zeros(0),
            "kind": np.zeros(0, np.int64), "re_px": np.zeros(0), "q": np.zeros(0), "pa": np.zeros(0)}


def transient_render_list(entries: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Render-list arrays from a list of per-source dicts (keys of :data:`RENDER_KEYS`)."""
    if not entries:
        return _empty_list()
    out = {k: np.array([e[k] for e in entries]) for k in RENDER_KEYS}
    out["id"] = out["id"].astype(np.int64)
    out["kind"] = out["kind"].astype(np.int64)
    for k in ("x", "y", "flux", "re_px", "q", "pa"):
        out[k] = out[k].astype(np.float64)
    return out


def static_render_list(cat: Mapping[str, np.ndarray], v: Mapping[str, Any],
                       meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Catalogue sources on (or near) the CCD at the visit epoch: pixel positions and electrons."""
    ra, dec = positions_at_epoch(cat, v["year"])
    x, y = make_wcs(meta["true_wcs"]).all_world2pix(ra, dec, 0)
    m = 300.0
    keep = np.flatnonzero((x > -m) & (x < NX + m) & (y > -m) & (y < NY + m))
    flux = 10 ** (-0.4 * (cat[v["filter"]][keep] - v["zero_point_e"]))
    return {
        "id": cat["id"][keep], "x": x[keep], "y": y[keep], "flux": flux, "kind": cat["kind"][keep],
        "re_px": cat["re_arcsec"][keep] / PIXEL_SCALE, "q": cat["q"][keep], "pa": np.radians(cat["pa_deg"][keep]),
    }


def choose_transients(rng: np.random.Generator, cat: Mapping[str, np.ndarray], v: Mapping[str, Any],
                      ins: Mapping[str, Any], ccdnum: int, *, n_hosted: int = 20, n_hostless: int = 20,
                      n_variable: int = 12, n_moving: int = 6) -> dict[str, Any]:
    """Fixed transient sites of one CCD, chosen on the first science visit's true WCS."""
    fx, fy = ins["focal_plane_centre"]
    true, _, _ = ccd_wcs(v, fx, fy, ins)
    wcs = make_wcs(true)
    ra, dec = positions_at_epoch(cat, v["year"])
    x, y = wcs.all_world2pix(ra, dec, 0)
    e = 100.0
    inside = (x > e) & (x < NX - e) & (y > e) & (y < NY - e)
    gal = np.flatnonzero(inside & (cat["kind"] == KIND_GALAXY) & (cat["g"] < 22.5))
    hosts = rng.choice(gal, size=min(n_hosted, gal.size), replace=False) if gal.size else np.zeros(0, int)
    base = 10_000_000 + ccdnum * 10_000
    sites = []
    for n, h in enumerate(hosts):
        r = cat["re_arcsec"][h] / PIXEL_SCALE * rng.uniform(0.3, 1.5)
        a = rng.uniform(0, 2 * math.pi)
        sites.append(("hosted", base + n, x[h] + r * math.cos(a), y[h] + r * math.sin(a), int(cat["id"][h])))
    for n in range(n_hostless):
        sites.append(("hostless", base + 1000 + n, rng.uniform(e, NX - e), rng.uniform(e, NY - e), -1))
    sx = np.array([s[2] for s in sites])
    sy = np.array([s[3] for s in sites])
    sra, sdec = wcs.all_pix2world(sx, sy, 0) if sites else (np.zeros(0), np.zeros(0))
    fixed = [{"kind": s[0], "id": s[1], "ra": float(r), "dec": float(d), "host_id": s[4]}
             for s, r, d in zip(sites, sra, sdec, strict=True)]
    stars = np.flatnonzero(inside & (cat["kind"] == KIND_STAR) & (cat["g"] > 17.0) & (cat["g"] < 21.0))
    var = rng.choice(stars, size=min(n_variable, stars.size), replace=False) if stars.size else np.zeros(0, int)
    variables = [{"kind": "variable_brighten" if k % 2 == 0 else "variable_fade", "id": int(cat["id"][s])}
                 for k, s in enumerate(var)]
    return {"fixed": fixed, "variables": variables, "variable_ids": [d["id"] for d in variables],
            "n_moving": n_moving, "moving_base": 20_000_000 + ccdnum * 100}


def science_transients(rng: np.random.Generator, d: Mapping[str, Any], v: Mapping[str, Any], meta: Mapping[str, Any],
                       static: Mapping[str, np.ndarray], static_img: np.ndarray, n_template: int):
    """Transients of one science (visit, ccd): render list and truth rows; fluxes from target S/N in [3, 100].

    ``static_img`` is the rendered static scene (electrons, before the flat field).
    """
    wcs = make_wcs(meta["true_wcs"])
    amps = meta["amps"]
    zp = v["zero_point_e"]
    njy_per_e = 10 ** (-0.4 * (zp - 31.4))
    todo: list[tuple[str, int, float, float, int, float, tuple[float, float] | None]] = []
    # (kind, id, x, y, host_id, base_adu_or_nan, trail)
    if d["fixed"]:
        fx_, fy_ = wcs.all_world2pix(np.array([s["ra"] for s in d["fixed"]]),
                                     np.array([s["dec"] for s in d["fixed"]]), 0)
        for s, x, y in zip(d["fixed"], fx_, fy_, strict=True):
            todo.append((s["kind"], s["id"], float(x), float(y), s["host_id"], math.nan, None))
    pos = {int(i): k for k, i in enumerate(static["id"])}
    for s in d["variables"]:
        k = pos[s["id"]]
        todo.append((s["kind"], s["id"], float(static["x"][k]), float(static["y"][k]), -1,
                     float(static["flux"][k]), None))
    for n in range(d["n_moving"]):
        rate = rng.uniform(0.2, 0.8) * v["exptime"] / 60.0 / PIXEL_SCALE  # trail length in px
        todo.append(("moving", d["moving_base"] + n, rng.uniform(100, NX - 100), rng.uniform(100, NY - 100), -1,
                     math.nan, (rate, rng.uniform(0, math.pi))))
    entries, rows = [], []
    for kind, tid, x, y, host, base_e, trail in todo:
        amp = "B" if x < NAMP - 0.5 else "A"
        gain = amps[amp]["gain"]
        rn = amps[amp]["read_noise_e"] / gain
        fwhm = float(_fwhm(meta, x, y))
        half = int(3 * fwhm) + 2
        stamp, i0, j0 = psf_stamp(meta, x, y, half)
        if i0 < 0 or j0 < 0 or i0 + 2 * half + 1 > NY or j0 + 2 * half + 1 > NX:
            continue
        cut = static_img[i0:i0 + 2 * half + 1, j0:j0 + 2 * half + 1].astype(np.float64) / gain
        var = cut / gain + rn * rn
        snr = float(10 ** rng.uniform(math.log10(3.0), 2.0))
        sign = -1 if kind == "variable_fade" else 1
        f_adu = snr_to_flux(stamp, var, gain, snr, n_template, sign)
        if sign < 0 and -f_adu > 0.9 * base_e / gain:
            f_adu = -0.9 * base_e / gain
            snr = flux_snr(stamp, var, gain, f_adu, n_template)
        f_e = f_adu * gain
        if trail is None:
            entries.append({"id": tid, "x": x, "y": y, "flux": f_e, "kind": KIND_STAR,
                            "re_px": 0.0, "q": 1.0, "pa": 0.0})
            tlen = 0.0
        else:
            tlen, ang = trail
            nsub = max(1, int(math.ceil(2 * tlen)))
            for k in range(nsub):
                t = (k + 0.5) / nsub - 0.5
                entries.append({"id": tid, "x": x + t * tlen * math.cos(ang), "y": y + t * tlen * math.sin(ang),
                                "flux": f_e / nsub, "kind": KIND_STAR, "re_px": 0.0, "q": 1.0, "pa": 0.0})
        ra, dec = wcs.all_pix2world(np.array([x]), np.array([y]), 0)
        rows.append({
            "visit": v["visit"], "ccdnum": meta["ccdnum"], "detector": meta["detector"], "id": tid, "kind": kind,
            "ra": float(ra[0]), "dec": float(dec[0]), "x": x, "y": y, "amp": amp, "flux_adu": f_adu, "flux_e": f_e,
            "flux_njy": f_e * njy_per_e, "mag": zp - 2.5 * math.log10(f_e) if f_e > 0 else math.nan,
            "snr_expected": snr, "host_id": host, "base_flux_adu": base_e / gain, "trail_px": tlen,
            "psf_fwhm_px": fwhm,
        })
    return transient_render_list(entries), rows


def _fwhm(meta: Mapping[str, Any], x: float, y: float) -> float:
    from apfast.sim.simulate_scene import psf_at

    fx, fy = meta["focal_plane_centre"]
    return float(psf_at(meta["psf"], np.array([x - 1023.5 + fx]), np.array([y - 2047.5 + fy]))[0][0])


# -------------------------------------------------------------------------------------------- exposure


def expose_ccd(rng: np.random.Generator, meta: Mapping[str, Any], ins: Mapping[str, Any], img_e: np.ndarray,
               static: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
    """Turn the noiseless electron image into a raw uint16 CCD frame (``img_e`` is overwritten).

    Order: flat field, Poisson noise, cosmic rays, defects, saturation and bleeding (electrons);
    then per amplifier ``/ gain``, crosstalk, bias (level, row pattern, 2-D structure) and read noise.
    """
    amps = meta["amps"]
    img_e *= ins["flats"][meta["filter"]]
    e = rng.poisson(img_e).astype(np.float32)
    ncr = int(rng.poisson(1.2 * meta["exptime"]))
    track = rng.random(ncr) < 0.75
    length = np.where(track, rng.uniform(2, 40, ncr), 0.0)
    dep = np.where(track, rng.uniform(600, 3000, ncr), rng.uniform(2000, 15000, ncr))
    width = np.where(track, rng.uniform(0, 0.3, ncr), rng.uniform(0.2, 0.6, ncr))
    crmask = np.zeros((NY, NX), np.uint8)
    add_cosmic_rays(e, crmask, rng.uniform(0, NX, ncr), rng.uniform(0, NY, ncr), length,
                    rng.uniform(0, 2 * math.pi, ncr), dep, width)
    dd = meta["defects"]
    apply_defects(e, *(np.array([d[k] for d in dd], np.int64) for k in ("x0", "y0", "width", "height")),
                  np.array([0 if d["kind"] == "dead" else 1 for d in dd], np.int64),
                  np.array([d["value"] for d in dd], np.float64))
    rows = np.arange(RAW_NY) / RAW_NY
    bias_rows = {}
    for a in ("A", "B"):
        level = amps[a]["bias_level_adu"]
        drift = rng.uniform(-4, 4) * (rows - 0.5) + rng.uniform(0.5, 1.5) * np.sin(
            2 * math.pi * rows * RAW_NY / rng.uniform(800, 3000) + rng.uniform(0, 2 * math.pi))
        bias_rows[a] = level + drift + rng.normal(0, 0.3, RAW_NY)
    fw = {a: (amps[a]["saturation_adu"] - bias_rows[a][DATA_Y0:].min() + 30.0) * amps[a]["gain"] for a in ("A", "B")}
    bleed_columns(e, fw["A"], fw["B"], NAMP)
    sig_b = np.ascontiguousarray(e[:, :NAMP]) / np.float32(amps["B"]["gain"])
    sig_a = np.ascontiguousarray(e[:, NAMP:]) / np.float32(amps["A"]["gain"])
    noise = rng.standard_normal((RAW_NY, RAW_NX), dtype=np.float32)
    raw = np.empty((RAW_NY, RAW_NX), np.uint16)
    xt = meta["crosstalk"]
    assemble_raw(sig_b, sig_a, bias_rows["B"], bias_rows["A"], ins["bias2d"], noise,
                 amps["B"]["read_noise_e"] / amps["B"]["gain"], amps["A"]["read_noise_e"] / amps["A"]["gain"],
                 xt["B<-A"], xt["A<-B"], amps["B"]["saturation_adu"], amps["A"]["saturation_adu"],
                 DATA_X0, DATA_Y0, raw)
    data = raw[DATA_Y0:, DATA_X0:DATA_X0 + NX]
    sat = np.empty((NY, NX), bool)
    sat[:, :NAMP] = data[:, :NAMP] >= amps["B"]["saturation_adu"]
    sat[:, NAMP:] = data[:, NAMP:] >= amps["A"]["saturation_adu"]
    trails = []
    for x in np.flatnonzero(sat.any(axis=0)):
        col = np.concatenate([[0], sat[:, x].astype(np.int8), [0]])
        dcol = np.diff(col)
        for y0, y1 in zip(np.flatnonzero(dcol == 1), np.flatnonzero(dcol == -1) - 1, strict=True):
            if y1 - y0 >= 4:
                trails.append([int(x), int(y0), int(y1)])
    xi = np.clip(np.floor(static["x"] + 0.5).astype(int), 0, NX - 1)
    yi = np.clip(np.floor(static["y"] + 0.5).astype(int), 0, NY - 1)
    on = (static["x"] > -0.5) & (static["x"] < NX - 0.5) & (static["y"] > -0.5) & (static["y"] < NY - 0.5)
    return raw, {
        "cr_index": np.flatnonzero(crmask.ravel()).astype(np.int32),
        "sat_index": np.flatnonzero(sat.ravel()).astype(np.int32),
        "bias_rows": np.stack([bias_rows["A"], bias_rows["B"]]).astype(np.float32),
        "n_cr": ncr, "bleed_trails": trails, "saturated_sources": on & sat[yi, xi],
    }


# --------------------------------------------------------------------------------------------- refcats


def decam_to_ps1(mags: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PS1 magnitudes of stars whose DECam magnitudes are ``mags``: the DECam camera's colour terms inverted.

    The images are rendered in DECam's natural system; a real PS1 catalogue differs from it by the
    colour terms ``m_DECam = m_PS1 + f(g_PS1 - i_PS1)`` the DECam description carries, so the simulated
    PS1 catalogue does too (fixed-point iteration: the terms change the colour by < 0.05 mag).
    """
    from apfast.camera import get_camera

    terms = {}
    for t in get_camera("DECam").colour_terms:
        band, colour, coeffs = t.split(":")
        terms[band] = (colour.split("-"), [float(c) for c in coeffs.split(",")])
    ps1 = {b: np.asarray(v, float).copy() for b, v in mags.items()}
    for _ in range(12):  # contracts by ~0.05 per round
        new = dict(ps1)
        for b, ((r1, r2), c) in terms.items():
            if b in mags and r1 in ps1 and r2 in ps1:
                x = ps1[r1] - ps1[r2]
                new[b] = np.asarray(mags[b], float) - np.polyval(c[::-1], x)
        ps1 = new
    return ps1


def write_refcats(ref_dir: Path, rng: np.random.Generator, cat: Mapping[str, np.ndarray]):
    """Gaia-like (G <= 20.5, epoch 2016.0) and PS1-like (g or r <= 22, epoch 2012) CSVs; 3% missing, 2% extra."""
    n = cat["id"].size
    star = cat["kind"] == KIND_STAR
    gr = cat["g"] - cat["r"]
    G = cat["g"] - 0.1 - 0.55 * gr
    in_gaia = star & (G <= 20.5) & (rng.random(n) > 0.03)
    idx = np.flatnonzero(in_gaia)
    pos_err = 0.02 + 0.3 * 10 ** (0.2 * (G[idx] - 17.0))  # mas
    dec0 = np.radians(cat["dec"][idx])
    nex = int(0.02 * idx.size) + 1
    ex_ra = rng.uniform(cat["ra"].min(), cat["ra"].max(), nex)
    ex_dec = rng.uniform(cat["dec"].min(), cat["dec"].max(), nex)
    ex_G = rng.uniform(17.0, 20.5, nex)
    gaia = {
        "source_id": np.concatenate([3_800_000_000_000_000_000 + cat["id"][idx] * 1000,
                                     3_900_000_000_000_000_000 + np.arange(nex) * 1000]),
        "ra": np.concatenate([cat["ra"][idx] + rng.normal(0, pos_err) / 3.6e6 / np.cos(dec0), ex_ra]),
        "dec": np.concatenate([cat["dec"][idx] + rng.normal(0, pos_err) / 3.6e6, ex_dec]),
        "ra_error": np.concatenate([pos_err, 0.02 + 0.3 * 10 ** (0.2 * (ex_G - 17.0))]),
        "dec_error": np.concatenate([pos_err, 0.02 + 0.3 * 10 ** (0.2 * (ex_G - 17.0))]),
        "pmra": np.concatenate([cat["pmra"][idx] + rng.normal(0, 1.2 * pos_err), rng.normal(0, 4, nex)]),
        "pmdec": np.concatenate([cat["pmdec"][idx] + rng.normal(0, 1.2 * pos_err), rng.normal(0, 4, nex)]),
        "ref_epoch": np.full(idx.size + nex, 2016.0),
        "phot_g_mean_mag": np.concatenate([G[idx] + rng.normal(0, 0.002, idx.size), ex_G]),
        "phot_bp_mean_mag": np.concatenate([G[idx] + 0.3 + 0.35 * gr[idx], ex_G + 0.6]),
        "phot_rp_mean_mag": np.concatenate([G[idx] - 0.5 - 0.4 * gr[idx], ex_G - 0.8]),
    }
    gaia_path = ref_dir / "gaia.csv"
    write_csv(gaia_path, gaia)
    in_ps1 = star & ((cat["g"] <= 22.0) | (cat["r"] <= 22.0)) & (rng.random(n) > 0.03)
    idx = np.flatnonzero(in_ps1)
    ra12, dec12 = positions_at_epoch(cat, 2012.0)
    nex = int(0.02 * idx.size) + 1
    ps1 = {
        "obj_id": np.concatenate([108_000_000_000_000_000 + cat["id"][idx], 109_000_000_000_000_000 + np.arange(nex)]),
        "ra": np.concatenate([ra12[idx] + rng.normal(0, 15, idx.size) / 3.6e6 / np.cos(np.radians(dec12[idx])),
                              rng.uniform(cat["ra"].min(), cat["ra"].max(), nex)]),
        "dec": np.concatenate([dec12[idx] + rng.normal(0, 15, idx.size) / 3.6e6,
                               rng.uniform(cat["dec"].min(), cat["dec"].max(), nex)]),
    }
    ex_g = rng.uniform(19.0, 22.0, nex)
    ps1_mag = decam_to_ps1({b: np.asarray(cat[b], float)[idx] for b in ("g", "r", "i", "z")})
    for b, ex in (("g", ex_g), ("r", ex_g - 0.6), ("i", ex_g - 0.9), ("z", ex_g - 1.0)):
        m = ps1_mag[b]
        err = np.sqrt(0.005**2 + (0.1 * 10 ** (0.4 * (m - 22.0))) ** 2)
        obs = m + rng.normal(0, 1, idx.size) * err
        det = m < 23.3
        allm = np.concatenate([np.where(det, obs, np.nan), ex])
        alle = np.concatenate([np.where(det, err, np.nan), np.full(nex, 0.05)])
        ps1[f"{b}_mean_psf_mag"] = allm
        ps1[f"{b}_mean_psf_mag_error"] = alle
    ps1_path = ref_dir / "ps1.csv"
    write_csv(ps1_path, ps1)
    return in_gaia, in_ps1, gaia_path, ps1_path
