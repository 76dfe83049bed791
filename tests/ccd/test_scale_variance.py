"""Variance rescaling to the measured sky noise (Rubin ScaleVarianceTask): statistical truth, limits, config."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from apfast.ccd.scale_variance import ScaleVarianceConfig, measure_variance_scale, scale_variance
from apfast.errors import ConfigError
from apfast.masks import bitmask


def sky(rng, *, sigma=1.1, var=1.0, shape=(300, 300)):
    img = rng.normal(0, sigma, shape).astype(np.float32)
    return img, np.full(shape, var, np.float32), np.zeros(shape, np.int32)


def test_ratio_is_the_squared_pull_width_and_sources_are_left_out(rng):
    img, var, mask = sky(rng, sigma=1.1, var=4.0)
    img *= 2.0  # sky sigma 2.2, variance plane says 2: ratio 1.21
    # bright sources and a saturated block marked in the mask do not count
    img[:50, :50] += 500.0
    mask[:50, :50] = bitmask("DETECTED")
    img[60:70, :] = 6e4
    mask[60:70, :] = bitmask("SAT")
    before = var.copy()
    new, vs = scale_variance(img, var, mask)
    n = img.size - 50 * 50 - 10 * 300
    assert vs.n_pixels == n and vs.applied
    # the IQR width of n Gaussian pulls has a relative error ~1.17 / sqrt(n); the ratio twice that
    assert vs.ratio == pytest.approx(1.21, rel=2 * 2 * 1.17 / np.sqrt(n))
    assert new.dtype == np.float32 and np.allclose(new, before * vs.factor)
    assert np.array_equal(var, before)  # input untouched
    assert vs.header_cards()["VARSCALE"][0] == pytest.approx(vs.factor, abs=1e-5)


def test_within_tolerance_too_few_pixels_and_beyond_max_ratio_keep_the_variance(rng, caplog):
    img, var, mask = sky(rng, sigma=1.01)
    new, vs = scale_variance(img, var, mask)
    assert new is var and not vs.applied and "tolerance" in vs.reason
    mask[:, :297] = bitmask("BAD")
    with caplog.at_level(logging.WARNING, logger="apfast.ccd.scale_variance"):
        new, vs = scale_variance(img, var, mask)
    assert new is var and np.isnan(vs.ratio) and "VARRATIO" not in vs.header_cards()
    assert "only 900 usable sky pixels (need 1000)" in caplog.text
    img, var, mask = sky(rng, sigma=5.0)  # variance 25x too small: a wrong gain, not missing noise
    vs = measure_variance_scale(img, var, mask)
    assert vs.factor == 1.0 and vs.ratio > 10 and "beyond max_ratio = 10" in vs.reason
    vs = measure_variance_scale(img, var, mask, config=ScaleVarianceConfig(max_ratio=30.0))
    assert vs.factor == pytest.approx(25.0, rel=0.05)


def test_config_choices_and_errors():
    assert [ScaleVarianceConfig(apply=a).applies_to("weight") for a in ("gain", "calibrated", "always", "never")] == [
        False, True, True, False]
    assert ScaleVarianceConfig(apply="always").applies_to("isr") and not ScaleVarianceConfig().applies_to("isr")
    with pytest.raises(ConfigError, match=r"characterize\.scale_variance\.tolerance = -0\.1 is invalid; allowed"):
        ScaleVarianceConfig(tolerance=-0.1)
    with pytest.raises(ConfigError, match=r"characterize\.scale_variance\.mask_planes has unknown mask planes"):
        ScaleVarianceConfig(mask_planes=("DETECTD",))
