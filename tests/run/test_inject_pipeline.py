"""The injection glue of `apfast process` (apfast.run.inject) on small synthetic exposures: fast, no pipeline run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.wcs import WCS

from apfast.ccd.inject import InjectConfig
from apfast.exposure import Exposure, PhotoCalib
from apfast.masks import bitmask
from apfast.psf import GaussianPsf
from apfast.repo.butler import Butler
from apfast.run.config import load_config
from apfast.run.inject import dia_products, inject_for_difference

DID = {"visit": 7, "ccdnum": 35}


def _exposure(rng: np.random.Generator, zp: float) -> Exposure:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval, w.wcs.crpix = [150.0, 2.0], [100.0, 100.0]
    w.wcs.cdelt = [-0.263 / 3600, 0.263 / 3600]
    img = rng.normal(0.0, 5.0, (200, 200)).astype(np.float32)
    return Exposure(img, np.zeros(img.shape, np.int32), np.full(img.shape, 25.0, np.float32), wcs=w,
                    psf=GaussianPsf(1.8, 25), photo_calib=PhotoCalib(zp))


def test_inject_for_difference_and_reinjection(tmp_path: Path, rng: np.random.Generator) -> None:
    (tmp_path / "out").mkdir()
    butler = Butler(tmp_path / "out")
    calexp, template = _exposure(rng, 30.0), _exposure(rng, 31.4)
    butler.put(calexp, "calexp", DID)
    cfg = InjectConfig(n_per_ccd=12, template_fraction=0.5, seed=2)
    sci, tmpl, cat = inject_for_difference(butler, calexp, template, **DID, config=cfg)
    stored = butler.get("injected_catalog", DID)
    assert len(stored) == 12 and np.array_equal(stored["ra"], cat["ra"])
    assert stored["on_template"].sum() == cat["on_template"].sum() > 0
    # template fakes: INJECTED_TEMPLATE on the template, in its own units (nJy: zero point 31.4)
    both = np.asarray(cat["on_template"] & cat["injected"])
    assert ((tmpl.mask & bitmask("INJECTED_TEMPLATE")) != 0).any() and not (template.mask != 0).any()
    t_added = float(np.sum(tmpl.image.astype(float) - template.image))
    assert abs(t_added / np.sum(np.asarray(cat["flux_nJy"])[both]) - 1) < 0.01
    # the DIA stage reading the calexp from disk gets the very same pixels, noise included
    again = dia_products(butler, DID, cfg, {})["calexp"]
    assert np.array_equal(again.image, sci.image) and np.array_equal(again.mask, sci.mask)
    assert np.array_equal(again.variance, sci.variance)
    # a calexp handed over in memory, or injection off, passes through untouched
    have = {"calexp": sci}
    assert dia_products(butler, DID, cfg, have) is have
    assert dia_products(butler, DID, InjectConfig(), {}) == {}


def test_injection_is_off_by_default() -> None:
    cfg = load_config()
    assert not cfg.inject.enabled
    assert load_config((), ["inject.n_per_ccd=20", "inject.mag_range=[19, 23]"]).inject.mag_range == (19.0, 23.0)
