"""Ingest reads headers only: registering full-size 62-CCD DECam raws costs milliseconds per file.

Baseline in the same group: opening every HDU with astropy and decompressing its
pixels, which is what ingest would cost if it touched the data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from apfast.repo.ingest import ingest_raws
from apfast.sim.testing import write_decam_raw

N_FILES = 20


@pytest.fixture(scope="module")
def raw_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """20 full-size DECam raws (62 CCDs of 2160x4146 each), EXPNUM patched in place in copies."""
    d = tmp_path_factory.mktemp("bench_raws")
    first = write_decam_raw(d, visit=300000, ccdnums=tuple(range(1, 63)), name="c4d_190101_000000_ori.fits.fz")
    data = first.read_bytes()
    card = fits.Card("EXPNUM", 300000).image.encode()
    files = [first]
    for i in range(1, N_FILES):
        new = fits.Card("EXPNUM", 300000 + i).image.encode()
        out = d / f"c4d_190101_{i:06d}_ori.fits.fz"
        out.write_bytes(data.replace(card, new, 1))
        files.append(out)
    return files


@pytest.mark.benchmark(group="ingest-20-full-decam-raws")
def test_ingest_20_full_raws(benchmark, raw_files: list[Path], tmp_path: Path) -> None:
    counter = iter(range(10**6))

    def setup():
        repo = tmp_path / f"repo{next(counter)}"
        return (repo, raw_files), {}

    def run(repo, files):
        return ingest_raws(repo, files, mode="link")

    rep = benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    assert rep.n_rows == 62 * N_FILES
    if benchmark.stats:
        assert benchmark.stats.stats.mean / N_FILES < 1.0  # "well under a second per file"


@pytest.mark.benchmark(group="ingest-20-full-decam-raws")
def test_baseline_astropy_open_and_decompress_one_file(benchmark, raw_files: list[Path]) -> None:
    """What touching the pixels costs for ONE file (ingest above does twenty)."""

    def run(path):
        total = 0
        with fits.open(path) as hdul:
            for hdu in hdul[1:]:
                total += int(np.asarray(hdu.data[0, :4]).sum())
        return total

    benchmark.pedantic(run, args=(raw_files[0],), rounds=2, iterations=1)
