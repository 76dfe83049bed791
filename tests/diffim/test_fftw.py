"""apfast.diffim.fftw: shared FFTW plans and the persistent wisdom cache (small shapes, cache under tmp_path)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from apfast.diffim import fftw
from apfast.errors import InputError

SHAPE = (24, 20)  # tiny: FFTW_MEASURE plans it in milliseconds with one thread


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test gets its own wisdom cache (never the real ~/.cache) and a fresh module state."""
    d = tmp_path / "cache"
    monkeypatch.setenv("APFAST_CACHE_DIR", str(d))
    monkeypatch.delenv("APFAST_FFTW_WISDOM", raising=False)
    fftw._reset_for_tests()
    yield d
    fftw._reset_for_tests()


def _records(shape, threads=1):
    return [r for r in fftw.plan_records() if r.shape == shape and r.threads == threads]


def _run_child(code: str) -> str:
    """Run ``code`` in a fresh interpreter with this test's environment (APFAST_CACHE_DIR included)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# ----------------------------------------------------------------------------------------------- location
def test_cache_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv("APFAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fftw.wisdom_path().parent == tmp_path / "xdg" / "apfast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fftw.wisdom_path().parent == tmp_path / "home" / ".cache" / "apfast"
    monkeypatch.setenv("APFAST_CACHE_DIR", str(tmp_path / "mine"))
    p = fftw.wisdom_path()
    assert p.parent == tmp_path / "mine"
    assert p.name.startswith("fftw-wisdom-") and p.name.endswith(".json")


def test_file_name_depends_on_identity(monkeypatch):
    a = fftw.wisdom_path().name
    monkeypatch.setattr(fftw, "_cpu_model", lambda: "some other CPU")
    assert fftw.wisdom_path().name != a


# ----------------------------------------------------------------------------------------------- wisdom file
def test_measure_plan_writes_wisdom_file(cache_dir):
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    path = fftw.wisdom_path()
    assert path.parent == cache_dir and path.exists()
    doc = json.loads(path.read_text())
    assert doc["format"] == "apfast-fftw-wisdom"
    assert doc["identity"] == fftw._identity()
    assert len(doc["wisdom"]) == 3
    (rec,) = _records(SHAPE)
    assert rec.from_wisdom is False and rec.effort == "FFTW_MEASURE"
    # no temporary files left beside it
    assert [p.name for p in cache_dir.iterdir()] == [path.name]


def test_estimate_plans_do_not_write(cache_dir):
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_ESTIMATE")
    assert not fftw.wisdom_path().exists()


def test_disabled_by_env(monkeypatch, cache_dir):
    monkeypatch.setenv("APFAST_FFTW_WISDOM", "0")
    assert not fftw.wisdom_enabled()
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    assert not cache_dir.exists()


def test_plans_are_cached_per_process():
    a = fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    b = fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    assert a[0] is b[0] and a[1] is b[1] and a[2] is b[2]
    c = fftw.rfft2_pair(SHAPE, np.float64, 1, "FFTW_MEASURE")
    assert c[0] is not a[0]
    assert len(fftw.plan_records()) == 2


def test_wisdom_reused_after_reset_in_process():
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    fftw._reset_for_tests()  # forgets FFTW's in-memory wisdom too
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    (rec,) = _records(SHAPE)
    assert rec.from_wisdom is True


def test_wisdom_reused_by_fresh_process():
    """A new interpreter plans the same shape from the file: FFTW_WISDOM_ONLY succeeds, nothing new is measured."""
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    before = fftw.wisdom_path().read_bytes()
    out = _run_child(
        f"""
        import numpy as np, pyfftw
        from apfast.diffim import fftw
        fftw.rfft2_pair({SHAPE!r}, np.float32, 1, "FFTW_MEASURE")
        (rec,) = fftw.plan_records()
        print(rec.from_wisdom)
        """
    )
    assert out == "True"
    assert fftw.wisdom_path().read_bytes() == before  # a plan from wisdom does not rewrite the file


def test_concurrent_writers_merge():
    """Plans saved by another process after we loaded the file are kept when we save ours."""
    shape_a, shape_b, shape_c = (16, 12), (18, 10), (20, 14)
    fftw.rfft2_pair(shape_a, np.float32, 1, "FFTW_MEASURE")  # our process: loaded (nothing), saved A
    _run_child(
        f"""
        import numpy as np
        from apfast.diffim import fftw
        fftw.rfft2_pair({shape_b!r}, np.float32, 1, "FFTW_MEASURE")
        """
    )  # another process: loaded A, saved A + B
    fftw.rfft2_pair(shape_c, np.float32, 1, "FFTW_MEASURE")  # ours again: must merge B from disk, not drop it
    fftw._reset_for_tests()
    for shp in (shape_a, shape_b, shape_c):
        fftw.rfft2_pair(shp, np.float32, 1, "FFTW_MEASURE")
        (rec,) = _records(shp)
        assert rec.from_wisdom, shp


# ----------------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize(
    "content",
    [
        b"\x00\x01 not json",
        b'{"format": "something else"}',
        b'{"format": "apfast-fftw-wisdom", "version": 1}',
        b"",
        b"[1, 2]",
    ],
)
def test_corrupt_file_is_ignored_and_replaced(caplog, content):
    path = fftw.wisdom_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="apfast.diffim.fftw"):
        fwd, _, _ = fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert fwd.input_array.shape == SHAPE
    doc = json.loads(path.read_text())  # replaced by a valid file
    assert doc["format"] == "apfast-fftw-wisdom" and len(doc["wisdom"]) == 3


def test_wrong_types_inside_a_valid_looking_file(caplog):
    path = fftw.wisdom_path()
    path.parent.mkdir(parents=True)
    doc = {"format": "apfast-fftw-wisdom", "version": 1, "identity": fftw._identity(), "wisdom": [1, 2, 3]}
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="apfast.diffim.fftw"):
        fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert len(json.loads(path.read_text())["wisdom"][1]) > 0  # rewritten with real single-precision wisdom


def test_foreign_file_is_ignored(caplog):
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    path = fftw.wisdom_path()
    doc = json.loads(path.read_text())
    doc["identity"] = {**doc["identity"], "fftw": "0.0.0"}
    path.write_text(json.dumps(doc))
    fftw._reset_for_tests()
    with caplog.at_level(logging.WARNING, logger="apfast.diffim.fftw"):
        fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    assert any("another pyfftw/FFTW build" in r.getMessage() for r in caplog.records)
    (rec,) = _records(SHAPE)
    assert rec.from_wisdom is False  # the foreign wisdom was not imported


def test_garbage_wisdom_strings_are_survived(caplog):
    fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    path = fftw.wisdom_path()
    doc = json.loads(path.read_text())
    doc["wisdom"] = ["Z2FyYmFnZQ==", "Z2FyYmFnZQ==", ""]  # base64 of "garbage": FFTW rejects it
    path.write_text(json.dumps(doc))
    fftw._reset_for_tests()
    with caplog.at_level(logging.WARNING, logger="apfast.diffim.fftw"):
        fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    assert any("rejected" in r.getMessage() for r in caplog.records)
    (rec,) = _records(SHAPE)
    assert rec.from_wisdom is False


def test_unwritable_cache_dir_warns(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setenv("APFAST_CACHE_DIR", str(blocker / "sub"))
    with caplog.at_level(logging.WARNING, logger="apfast.diffim.fftw"):
        fwd, _, _ = fftw.rfft2_pair(SHAPE, np.float32, 1, "FFTW_MEASURE")
    assert fwd is not None
    assert any("cannot write FFTW wisdom" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("effort", ["FFTW_ESTIMATE", "FFTW_MEASURE"])
def test_transforms_match_numpy(rng, dtype, effort):
    shape = (30, 22)
    img = rng.standard_normal(shape).astype(dtype)
    fwd, inv, lock = fftw.rfft2_pair(shape, dtype, 2, effort)
    assert fwd.output_array is inv.input_array
    with lock:
        fwd.input_array[...] = img
        spec = fwd().copy()
        np.testing.assert_array_equal(fwd.input_array, img)  # forward preserves its input
        back = inv().copy()
    ref = np.fft.rfft2(img.astype(np.float64))
    eps = np.finfo(dtype).eps
    scale = np.sqrt(img.size)  # |spectrum| ~ sqrt(N) for unit-variance noise
    assert spec.dtype == (np.complex64 if dtype == np.float32 else np.complex128)
    assert np.max(np.abs(spec - ref)) < 50 * eps * scale
    assert np.max(np.abs(back - img)) < 50 * eps


def test_shared_plans_between_subtract_and_decorrelate(rng):
    """Both modules use one plan pair per shape; interleaved calls stay correct and never alias outputs."""
    from scipy import signal

    from apfast.diffim import subtract
    from apfast.diffim.decorrelate import convolve_fft

    shape = (40, 36)  # already an FFT-friendly even size: no padding in either module
    img = rng.standard_normal(shape).astype(np.float32)
    k_sym = np.outer(*(2 * [np.exp(-0.5 * (np.arange(-2, 3) / 1.2) ** 2)]))
    k_asym = rng.uniform(0, 1, (1, 5, 5))
    d1 = convolve_fft(img, k_sym, planner="FFTW_ESTIMATE")
    held = d1.copy()
    s1 = subtract.fft_convolve_terms(img, k_asym, planner="FFTW_ESTIMATE")
    d2 = convolve_fft(img, k_sym, planner="FFTW_ESTIMATE")
    np.testing.assert_array_equal(d1, held)  # the caller's array was not reused by a later call
    assert d2 is not d1
    np.testing.assert_array_equal(d1, d2)
    # the decorrelate plans use numba's thread count; with 2 threads both modules share one pair
    if subtract._THREADS == 2:
        import numba

        if numba.get_num_threads() == 2:
            assert len(_records(shape, threads=2)) == 1
    sl = (slice(3, -3), slice(3, -3))  # away from the circular wrap
    ref_s = signal.convolve2d(img.astype(np.float64), k_asym[0], mode="same", boundary="wrap")
    ref_d = signal.convolve2d(img.astype(np.float64), k_sym, mode="same", boundary="wrap")
    tol = 1e-5 * float(np.abs(img).max() * np.abs(k_asym).sum())
    assert np.max(np.abs(s1[0][sl] - ref_s[sl])) < tol
    assert np.max(np.abs(d1[sl] - ref_d[sl])) < tol
    fwd, inv, _ = fftw.rfft2_pair(shape, np.float32, subtract._THREADS, "FFTW_ESTIMATE")
    assert inv.input_array is fwd.output_array  # the decorrelate call gave the plan its arrays back


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("args", "match"),
    [
        (((0, 8), np.float32, 1, "FFTW_MEASURE"), "shape"),
        (((8,), np.float32, 1, "FFTW_MEASURE"), "shape"),
        (((8, 8), np.int32, 1, "FFTW_MEASURE"), "float32 or float64"),
        (((8, 8), np.float32, 0, "FFTW_MEASURE"), "threads"),
        (((8, 8), np.float32, None, "FFTW_MEASURE"), "threads"),
        (((8, 8), np.float32, 1.5, "FFTW_MEASURE"), "threads"),
        (((8, 8), np.float32, 1, "FFTW_FAST"), "FFTW_ESTIMATE"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(InputError, match=match):
        fftw.rfft2_pair(*args)


def test_warmup_plans_the_decam_ccd_grid():
    from apfast.run.warmup import fftw_warmup_shapes

    plans = fftw_warmup_shapes("DECam")
    assert plans
    for shape, threads, effort in plans:
        assert shape == (4096, 2048)  # DECam trimmed CCD, already FFT-friendly in both modules
        assert threads >= 1
        assert effort == "FFTW_MEASURE"
