"""``apfast subtract`` and ``apfast.subtract_fits`` on the real DECam pair: outputs, summary and errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import apfast
from apfast.dia.pair import DIA_TABLE_COLUMNS
from apfast.run.cli import main

SCI = "decam_sfft/DEC-OBS04a.mini.fits"
REF = "decam_sfft/DEC-OBS18a.mini.fits"


@pytest.fixture(scope="module")
def cli_run(real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("subtract") / "out" / "diff.fits"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["-q", "subtract", str(real_data / SCI), str(real_data / REF), "-o", str(out), "--detect"])
    return {"rc": rc, "out": out, "stdout": buf.getvalue()}


def test_cli_writes_difference_and_sources(cli_run: dict) -> None:
    assert cli_run["rc"] == 0
    out: Path = cli_run["out"]
    with fits.open(out) as hdul:
        names = [h.name for h in hdul]
        assert names[:4] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert any(n.startswith("PSF_") for n in names)
        hdr = hdul[0].header
        assert hdr["DIFFMODE"] == "convolveTemplate"
        assert 0.9 < hdr["DIFFKSUM"] < 1.15
        assert hdr["DIFFNSTP"] >= 3
        assert 0.8 <= hdr["DIFFPSTD"] <= 1.3
        assert hdul["IMAGE"].data.shape == (256, 256)
        assert "CTYPE1" in hdul["IMAGE"].header
    with fits.open(out.with_name("diff_diaSrc.fits")) as hdul:
        tab = hdul["DIASRC"].data
        assert list(tab.columns.names) == list(DIA_TABLE_COLUMNS)
        n = len(tab)
    assert n >= 1
    with out.with_name("diff_diaSrc.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and list(rows[0]) == list(DIA_TABLE_COLUMNS)
    assert float(rows[0]["ra"]) == pytest.approx(float(tab["ra"][0]), abs=1e-7)


def test_cli_summary_paragraph(cli_run: dict) -> None:
    text = cli_run["stdout"].strip()
    assert text.count("\n") == 0
    for part in ("subtract: convolveTemplate", "PSF FWHM science", "stamps, sum", "robust std", "DIA sources",
                 str(cli_run["out"])):
        assert part in text


def test_python_api_matches_cli(cli_run: dict, real_data: Path) -> None:
    res = apfast.subtract_fits(real_data / SCI, real_data / REF, config={"difference.psfmatch.mode": "auto"})
    assert isinstance(res.difference, apfast.Exposure)
    assert res.outputs == [] and res.table is None
    on_disk = apfast.read_exposure(cli_run["out"])
    assert np.allclose(on_disk.image, res.difference.image, atol=1e-4 * float(np.abs(res.difference.image).max()))


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["-q", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def _write(path: Path, data: np.ndarray, header: fits.Header | None = None) -> Path:
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


@pytest.mark.parametrize("case", ["missing", "not_fits", "no_wcs", "no_image", "no_overlap", "bad_variance",
                                  "too_few_stars", "bad_key"])
def test_cli_errors_exit_2_with_one_line(case: str, real_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    sci, ref = real_data / SCI, real_data / REF
    out = tmp_path / "d.fits"
    extra: list[str] = []
    expect = {
        "missing": "science image {p}: no such file",
        "not_fits": "is not a readable FITS file",
        "no_wcs": "has no celestial WCS (no CTYPE1/CTYPE2 cards)",
        "no_image": "has no image HDU",
        "no_overlap": "the images do not overlap: the template covers 0.0% of the science image",
        "bad_variance": "science variance {p} has shape (10, 12) but the image has (256, 256)",
        "too_few_stars": "lower characterize.detection.include_threshold_multiplier (now 2, e.g. 1)",
        "bad_key": "unknown config key 'difference.psfmatch.n_star_per_cel'",
    }[case]
    p: Path = sci
    if case == "missing":
        p = tmp_path / "nope.fits"
        sci = p
    elif case == "not_fits":
        p = tmp_path / "text.fits"
        p.write_text("not a FITS file\n" * 200)
        sci = p
    elif case == "no_wcs":
        sci = _write(tmp_path / "nowcs.fits", fits.getdata(sci).astype(np.float32))
    elif case == "no_image":
        p = tmp_path / "table.fits"
        fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "D", array=[1.0])])]
                     ).writeto(p)
        sci = p
    elif case == "no_overlap":
        hdr = fits.getheader(ref)
        hdr["CRVAL2"] = hdr["CRVAL2"] + 1.0
        ref = _write(tmp_path / "far.fits", fits.getdata(ref).astype(np.float32), hdr)
    elif case == "bad_variance":
        p = _write(tmp_path / "var.fits", np.ones((10, 12), np.float32))
        extra = ["--science-variance", str(p)]
    elif case == "too_few_stars":
        extra = ["-c", "characterize.psf.min_stars=6"]
    elif case == "bad_key":
        extra = ["-c", "difference.psfmatch.n_star_per_cel=4"]
    rc, err = _run(["subtract", str(sci), str(ref), "-o", str(out), *extra], capsys)
    assert rc == 2, err
    assert err.count("\n") == 0 and err.startswith("apfast subtract: error: ")
    assert expect.format(p=p) in err
    assert "Traceback" not in err
    assert not out.exists()


def test_help_documents_positionals_and_columns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["subtract", "--help"]) == 0
    text = capsys.readouterr().out
    for part in ("science", "template", "--science-variance", "--template-weight", "--detect", "--hdu",
                 "DIFFKSUM", "flux_err"):
        assert part in text


ZTF = "ztf_quadrant/ztf_20200924431759_000655_zr_c13_o_q3_{}_cut1024.fits.fz"


def test_cli_sky_mask_weight_and_hdu(real_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A ZTF cut with its ~160 DN sky and mask file, against a template with 450 DN more sky, scaled by
    0.6, on a grid shifted by (12, 7) px, given with a weight file in HDU 1: kernel sum 0.6."""
    from scipy import ndimage

    with fits.open(real_data / ZTF.format("sciimg")) as hdul:
        hdr = hdul[1].header.copy()
        data = np.asarray(hdul[1].data[:400, :400], dtype=np.float64)
    zmask = fits.getdata(real_data / ZTF.format("mskimg"), 1)[:400, :400].astype(np.int32)
    hdr["NAXIS1"], hdr["NAXIS2"] = 400, 400
    sci = _write(tmp_path / "sci.fits", data.astype(np.float32), hdr)
    msk = _write(tmp_path / "msk.fits", zmask)
    rng = np.random.default_rng(7)
    conv = 0.6 * ndimage.gaussian_filter(np.nan_to_num(data), 1.4) + 450.0 + rng.normal(0.0, 2.0, data.shape)
    thdr = hdr.copy()
    thdr["CRPIX1"] -= 12
    thdr["CRPIX2"] -= 7
    tvar = np.full(conv[7:, 12:].shape, 4.0, np.float32) + (0.36 * np.clip(conv[7:, 12:] - 450.0, 0, None) / 6.0
                                                            ).astype(np.float32)
    tmpl = tmp_path / "tmpl.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(conv[7:, 12:].astype(np.float32), header=thdr, name="SCI")]
                 ).writeto(tmpl)
    wgt = tmp_path / "wgt.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(1.0 / tvar)]).writeto(wgt)
    out = tmp_path / "d.fits"
    rc = main(["-q", "subtract", str(sci), str(tmpl), "-o", str(out), "--science-mask", str(msk),
               "--template-weight", str(wgt), "--hdu", "0", "SCI", "-c", "subtract.mask_ignore_bits=2050"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    with fits.open(out) as hdul:
        assert hdul[0].header["DIFFMODE"] == "convolveScience"
        assert hdul[0].header["DIFFKSUM"] == pytest.approx(0.6, abs=0.015)
        assert hdul[0].header["DIFFOVLP"] == pytest.approx((393 / 400) * (388 / 400), abs=0.03)
        mask = hdul["MASK"].data
    bad = fits.getheader(out, "MASK")["MP_BAD"]
    # ZTF's flagged pixels (other than source/dirt bits) are BAD in the difference
    flagged = (zmask & ~2050) != 0
    assert flagged.any() and ((mask[flagged] >> bad) & 1).all()
