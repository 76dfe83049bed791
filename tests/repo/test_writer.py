"""Background output writer: snapshots, completeness after wait(), and failed writes (a real file-size limit)."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from apfast.errors import InputError, OutputError
from apfast.exposure import Exposure, read_exposure
from apfast.repo.butler import Butler
from apfast.repo.ingest import ingest_raws
from apfast.repo.repository import create_output_repo
from apfast.sim.testing import write_decam_raw

DID = {"visit": 289401, "ccdnum": 35}


@pytest.fixture
def butler(tmp_path: Path) -> Butler:
    raw = write_decam_raw(tmp_path / "raws", visit=DID["visit"], ccdnums=(DID["ccdnum"],), band="g",
                          date_obs="2019-03-05T06:07:08.000")
    ingest_raws(tmp_path / "repo", [raw], mode="link")
    return Butler(create_output_repo(tmp_path / "repo", rerun="w"))


def _exposure(rng: np.random.Generator, shape: tuple[int, int] = (300, 200)) -> Exposure:
    return Exposure(rng.normal(100.0, 5.0, shape).astype(np.float32),
                    (rng.random(shape) < 0.05).astype(np.int32), np.full(shape, 25.0, np.float32))


@contextmanager
def _file_size_limit(nbytes: int) -> Iterator[None]:
    """A real RLIMIT_FSIZE for this process: writes past it fail with EFBIG (SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp-*")]


def test_background_writes_equal_direct_puts_and_leave_the_arrays_alone(butler: Butler,
                                                                          rng: np.random.Generator) -> None:
    from apfast.repo.writer import OutputWriter

    exp = _exposure(rng)
    image0, mask0 = exp.image.copy(), exp.mask.copy()
    cat = Table({"id": np.arange(5), "flux": rng.normal(size=5)})
    with OutputWriter(butler) as w:
        p_exp = w.put(exp, "calexp", DID)
        p_cat = w.put(cat, "src", DID)
        # the caller keeps reading the planes while they are written: they must never be byte-swapped
        # in place (astropy does that to native arrays), not even for a moment
        for _ in range(200):
            assert exp.image[0, 0] == image0[0, 0] and exp.mask[-1, -1] == mask0[-1, -1]
        exp.metadata["LATER"] = 1  # metadata and catalogues are copied at put()
        cat["flux"][:] = -1.0
        w.wait()
        assert p_exp.is_file() and p_cat.is_file()
    back = read_exposure(p_exp)
    np.testing.assert_array_equal(back.image, image0)
    np.testing.assert_array_equal(back.mask, mask0)
    assert "LATER" not in back.metadata
    assert exp.image.dtype.isnative and exp.mask.dtype.isnative
    np.testing.assert_array_equal(exp.image, image0)
    got = butler.get("src", DID)
    assert np.all(np.asarray(got["flux"]) != -1.0)
    # the same bytes as a direct put
    direct = Butler(butler.repo.write_root).put(Exposure(image0, mask0, np.full(image0.shape, 25.0, np.float32)),
                                                 "calexp", visit=1, ccdnum=35)
    with fits.open(direct) as a, fits.open(p_exp) as b:
        for name in ("IMAGE", "MASK", "VARIANCE"):
            np.testing.assert_array_equal(a[name].data, b[name].data)
    assert not _leftovers(butler.repo.write_root)


def test_bad_put_is_refused_at_once(butler: Butler) -> None:
    from apfast.repo.writer import OutputWriter

    with OutputWriter(butler) as w:
        with pytest.raises(InputError, match="expected a"):
            w.put("not an exposure", "calexp", DID)
        with pytest.raises(InputError):
            w.put(Table({"a": [1]}), "raw", DID)


@pytest.mark.parametrize("background", [True, False])
def test_failed_write_names_the_file_and_leaves_the_old_one(butler: Butler, rng: np.random.Generator,
                                                             background: bool) -> None:
    from apfast.repo.writer import OutputWriter

    small = _exposure(rng, (40, 30))
    path = butler.put(small, "calexp", DID)
    before = path.read_bytes()
    big = _exposure(rng, (1000, 1000))  # ~12 MB of planes, past a 2 MB limit
    w = OutputWriter(butler, background=background)
    with _file_size_limit(2 * 1024 * 1024):
        if background:
            w.put(big, "calexp", DID)
            with pytest.raises(OutputError) as info:
                w.wait()
        else:
            with pytest.raises(OutputError) as info:
                w.put(big, "calexp", DID)
    w.close()
    msg = str(info.value)
    assert "calexp" in msg and str(path) in msg and "disk space" in msg and "re-run" in msg
    assert path.read_bytes() == before  # the previous complete file is untouched
    assert not _leftovers(butler.repo.write_root)
    # the writer is usable again: the next write succeeds and wait() does not re-raise the old error
    with OutputWriter(butler) as w2:
        w2.put(big, "calexp", DID)
    np.testing.assert_array_equal(read_exposure(path).image, big.image)
