"""processCcd stages on one full simulated 2048x4096 DECam CCD, steady state (kernels compiled first).

Groups: ``processccd-isr`` (apfast vs the same passes in plain numpy),
``processccd-characterize`` and ``processccd-calibrate`` (each whole stage, every
kernel and Python step included) and ``processccd-characterize+calibrate`` (the
issue's 1.0 s budget). Per-stage numpy/scipy baselines of background, cosmic rays
and detection are in their own bench files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from apfast.ccd.calibrate import mjd_to_epoch, run_calibrate
from apfast.ccd.characterize import run_characterize
from apfast.ccd.isr import amp_params_from_header, run_isr
from apfast.repo.butler import Butler
from apfast.run.config import load_config
from apfast.run.pipeline import _refs, _trim_offset, _trimmed_wcs


@pytest.fixture(scope="module")
def ccd(sim_ccds: dict) -> dict:
    """CCD 35 of the science visit of the session's simulation (conftest.py ``sim_ccds``, read only)."""
    d, summary, repo = sim_ccds["dir"], sim_ccds["summary"], sim_ccds["repo"]
    butler = Butler(repo)
    v = summary.science_visits[0]
    did = {"visit": v, "ccdnum": 35}
    raw = butler.get("raw", did)
    cam = butler.registry.camera
    cfg = load_config()
    isr_cfg = dataclasses.replace(cfg.isr, do_linearize=False)
    cal = {k: butler.get(k, did) for k in ("bias", "flat", "defects", "crosstalk")}
    amps = amp_params_from_header(cam, raw.metadata)
    raw_u16 = np.ascontiguousarray(raw.image.astype(np.uint16))
    isr = run_isr(raw_u16, amps, config=isr_cfg, **cal)
    char = run_characterize(isr.image, isr.mask, isr.variance, config=cfg.characterize)
    row = butler.registry.find_one(did)
    wcs0 = _trimmed_wcs(raw.wcs, _trim_offset(cam, raw.metadata), did)
    cra, cdec = wcs0.all_pix2world([0, 2047, 2047, 0], [0, 0, 4095, 4095], 0)
    corners = ([float(c) % 360 for c in cra], [float(c) for c in cdec])
    astrom = _refs(repo, "gaia", *corners, 0.03, mag_col="G_mag", epoch=mjd_to_epoch(row["mjd"]), did=did)
    photom = _refs(repo, "ps1", *corners, 0.03, mag_col="g_mag", epoch=None, did=did)
    run_calibrate(char.image, char.mask, char.variance, psf=char.psf, psf_sigma=char.psf_sigma, initial_wcs=wcs0,
                  astrom_refs=astrom, photom_refs=photom, config=cfg.calibrate)
    return dict(raw=raw_u16, amps=amps, isr_cfg=isr_cfg, cal=cal, isr=isr, char=char, cfg=cfg, wcs0=wcs0,
                astrom=astrom, photom=photom, dir=Path(d))


@pytest.mark.benchmark(group="processccd-isr")
def test_isr_full_ccd(benchmark, ccd: dict) -> None:
    res = benchmark(run_isr, ccd["raw"], ccd["amps"], config=ccd["isr_cfg"], **ccd["cal"])
    assert res.image.shape == (4096, 2048)


@pytest.mark.benchmark(group="processccd-isr")
def test_isr_numpy_baseline(benchmark, ccd: dict) -> None:
    """The same overscan/crosstalk/trim/bias/flat/variance passes in plain numpy."""
    amps, cal = ccd["amps"], ccd["cal"]

    def numpy_isr(raw: np.ndarray) -> np.ndarray:
        out = np.empty((4096, 2048), np.float32)
        var = np.empty((4096, 2048), np.float32)
        data = {}
        for a in amps:
            sec = raw[a.data_section.slices].astype(np.float32)
            sec -= np.median(raw[a.bias_section.slices], axis=1)[a.data_section.y0 - a.bias_section.y0:][:, None]
            data[a.name] = sec
        for a in amps:
            img = data[a.name].copy()
            for b in amps:
                if b is not a:
                    img -= 1e-3 * data[b.name][:, ::-1]
            if a.flip_x:
                img = img[:, ::-1]
            t = a.trimmed_section.slices
            img = img - cal["bias"][t]
            var[t] = (np.clip(img, 0, None) / a.gain + (a.read_noise / a.gain) ** 2) * a.gain**2 / cal["flat"][t] ** 2
            out[t] = img * a.gain / cal["flat"][t]
        return out

    res = benchmark(numpy_isr, ccd["raw"])
    assert res.shape == (4096, 2048)


@pytest.mark.benchmark(group="processccd-characterize")
def test_characterize_full_ccd(benchmark, ccd: dict) -> None:
    isr = ccd["isr"]
    res = benchmark(run_characterize, isr.image, isr.mask, isr.variance, config=ccd["cfg"].characterize)
    assert res.psf_result.n_stars > 20


@pytest.mark.benchmark(group="processccd-calibrate")
def test_calibrate_full_ccd(benchmark, ccd: dict) -> None:
    ch = ccd["char"]
    res = benchmark(run_calibrate, ch.image, ch.mask, ch.variance, psf=ch.psf, psf_sigma=ch.psf_sigma,
                    initial_wcs=ccd["wcs0"], astrom_refs=ccd["astrom"], photom_refs=ccd["photom"],
                    config=ccd["cfg"].calibrate)
    assert res.astrometry.n_matches > 30


@pytest.mark.benchmark(group="processccd-characterize+calibrate")
def test_characterize_and_calibrate(benchmark, ccd: dict) -> None:
    """The issue's budget: background + CR + detection + PSF + astrometry + zero point on one CCD."""
    isr, cfg = ccd["isr"], ccd["cfg"]

    def both():
        ch = run_characterize(isr.image, isr.mask, isr.variance, config=cfg.characterize)
        return run_calibrate(ch.image, ch.mask, ch.variance, psf=ch.psf, psf_sigma=ch.psf_sigma,
                             initial_wcs=ccd["wcs0"], astrom_refs=ccd["astrom"], photom_refs=ccd["photom"],
                             config=cfg.calibrate)

    res = benchmark.pedantic(both, rounds=5, iterations=1, warmup_rounds=1)
    assert abs(res.photocal.zero_point - 30.8) < 1.0
