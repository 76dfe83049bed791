"""The PSF-matching record container and its FITS file (apfast.psfmatch_diag), through the Butler too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from apfast.errors import InputError
from apfast.psfmatch_diag import PsfMatchDiagnostics, read_psfmatch_diagnostics, write_psfmatch_diagnostics
from apfast.repo.butler import Butler


def _record(rng: np.random.Generator, *, n_res: int = 3) -> PsfMatchDiagnostics:
    n = 7
    status = np.array([0, 1, 0, 2, 0, 3, 0])
    index = np.full(n, -1)
    index[:n_res] = np.arange(n_res)
    return PsfMatchDiagnostics(
        mode="convolveScience", shape=(4096, 2048),
        kernel_x=np.array([0.0, 2047, 0, 2047, 1023.5]), kernel_y=np.array([0.0, 0, 4095, 4095, 2047.5]),
        kernels=rng.normal(size=(5, 23, 23)), kernel_sums=rng.uniform(0.9, 1.1, 5), background=rng.normal(size=5),
        background_coeffs=rng.normal(size=3), background_order=1, background_norm=(1023.5, 2047.5, 1024.0, 2048.0),
        stamp_x=rng.integers(0, 2048, n), stamp_y=rng.integers(0, 4096, n), stamp_status=status,
        stamp_kernel_sum=rng.uniform(0.9, 1.1, n), stamp_residual_std=rng.uniform(0.9, 3, n),
        stamp_residual_index=index, residuals=rng.normal(size=(n_res, 33, 33)),
        fwhm_science=3.1, fwhm_template=4.2, basis_sigmas=(0.9, 1.8, 3.6), kernel_order=1, stamp_half_size=21,
    )


def _assert_same(a: PsfMatchDiagnostics, b: PsfMatchDiagnostics) -> None:
    for name in PsfMatchDiagnostics.__slots__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert x == y, name


@pytest.mark.parametrize("n_res", [3, 0])
def test_file_round_trip(rng: np.random.Generator, tmp_path: Path, n_res: int) -> None:
    d = _record(rng, n_res=n_res)
    p = write_psfmatch_diagnostics(tmp_path / "psfMatch.fits", d)
    _assert_same(d, read_psfmatch_diagnostics(p))
    with fits.open(p) as hdul:  # the documented layout, readable without apfast
        assert [h.name for h in hdul] == ["PRIMARY", "KERNELS", "KERNPOS", "STAMPS", "RESIDUALS"]
        assert hdul[0].header["MODE"] == "convolveScience" and hdul[0].header["NUSED"] == 4
        assert list(hdul["KERNPOS"].data["label"]) == ["lower left", "lower right", "upper left", "upper right",
                                                       "centre"]
    assert p.stat().st_size < 60_000 + n_res * 33 * 33 * 4
    assert d.kept.tolist() == [True, False, True, False, True, False, True]
    assert d.residual_stamp(6) is None and (n_res == 0 or d.residual_stamp(0) is not None)


def test_butler_get_put(rng: np.random.Generator, tmp_path: Path) -> None:
    b = Butler(tmp_path)
    d = _record(rng)
    path = b.put(d, "deepDiff_psfMatch", visit=289401, ccdnum=35)
    assert path.relative_to(tmp_path).as_posix() == "deepDiff/v289401/psfMatch-35.fits"
    assert b.datasetExists("deepDiff_psfMatch", visit=289401, ccdnum=35)
    _assert_same(d, b.get("deepDiff_psfMatch", dict(visit=289401, ccdnum=35)))
    with pytest.raises(InputError, match="expected a"):
        b.put({"mode": "convolveTemplate"}, "deepDiff_psfMatch", visit=1, ccdnum=35)


def test_bad_records_and_files(rng: np.random.Generator, tmp_path: Path) -> None:
    good = _record(rng)
    with pytest.raises(InputError, match="kernels must be"):
        PsfMatchDiagnostics(**{**{k: getattr(good, k) for k in good.__slots__}, "kernels": np.zeros((4, 3, 3))})
    with pytest.raises(InputError, match="stamp_status has shape"):
        PsfMatchDiagnostics(**{**{k: getattr(good, k) for k in good.__slots__}, "stamp_status": np.zeros(2)})
    other = tmp_path / "cat.fits"
    Table({"a": [1, 2]}).write(other)
    with pytest.raises(InputError, match="not an apfast PSF-matching record"):
        read_psfmatch_diagnostics(other)
    with pytest.raises(InputError, match="cannot read"):
        read_psfmatch_diagnostics(tmp_path / "none.fits")
