"""DIA-source filtering before association and the reliability score: each rule on a constructed image,
the tree evaluator against a hand-built ensemble, the features and the shipped model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_diasource import NOISE, add_gaussian, exposure

from apfast.dia.diasource import run_dia_detection
from apfast.dia.filtering import REASONS, DiaFilterConfig, filter_dia_sources
from apfast.dia.reliability import FEATURES, ReliabilityModel, features, load_model, score_sources
from apfast.errors import ConfigError
from apfast.masks import bitmask


def _sources(x: list[float], y: list[float], **cols: list[float]) -> dict[str, np.ndarray]:
    n = len(x)
    out = {"x": np.asarray(x, float), "y": np.asarray(y, float), "psfFlux": np.full(n, 5000.0),
           "templateFlux": np.zeros(n), "pixelFlags_edge": np.zeros(n, bool), "pixelFlags_offimage": np.zeros(n, bool)}
    out.update({k: np.asarray(v) for k, v in cols.items()})
    return out


def test_flag_rule_reads_the_difference_and_the_science_mask_separately() -> None:
    shape = (120, 160)
    diff, sci = exposure(np.zeros(shape)), exposure(np.zeros(shape))
    diff.mask[20, 30] = bitmask("CR")
    sci.mask[40, 50] = bitmask("SUSPECT")  # the science image's suspect pixels: rejected
    diff.mask[60, 70] = bitmask("INTRP") | bitmask("SUSPECT")  # the template's, spread by warping: kept
    sci.mask[80, 90] = bitmask("INTRP")  # the science image's interpolation: rejected
    diff.mask[100, 110] = bitmask("DETECTED")  # harmless plane: kept
    src = _sources([30.2, 49.8, 70.0, 90.4, 110.0, 130.0], [20.1, 40.3, 60.0, 79.6, 100.0, 10.0],
                   pixelFlags_edge=[0, 0, 0, 0, 0, 1])
    res = filter_dia_sources(src, diff, sci)
    assert res.keep.tolist() == [False, False, True, False, True, False]
    assert res.reason.tolist() == ["flags", "flags", "", "flags", "", "flags"]
    assert res.counts == {"flags": 4, "static": 0, "spike": 0} and res.n_rejected == 4
    # planes are configurable; the rule off keeps everything
    assert filter_dia_sources(src, diff, sci, config=DiaFilterConfig(science_centre_planes=())).keep[3]
    assert filter_dia_sources(src, diff, sci, config=DiaFilterConfig(do_filter=False)).keep.all()


def test_static_rule_rejects_small_residuals_of_bright_template_sources_only() -> None:
    shape = (50, 50)
    diff, sci = exposure(np.zeros(shape)), exposure(np.zeros(shape))
    # flux / template flux: 1% of a bright star (rejected), 10% of it (a real change: kept),
    # 1% of a faint source below static_min_flux (kept), no template source (kept)
    src = _sources([10, 20, 30, 40], [10, 20, 30, 40], psfFlux=[-2000.0, 20000.0, 100.0, 3000.0],
                   templateFlux=[2.0e5, 2.0e5, 1.0e4, np.nan])
    res = filter_dia_sources(src, diff, sci)
    assert res.reason.tolist() == ["static", "", "", ""]
    assert filter_dia_sources(src, diff, sci, config=DiaFilterConfig(static_fraction=0.0)).keep.all()
    assert not filter_dia_sources(src, diff, sci, config=DiaFilterConfig(static_fraction=0.2)).keep[1]


def test_spike_rule_masks_a_cross_and_the_bleed_column_of_bright_stars() -> None:
    shape = (400, 400)
    diff, sci = exposure(np.zeros(shape)), exposure(np.zeros(shape))
    stars = {"x": np.array([200.0, 50.0]), "y": np.array([200.0, 350.0]), "mag": np.array([12.0, 18.0])}
    cfg = DiaFilterConfig(spike_mag_limit=14.0, spike_length_px=60.0, spike_width_px=4.0)
    half = 60.0 * 10 ** (-0.2 * (12.0 - 14.0))  # ~151 px for a star 2 mag above the limit
    src = _sources([200 + 0.9 * half, 202.0, 203.0, 200 + 1.1 * half, 260.0, 50.0],
                   [201.0, 200 - 1.9 * half, 200 + 0.5 * half, 200.0, 260.0, 330.0])
    res = filter_dia_sources(src, diff, sci, config=cfg, stars=stars)
    # on the horizontal spike, on the bleed column below and above, beyond the spike, off the cross,
    # and near a star fainter than the limit
    assert res.reason.tolist() == ["spike", "spike", "spike", "", "", ""]
    assert filter_dia_sources(src, diff, sci, config=cfg).keep.all()  # no catalogue: rule off


def test_first_matching_rule_is_reported_and_counts_add_up() -> None:
    diff, sci = exposure(np.zeros((50, 50))), exposure(np.zeros((50, 50)))
    diff.mask[10, 10] = bitmask("SAT")
    src = _sources([10, 20], [10, 20], psfFlux=[10.0, 10.0], templateFlux=[1e6, 1e6])
    res = filter_dia_sources(src, diff, sci)
    assert res.reason.tolist() == ["flags", "static"]
    assert sum(res.counts.values()) == res.n_rejected == 2 and set(res.counts) == set(REASONS)


@pytest.mark.parametrize(("key", "value"), [("centre_planes", ("NOPE",)), ("static_fraction", 1.5),
                                            ("spike_width_px", -1.0), ("static_min_flux", float("nan"))])
def test_config_errors_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"dia_filter.{key}"):
        DiaFilterConfig(**{key: value})


# --------------------------------------------------------------------------- reliability
def _stump_model() -> ReliabilityModel:
    """Two trees: 'snr <= 6 -> -2 else +1' and 'psf_chi2 <= 2 (NaN left) -> +0.5 else -3'."""
    i_snr, i_chi = FEATURES.index("snr"), FEATURES.index("psf_chi2")
    return ReliabilityModel(
        version="test", feature_names=FEATURES, roots=np.array([0, 3]),
        feature=np.array([i_snr, 0, 0, i_chi, 0, 0]), threshold=np.array([6.0, 0, 0, 2.0, 0, 0]),
        left=np.array([1, 0, 0, 4, 0, 0]), right=np.array([2, 0, 0, 5, 0, 0]),
        is_leaf=np.array([False, True, True, False, True, True]),
        missing_left=np.array([False, False, False, True, False, False]),
        value=np.array([0.0, -2.0, 1.0, 0.0, 0.5, -3.0]), baseline=0.25, meta={},
    )


def test_tree_evaluator_follows_thresholds_and_missing_values() -> None:
    m = _stump_model()
    X = np.full((4, len(FEATURES)), np.nan)
    X[:, FEATURES.index("snr")] = [5.0, 10.0, 10.0, 10.0]
    X[:, FEATURES.index("psf_chi2")] = [1.0, 1.0, 5.0, np.nan]
    raw = 0.25 + np.array([-2 + 0.5, 1 + 0.5, 1 - 3, 1 + 0.5])
    np.testing.assert_allclose(m.predict(X), 1 / (1 + np.exp(-raw)))
    assert m.predict(np.zeros((0, len(FEATURES)))).shape == (0,)


def test_features_of_a_point_source_an_artefact_and_a_dipole() -> None:
    rng = np.random.default_rng(3)
    shape = (200, 260)
    img = rng.normal(0, NOISE, shape)
    add_gaussian(img, 60.3, 100.6, 6000.0)  # PSF-like point source
    img[150, 200] += 40 * NOISE  # one hot pixel: a cosmic-ray remnant
    add_gaussian(img, 200.0, 60.0, 5000.0)  # dipole: + and - lobes 3 px apart
    add_gaussian(img, 203.0, 60.0, -5000.0)
    diff = exposure(img.astype(np.float32))
    res = run_dia_detection(diff, exposure(np.zeros(shape)), exposure(np.zeros(shape)))
    cols = dict(res.sources)
    X = features(cols, diff)
    assert X.shape == (len(cols["x"]), len(FEATURES))
    d = np.hypot(cols["x"] - 60.3, cols["y"] - 100.6)
    hot = np.hypot(cols["x"] - 200, cols["y"] - 150)
    f = {name: X[:, i] for i, name in enumerate(FEATURES)}
    i, j = int(np.argmin(d)), int(np.argmin(hot))
    assert d[i] < 1 and hot[j] < 1
    assert f["psf_chi2"][i] < 2.0 < f["psf_chi2"][j]  # a PSF fits the star, not the hot pixel
    assert f["peak_frac"][j] > f["peak_frac"][i]  # the hot pixel's flux sits in one pixel
    assert f["opposite_frac"][i] < 0.2
    assert np.isnan(features({"x": np.array([1.0]), "y": np.array([1.0])}, diff)[0, 0])  # no snr column: NaN


def test_shipped_model_loads_scores_and_documents_itself() -> None:
    m = load_model()
    assert m.version == "gbt-1" and len(m.version) <= 7 and m.feature_names == FEATURES
    meta = m.meta
    assert meta["n_train"] > 500 and meta["n_holdout"] > 100
    at = {r["threshold"]: r for r in meta["holdout_filtered"]}
    assert at[0.5]["purity"] >= 0.95 and at[0.5]["completeness"] >= 0.9, json.dumps(at[0.5])
    rng = np.random.default_rng(0)
    img = rng.normal(0, NOISE, (120, 120))
    add_gaussian(img, 60.0, 60.0, 20000.0)
    diff = exposure(img.astype(np.float32))
    src = dict(run_dia_detection(diff, exposure(np.zeros(img.shape)), exposure(np.zeros(img.shape))).sources)
    p = score_sources(src, diff, m)
    assert p.shape == (len(src["x"]),) and np.all((p >= 0) & (p <= 1))


def test_reliability_and_alert_threshold_errors_name_the_key() -> None:
    from apfast.dia.alerts import AlertsConfig
    from apfast.dia.reliability import ReliabilityConfig

    with pytest.raises(ConfigError, match=r"reliability\.model.*'gbt-1' \(shipped\) or 'none'"):
        ReliabilityConfig(model="gbt-9")
    assert ReliabilityConfig(model="none").model == "none"
    with pytest.raises(ConfigError, match=r"alerts\.min_reliability.*between 0 and 1"):
        AlertsConfig(min_reliability=1.5)
    with pytest.raises(ConfigError, match=r"no reliability model 'gbt-9' in the apfast package"):
        load_model("gbt-9")
