"""Amp-to-amp background steps: measured against a known step, the cause named, pedestals that remove it."""

from __future__ import annotations

import numpy as np
import pytest

from apfast.camera import Section
from apfast.ccd.ampoffset import AmpOffsetConfig, measure_amp_offsets
from apfast.errors import ConfigError
from apfast.masks import bitmask

# DECam's layout: amp B on the left half, amp A on the right half of the 2048x4096 CCD
AMPS = {"A": Section(1024, 2048, 0, 4096), "B": Section(0, 1024, 0, 4096)}


def _ccd(sky_a: float, sky_b: float, *, seed: int = 1, stars: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.normal(0.0, 1.0, (4096, 2048)).astype(np.float32) * np.float32(np.sqrt(1000.0))
    img[:, 1024:] += np.float32(sky_a)
    img[:, :1024] += np.float32(sky_b)
    yy, xx = rng.integers(5, 4090, stars), rng.integers(990, 1060, stars)  # stars on the boundary strips
    for y, x in zip(yy, xx, strict=True):
        img[y - 2 : y + 3, x - 2 : x + 3] += 5000.0
    mask = np.zeros(img.shape, np.int32)
    mask[100:140, 1000:1050] = bitmask("SAT")
    img[100:140, 1000:1050] = 60000.0  # a bleed across the boundary: masked, ignored
    return img, mask


def test_a_multiplicative_step_is_measured_and_blamed_on_the_flat() -> None:
    img, mask = _ccd(1060.0, 1000.0)  # amp A 6% high: a flat made in ADU with the gains applied again
    res = measure_amp_offsets(img, mask, AMPS)
    (st,) = res.steps
    assert (st.first, st.second) == ("A", "B")
    assert st.step == pytest.approx(-60.0, abs=1.5) and st.fraction == pytest.approx(-0.058, abs=0.003)
    assert st.error < 1.0 and st.n_bins == 32
    (warning,) = res.warnings
    assert "amps A and B" in warning and "gain ratios" in warning and "isr.do_apply_gains=false" in warning
    # pedestals remove the step with their mean at zero
    assert res.pedestals["A"] - res.pedestals["B"] == pytest.approx(60.0, abs=1.5)
    assert res.pedestals["A"] + res.pedestals["B"] == pytest.approx(0.0, abs=1e-6)


def test_a_small_additive_step_is_blamed_on_the_bias_and_none_is_silent() -> None:
    img, mask = _ccd(1000.0, 1010.0, seed=2)  # 1%: above the 0.5% warning, too small for a flat
    res = measure_amp_offsets(img, mask, AMPS)
    assert res.steps[0].step == pytest.approx(10.0, abs=1.5)
    assert len(res.warnings) == 1 and "bias or overscan" in res.warnings[0]
    img, mask = _ccd(1000.0, 1000.0, seed=3)
    res = measure_amp_offsets(img, mask, AMPS)
    assert abs(res.steps[0].step) < 1.5 and not res.warnings
    assert not measure_amp_offsets(img, mask, AMPS, config=AmpOffsetConfig(do_measure=False)).steps


def test_boundaries_of_a_four_amp_grid_are_all_found() -> None:
    amps = {"A": Section(0, 200, 0, 300), "B": Section(200, 400, 0, 300),
            "C": Section(0, 200, 300, 600), "D": Section(200, 400, 300, 600)}
    level = {"A": 100.0, "B": 103.0, "C": 99.0, "D": 101.0}
    img = np.random.default_rng(4).normal(0, 0.5, (600, 400)).astype(np.float32)
    for n, s in amps.items():
        img[s.y0 : s.y1, s.x0 : s.x1] += level[n]
    res = measure_amp_offsets(img, np.zeros(img.shape, np.int32), amps, config=AmpOffsetConfig(bin_size=50))
    assert {(s.first, s.second) for s in res.steps} == {("A", "B"), ("A", "C"), ("B", "D"), ("C", "D")}
    mean = np.mean(list(level.values()))
    for n in amps:  # the pedestals bring every amp to the common level
        assert level[n] - res.pedestals[n] == pytest.approx(mean, abs=0.1)


@pytest.mark.parametrize(("key", "value"), [("strip_width", 2), ("bin_size", 4), ("warn_sigma", 0.0)])
def test_config_errors_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"amp_offset.{key}"):
        AmpOffsetConfig(**{key: value})
