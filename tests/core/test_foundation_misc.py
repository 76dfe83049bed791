"""Camera descriptions, FITS sections, the header scanner, atomic writes, the jit policy checker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from astropy.io import fits
from hypothesis import given
from hypothesis import strategies as st

from apfast._fileio import atomic_path
from apfast.camera import get_camera, load_camera, parse_section
from apfast.errors import ConfigError, IngestError
from apfast.masks import MASK_PLANES, bitmask, header_cards
from apfast.repo.fitsutil import scan_headers

ROOT = Path(__file__).resolve().parents[2]


def test_decam_description() -> None:
    cam = get_camera("decam")
    assert cam.name == "DECam"
    assert len(cam.detectors) == 62
    assert cam.detector_name(1) == "S29" and cam.detector_name(35) == "N4" and cam.detector_name(62) == "N31"
    assert cam.detector_number("n4") == 35
    assert cam.trimmed_shape == (4096, 2048) and cam.raw_shape == (4146, 2160)
    a, b = cam.amplifiers
    assert parse_section(a.data_section.value).shape == (4096, 1024)
    assert parse_section(b.bias_section.value).shape == (4096, 50)
    assert a.readout_flip_x and not b.readout_flip_x
    assert cam.dead_detectors == (61,)


def test_decam_names_match_real_curated_files(real_data: Path) -> None:
    """ccdnum -> name in decam.toml agrees with the DETECTOR/DETECTOR_NAME of Rubin's curated crosstalk."""
    import re

    cam = get_camera("DECam")
    for f in sorted((real_data / "decam_calib" / "crosstalk").glob("*/*.yaml")):
        text = f.read_text()
        name = re.search(r"DETECTOR_NAME\n  - String\n  - (\S+)", text).group(1)
        num = int(re.search(r"- - DETECTOR\n  - Int\n  - (\d+)", text).group(1))
        assert cam.detector_name(num) == name


@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 5000), st.integers(1, 5000))
def test_section_round_trip(a: int, b: int, c: int, d: int) -> None:
    sec = parse_section(f"[{a}:{b},{c}:{d}]")
    assert sec.shape == (abs(d - c) + 1, abs(b - a) + 1)
    assert parse_section(sec.to_fits()).slices == sec.slices
    assert sec.flip_x == (a > b) and sec.flip_y == (c > d)


@pytest.mark.parametrize("bad", ["", "[1:2]", "[0:10,1:5]", "1:2,3:4", "[a:b,c:d]"])
def test_section_errors(bad: str) -> None:
    with pytest.raises(ValueError, match="section"):
        parse_section(bad)


def test_camera_toml_errors(tmp_path: Path) -> None:
    p = tmp_path / "cam.toml"
    p.write_text("name = 'x'\n[oops")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_camera(p)
    p.write_text("name = 'x'\npixel_scale = 1.0\ntrimmed_shape = [10, 10]\n[exposure_keys]\nvisit = { key = 'A' }\n")
    with pytest.raises(ConfigError, match="must define filter"):
        load_camera(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_camera(tmp_path / "missing.toml")


def test_masks() -> None:
    assert bitmask(["BAD", "SAT"]) == 3
    assert MASK_PLANES[:5] == ("BAD", "SAT", "INTRP", "CR", "EDGE")
    assert len({c[0] for c in header_cards()}) == len(MASK_PLANES)
    with pytest.raises(KeyError, match="unknown mask plane 'NOPE'"):
        bitmask("NOPE")


def test_scan_headers_matches_astropy(tmp_path: Path, real_data: Path) -> None:
    for f in [real_data / "raw_saao" / "a8280271.fits",
              *sorted((real_data / "ztf_quadrant").glob("*.fz"))]:
        infos = scan_headers(f)
        with fits.open(f) as hdul:
            assert len(infos) == len(hdul)
            for info, hdu in zip(infos, hdul, strict=True):
                if info.compressed:
                    assert info.image_shape == hdu.data.shape
                    assert info.header["ZNAXIS1"] == hdu.header["NAXIS1"]
                elif hdu.data is not None:
                    assert info.image_shape == hdu.data.shape


def test_scan_headers_garbage_after_end_and_missing_end(tmp_path: Path) -> None:
    p = tmp_path / "x.fits"
    fits.PrimaryHDU().writeto(p)
    p.write_bytes(p.read_bytes() + b"\0" * 2880)  # zero padding after the last HDU is tolerated
    assert len(scan_headers(p)) == 1
    q = tmp_path / "noend.fits"
    q.write_bytes(b"SIMPLE  =                    T" + b" " * (2880 - 30))
    with pytest.raises(IngestError, match="no END card"):
        scan_headers(q)
    with pytest.raises(IngestError, match="cannot read"):
        scan_headers(tmp_path / "absent.fits")


def test_atomic_path(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("ok")
        assert not target.exists()
    assert target.read_text() == "ok"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "ok"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_atomic_path_options(tmp_path: Path) -> None:
    # mode: the permission bits the simulator's files get; default: mkstemp's 0600
    with atomic_path(tmp_path / "a.txt", mode=0o644) as tmp:
        tmp.write_text("a")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    with atomic_path(tmp_path / "b.txt") as tmp:
        assert tmp.exists()  # reserved by mkstemp
        tmp.write_text("b")
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    # reserve=False: a fresh name for writers that refuse to overwrite (astropy writeto)
    with atomic_path(tmp_path / "c.fits", reserve=False) as tmp:
        assert not tmp.exists() and tmp.parent == tmp_path
        fits.PrimaryHDU().writeto(tmp)
    assert (tmp_path / "c.fits").is_file()
    # mkdir=False: a missing folder fails the write and leaves nothing behind
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "no" / "d.txt", mkdir=False, reserve=False) as tmp:
        tmp.write_text("d")
    assert not (tmp_path / "no").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "c.fits"]


def test_check_jit_clean_and_catches(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "check_jit.py"), str(ROOT)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout
    (tmp_path / "src").mkdir()
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "bad.py").write_text("import numba\n@numba.njit(fastmath=True)\ndef f(x):\n    return x\n")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "check_jit.py"), str(tmp_path)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 1
    assert "bare numba decorator" in r.stdout and "fastmath" in r.stdout
