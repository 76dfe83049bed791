"""Tests of the DECam simulator: file formats, pixel statistics, ISR closure against truth, refcats."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from apfast.camera import get_camera, parse_section
from apfast.ccd.photocal import PhotoCalConfig
from apfast.errors import InputError
from apfast.sim.simulate import load_truth, psf_fwhm, simulate, truth_image

SEED = 5


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    msgs: list[str] = []
    summary = simulate(out, seed=SEED, ccdnums=(35,), n_template=1, n_science=1, progress=msgs.append)
    assert msgs and "done" in msgs[-1]
    return summary


@pytest.fixture(scope="module")
def truth(sim):
    return load_truth(sim.out)


@pytest.fixture(scope="module")
def science(sim, truth):
    """Raw data, calibrations and truth of the science exposure of CCD 35."""
    visit = sim.science_visits[0]
    path = next(p for p in sim.raw_files if fits.getval(p, "EXPNUM") == visit)
    with fits.open(path) as hdul:
        raw = np.array(hdul[1].data)
        hdr = hdul[1].header.copy()
    bias = fits.getdata(sim.bias_file, 1).astype(np.float64)
    flat = fits.getdata(sim.flat_files["g"], 1).astype(np.float64)
    meta = truth.ccd(visit, 35)
    return {"visit": visit, "raw": raw, "hdr": hdr, "bias": bias, "flat": flat, "meta": meta,
            "truth": truth_image(sim.out, visit, 35).astype(np.float64),
            "sources": truth_image(sim.out, visit, 35, sky=False).astype(np.float64),
            "masks": truth.masks(visit, 35), "npz": truth.root / f"ccd_{visit}_35.npz"}


def isr(raw: np.ndarray, hdr, bias: np.ndarray, flat: np.ndarray | None, *, xtalk: dict | None = None) -> np.ndarray:
    """Minimal numpy ISR: per-row overscan median, trim/assemble, crosstalk, bias, flat."""
    out = np.empty((4096, 2048))
    for amp in ("A", "B"):
        data = parse_section(hdr[f"DATASEC{amp}"])
        over = parse_section(hdr[f"BIASSEC{amp}"])
        level = np.median(raw[over.slices].astype(np.float64), axis=1)
        cols = slice(data.x0 - 56, data.x1 - 56)
        out[:, cols] = raw[data.slices] - level[:, None]
    if xtalk is not None:
        a = out[:, 1024:].copy()
        b = out[:, :1024].copy()
        out[:, :1024] -= xtalk["B<-A"] * a[:, ::-1]
        out[:, 1024:] -= xtalk["A<-B"] * b[:, ::-1]
    out -= bias
    if flat is not None:
        out /= flat
    return out


def test_raw_files_follow_the_contract(sim):
    cam = get_camera("DECam")
    assert len(sim.raw_files) == 2
    for path in sim.raw_files:
        assert re.fullmatch(r"c4d_\d{6}_\d{6}_ori\.fits\.fz", path.name)
        with fits.open(path) as hdul:
            h0 = hdul[0].header
            for key in ("INSTRUME", "PROCTYPE", "OBSTYPE", "EXPNUM", "FILTER", "DATE-OBS", "MJD-OBS", "EXPTIME",
                        "OBJECT", "TELRA", "TELDEC", "AIRMASS", "PROPID", "NEXTEND"):
                assert key in h0, key
            assert h0["INSTRUME"] == "DECam" and h0["PROCTYPE"] == "RAW" and h0["OBSTYPE"] == "object"
            assert h0["FILTER"].startswith("g DECam")
            assert path.name[4:10] == h0["DATE-OBS"][2:10].replace("-", "")
            assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d+", h0["TELRA"]) and h0["TELDEC"][0] in "+-"
            assert hdul[0].data is None and h0["NEXTEND"] == len(hdul) - 1 == 1
            ext = hdul[1]
            assert isinstance(ext, fits.CompImageHDU)
            assert ext.data.dtype == np.uint16 and ext.data.shape == (4146, 2160)
            h = ext.header
            assert h["EXTNAME"] == "N4" and h["CCDNUM"] == 35 and h["DETPOS"] == "N4"
            for amp in cam.amplifiers:
                for spec in ("data_section", "bias_section", "parallel_overscan"):
                    ks = getattr(amp, spec)
                    assert h[ks.key] == ks.value
                assert 3.5 < h[amp.gain.key] < 4.5 and 5.5 < h[amp.read_noise.key] < 8.0
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                w = WCS(h)
            assert w.wcs.ctype[0] == "RA---TAN"


def test_header_wcs_is_approximate_and_true_wcs_distorted(sim, truth):
    visit = sim.science_visits[0]
    meta = truth.ccd(visit, 35)
    true = truth.true_wcs(visit, 35)
    assert true.sip is not None
    with fits.open(sim.raw_files[1]) as hdul:
        hw = WCS(hdul[1].header)
    x = np.array([0.0, 2047.0, 0.0, 2047.0, 1023.5])
    y = np.array([0.0, 0.0, 4095.0, 4095.0, 2047.5])
    ra_t, dec_t = true.all_pix2world(x, y, 0)
    ra_h, dec_h = hw.all_pix2world(x + 56, y + 50, 0)
    sep = np.hypot((ra_t - ra_h) * np.cos(np.radians(dec_t)), dec_t - dec_h) * 3600
    assert np.all((sep > 0.2) & (sep < 3.0)), sep
    # pixel scale and the DECam orientation (+y towards +RA)
    ra2, dec2 = true.all_pix2world([1023.5, 1023.5], [2047.5, 2048.5], 0)
    assert (ra2[1] - ra2[0]) * np.cos(np.radians(dec2[0])) * 3600 == pytest.approx(0.2636, rel=0.01)
    assert meta["true_wcs"]["A_3_0"] > 0


def test_overscan_statistics(science):
    raw, hdr, meta = science["raw"], science["hdr"], science["meta"]
    with np.load(science["npz"]) as z:
        bias_rows = z["bias_rows"]
    for k, amp in enumerate(("A", "B")):
        over = raw[parse_section(hdr[f"BIASSEC{amp}"]).slices].astype(np.float64)
        rn_adu = hdr[f"RDNOISE{amp}"] / hdr[f"GAIN{amp}"]
        level = meta["amps"][amp]["bias_level_adu"]
        assert 1000 <= level <= 3000
        assert np.median(over) == pytest.approx(level, abs=5.0)
        rowmed = np.median(over, axis=1)
        assert np.abs(rowmed - bias_rows[k, 50:]).mean() < 0.5
        resid = over - over.mean(axis=1, keepdims=True)
        std = resid.std() * np.sqrt(over.shape[1] / (over.shape[1] - 1))
        assert std == pytest.approx(np.hypot(rn_adu, np.sqrt(1 / 12)), rel=0.05)
        # parallel overscan rows carry the bias too
        post = raw[parse_section(hdr[f"POSTSEC{amp}"]).slices].astype(np.float64)
        assert np.median(post) == pytest.approx(np.median(bias_rows[k, :50]), abs=1.0)
    assert abs(meta["amps"]["A"]["bias_level_adu"] - meta["amps"]["B"]["bias_level_adu"]) > 1.0


def test_saturation_and_bleed_trails(science):
    raw, hdr, meta = science["raw"], science["hdr"], science["meta"]
    sat = science["masks"]["saturated"]
    assert sat.sum() > 50
    data = raw[50:, 56:2104]
    satlev = np.where(np.arange(2048) < 1024, hdr["SATURATB"], hdr["SATURATA"])
    assert np.all(data[sat] == np.broadcast_to(satlev, data.shape)[sat])
    assert np.all(data <= satlev)
    trails = meta["bleed_trails"]
    assert max(t[2] - t[1] for t in trails) >= 15  # charge bled along a column beyond the star core
    assert meta["n_saturated_pixels"] == sat.sum()


def test_crosstalk_ghost_amplitude(science):
    raw, hdr, meta = science["raw"], science["hdr"], science["meta"]
    img = isr(raw, hdr, science["bias"], science["flat"])
    sat = science["masks"]["saturated"]
    for victim, source, _victim_cols in (("B", "A", slice(0, 1024)), ("A", "B", slice(1024, 2048))):
        coeff = meta["crosstalk"][f"{victim}<-{source}"]
        src_mask = np.zeros_like(sat)
        src_mask[:, 1024:] = sat[:, 1024:] if source == "A" else False
        src_mask[:, :1024] = sat[:, :1024] if source == "B" else False
        rows, cs = np.nonzero(src_mask)
        vc = 2047 - cs
        ok = (~sat[rows, vc]) & (science["sources"][rows, vc] < 20) & (~science["masks"]["cr"][rows, vc])
        rows, cs, vc = rows[ok], cs[ok], vc[ok]
        assert rows.size > 30
        src_signal = raw[rows + 50, cs + 56] - np.median(raw[rows + 50, 2104:2154] if source == "A" else
                                                          raw[rows + 50, 6:56], axis=1)
        ghost = (img[rows, vc] - science["truth"][rows, vc]) * science["flat"][rows, vc]
        expected = coeff * src_signal
        noise = 12.0 / np.sqrt(rows.size)
        assert ghost.mean() == pytest.approx(expected.mean(), abs=0.05 * expected.mean() + 5 * noise)
        assert expected.mean() > 40


def test_defects_deviate(sim, science):
    img = isr(science["raw"], science["hdr"], science["bias"], science["flat"], xtalk=science["meta"]["crosstalk"])
    diff = img - science["truth"]
    with fits.open(sim.defects_file) as hdul:
        assert hdul[0].header["OBSTYPE"] == "defects"
        boxes = Table(hdul[1].data)
        assert hdul[1].header["CCDNUM"] == 35
    kinds = [d["kind"] for d in science["meta"]["defects"]]
    assert len(boxes) == len(kinds) >= 4
    for row, kind in zip(boxes, kinds, strict=True):
        sl = (slice(row["y0"], row["y0"] + row["height"]), slice(row["x0"], row["x0"] + row["width"]))
        keep = ~science["masks"]["saturated"][sl] & ~science["masks"]["cr"][sl]
        med = np.median(diff[sl][keep])
        sky = np.median(science["truth"][sl])
        if kind == "hot":
            assert med > 500
        else:
            assert med < -0.8 * sky


def test_isr_closure_against_truth(science):
    meta = science["meta"]
    img = isr(science["raw"], science["hdr"], science["bias"], science["flat"], xtalk=meta["crosstalk"])
    truth = science["truth"]
    masks = science["masks"]
    bad = masks["cr"] | masks["saturated"]
    for d in meta["defects"]:
        bad[d["y0"]:d["y0"] + d["height"], d["x0"]:d["x0"] + d["width"]] = True
    # grow by a pixel (CR halo, bleed edges) and mask crosstalk of saturated pixels
    bad |= np.roll(bad, 1, 0) | np.roll(bad, -1, 0) | np.roll(bad, 1, 1) | np.roll(bad, -1, 1)
    bad |= masks["saturated"][:, ::-1]
    gain = np.where(np.arange(2048) < 1024, meta["amps"]["B"]["gain"], meta["amps"]["A"]["gain"])[None, :]
    rn = np.where(np.arange(2048) < 1024, meta["amps"]["B"]["read_noise_e"], meta["amps"]["A"]["read_noise_e"])
    var = truth / gain + (rn[None, :] / gain) ** 2
    pull = (img - truth) / np.sqrt(var)
    sky = (science["sources"] < 0.05) & ~bad
    assert sky.sum() > 2_000_000
    assert abs((img - truth)[sky].mean()) < 0.1
    assert pull[sky].std() == pytest.approx(1.0, abs=0.05)
    allgood = ~bad
    assert pull[allgood].std() == pytest.approx(1.0, abs=0.05)
    # stars are really in the pixels
    assert (science["sources"] > 100).sum() > 1000


def test_transients_truth(sim, truth):
    tr = truth.transients
    assert set(tr["kind"]) == {"hosted", "hostless", "variable_brighten", "variable_fade", "moving"}
    assert np.all(tr["visit"] == sim.science_visits[0])
    snr = np.asarray(tr["snr_expected"])
    assert snr.min() < 6 and snr.max() > 50 and np.all(snr > 2.0)
    fade = tr["kind"] == "variable_fade"
    assert np.all(tr["flux_adu"][fade] < 0) and np.all(tr["flux_adu"][~fade] > 0)
    assert np.all(-tr["flux_adu"][fade] <= tr["base_flux_adu"][fade] * 0.9 + 1e-6)
    w = truth.true_wcs(sim.science_visits[0], 35)
    x, y = w.all_world2pix(tr["ra"], tr["dec"], 0)
    assert np.allclose(x, tr["x"], atol=1e-3) and np.allclose(y, tr["y"], atol=1e-3)
    # nJy and ADU agree through the zero point
    zp = truth.visits["zero_point_e"][truth.visits["visit"] == sim.science_visits[0]][0]
    assert np.allclose(tr["flux_njy"], tr["flux_e"] * 10 ** (-0.4 * (zp - 31.4)))
    # a bright hostless transient is visible in the science truth image
    img = truth_image(sim.out, sim.science_visits[0], 35, sky=False)
    best = tr[(tr["kind"] == "hostless")]
    best = best[np.argmax(best["flux_adu"])]
    xi, yi = int(round(best["x"])), int(round(best["y"]))
    box = img[yi - 20:yi + 21, xi - 20:xi + 21].sum()
    assert box == pytest.approx(best["flux_adu"], rel=0.05)


def test_psf_and_sky_truth(sim, truth, science):
    meta = science["meta"]
    fw = np.array(meta["psf_fwhm_px_corners_centre"])
    assert 1.0 / 0.2636 * 0.9 < fw[4] < 1.6 / 0.2636 * 1.1
    spread = (fw[:4].max() - fw[:4].min()) / fw[4]
    assert 0.02 < spread < 0.2
    assert np.isclose(psf_fwhm(meta, 1023.5, 2047.5), fw[4])
    # measured second-moment size of a bright isolated star matches the model FWHM
    src = truth.sources
    with np.load(f"{truth.root}/ccd_{science['visit']}_35.npz") as z:
        sx, sy, sf, sk = z["static_x"], z["static_y"], z["static_flux"], z["static_kind"]
    cand = np.flatnonzero((sk == 0) & (sf > 2e5) & (sf < 1e6) & (sx > 50) & (sx < 2000) & (sy > 50) & (sy < 4046))
    img = science["sources"]
    for k in cand:
        d = np.hypot(sx - sx[k], sy - sy[k])
        if np.sort(d)[1] < 40:
            continue
        xi, yi = int(round(sx[k])), int(round(sy[k]))
        st = img[yi - 15:yi + 16, xi - 15:xi + 16]
        half = st.max() / 2
        area = (st > half).sum()
        fwhm_meas = 2 * np.sqrt(area / np.pi)
        assert fwhm_meas == pytest.approx(float(psf_fwhm(meta, sx[k], sy[k])), rel=0.12)
        break
    else:
        pytest.fail("no isolated bright star found")
    assert len(src) > 1000
    vis = truth.visits
    assert set(vis["epoch"]) == {"template", "science"}
    assert np.all(vis["seeing_fwhm_arcsec"][vis["epoch"] == "template"] <= 1.0)
    assert 100 < meta["sky"]["level_e"] < 5000


def test_refcat_magnitudes_match_zero_point(sim, truth, science):
    meta = science["meta"]
    ps1 = Table.read(sim.ps1_file, format="ascii.csv")
    gaia = Table.read(sim.gaia_file, format="ascii.csv")
    assert np.all(gaia["ref_epoch"] == 2016.0) and gaia["phot_g_mean_mag"].max() <= 20.5
    g, r = (np.ma.filled(np.ma.asarray(ps1[f"{b}_mean_psf_mag"], dtype=float), np.nan) for b in "gr")
    assert np.nanpercentile(np.fmin(g, r), 95) < 22.3 and np.nanmax(g) < 24.5  # PS1 limit ~22
    src = truth.sources
    nstar = (src["type"] == "star") & (src["g_mag"] < 20)
    assert 0.9 < src["in_ps1"][nstar].mean() < 0.995  # a few % missing
    with np.load(f"{truth.root}/ccd_{science['visit']}_35.npz") as z:
        sid, sx, sy, sk = z["static_id"], z["static_x"], z["static_y"], z["static_kind"]
    img = science["sources"]
    coeffs = PhotoCalConfig(colour_terms=get_camera("DECam").colour_terms).colour_term("g")[2]
    diffs = []
    ps1_by_id = {int(i) - 108_000_000_000_000_000: k for k, i in enumerate(ps1["obj_id"])}
    for k in np.flatnonzero(sk == 0):
        i = int(sid[k])
        if i not in ps1_by_id or not (60 < sx[k] < 1990 and 60 < sy[k] < 4030) or abs(sx[k] - 1023.5) < 40:
            continue
        if np.sort(np.hypot(sx - sx[k], sy - sy[k]))[1] < 50:
            continue
        row = ps1[ps1_by_id[i]]
        if not (17.0 < row["g_mean_psf_mag"] < 20.0):
            continue
        xi, yi = int(round(sx[k])), int(round(sy[k]))
        flux = img[yi - 25:yi + 26, xi - 25:xi + 26].sum()
        amp = "B" if sx[k] < 1023.5 else "A"
        # PS1 magnitudes are in the PS1 system: the DECam camera's colour term brings them to DECam g
        gi = row["g_mean_psf_mag"] - row["i_mean_psf_mag"]
        g_decam = row["g_mean_psf_mag"] + np.polyval(list(coeffs)[::-1], gi)
        diffs.append(g_decam - (meta["amps"][amp]["zero_point_adu"] - 2.5 * np.log10(flux)))
    diffs = np.array(diffs)
    assert diffs.size > 10
    assert abs(np.median(diffs)) < 0.01
    assert np.std(diffs) < 0.05


def test_calibration_files(sim, science):
    with fits.open(sim.bias_file) as h:
        assert h[0].header["OBSTYPE"] == "zero" and h[1].header["CCDNUM"] == 35 and h[1].data.shape == (4096, 2048)
    with fits.open(sim.flat_files["g"]) as h:
        assert h[0].header["OBSTYPE"] == "dome flat" and h[0].header["FILTER"].startswith("g DECam")
        f = h[1].data
        assert 0.9 < np.median(f) < 1.05 and 0.003 < np.std(f - np.median(f)) < 0.05
    text = sim.crosstalk_file.read_text().splitlines()
    lines = {tuple(t.split()[:2]): float(t.split()[2]) for t in text if not t.startswith("#")}
    assert lines[("ccd35B", "ccd35A")] == pytest.approx(science["meta"]["crosstalk"]["B<-A"], rel=1e-5)
    assert len(lines) == 124
    assert science["bias"].std() > 0.3  # the 2-D bias structure is present


def test_determinism(sim, tmp_path):
    again = simulate(tmp_path / "again", seed=SEED, ccdnums=(35,), n_template=1, n_science=1)
    for a, b in zip(sim.raw_files, again.raw_files, strict=True):
        assert a.name == b.name
        assert np.array_equal(fits.getdata(a, 1), fits.getdata(b, 1))
    assert (sim.truth_dir / "transients.csv").read_bytes() == (again.truth_dir / "transients.csv").read_bytes()


def test_bad_arguments(tmp_path):
    with pytest.raises(InputError, match="dead"):
        simulate(tmp_path, ccdnums=(61,))
    with pytest.raises(InputError, match="unknown"):
        simulate(tmp_path, filters=("u",))
    with pytest.raises(InputError, match="at least one"):
        simulate(tmp_path, n_science=0)
    with pytest.raises(InputError, match="simulate"):
        load_truth(tmp_path)


@pytest.mark.slow
def test_small_run_time(tmp_path):
    s = simulate(tmp_path, small=True)
    assert len(s.raw_files) == 5 and s.ccdnums == (35, 36)
    assert s.elapsed_s < 45
