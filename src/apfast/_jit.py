"""The only place numba decorators are configured, and the on-disk kernel cache they share.

``jit`` is for serial kernels (GIL released, numpy error model so ``1/0`` gives
``inf`` instead of raising); ``pjit`` for ``prange`` kernels. Both are cached on
disk (numba caches ``parallel=True`` kernels since 0.45), in a cache that is safe
where numba's own is not:

* **Keyed on the source.** numba re-validates a cached function against its own
  file only, so editing a callee in another module would run the caller's old
  machine code. Here the cache directory is named after a hash of every file of
  :mod:`apfast.kernels`, this module and the numba/llvmlite/numpy/Python versions
  (:func:`kernel_cache_dir`): any edit gives a new, empty directory.
* **Concurrent builds.** numba numbers a function's data files from its index
  file; two processes saving different signatures at once can both take number
  1 and leave an index that points at the other's machine code. Every save here
  holds an exclusive file lock on the directory (:func:`write_lock`), so the
  index read-modify-write is atomic between processes; numba already replaces
  each file atomically, so a reader never sees a half-written entry.
* **Location.** ``$APFAST_CACHE_DIR/kernels/<key>/`` (default
  ``~/.cache/apfast``, beside the FFTW wisdom): per user and machine, never in the
  source tree or site-packages.

A serial and a parallel dispatcher of one Python function (``jit(f.py_func)``
beside ``@pjit f``) get separate index files, since numba's index key does not
tell them apart. ``APFAST_NUMBA_CACHE=0`` turns the disk cache off. Building the
whole cache once (``apfast warmup``, or the first CLI process that finds it
incomplete, under :func:`build_lock`) is :mod:`apfast.run.warmup`'s job.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numba
from numba.core import caching
from numba.core.dispatcher import Dispatcher

__all__ = ["CACHE", "build_lock", "cache_root", "jit", "kernel_cache_dir", "kernel_source_key", "pjit", "write_lock"]

log = logging.getLogger(__name__)

CACHE: bool = os.environ.get("APFAST_NUMBA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")

_OPTIONS: dict[str, Any] = {"nogil": True, "error_model": "numpy"}


def cache_root() -> Path:
    """apfast's per-user cache folder: ``$APFAST_CACHE_DIR``, ``$XDG_CACHE_HOME/apfast`` or ``~/.cache/apfast``."""
    env = os.environ.get("APFAST_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "apfast"
    return Path.home() / ".cache" / "apfast"


def _kernel_sources() -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("apfast.kernels")  # kernels/ in a checkout, apfast/kernels/ in a wheel
    dirs = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    # api.py (the array-level wrappers for other codes) defines no kernels: editing it keeps the cache
    kernel_files = sorted(p for d in dirs for p in d.glob("*.py") if p.name != "api.py")
    return [*kernel_files, Path(__file__).resolve()]


_KEY: str | None = None


def kernel_source_key() -> str:
    """Hash of the kernel sources, this module and the compiler/runtime versions (16 hex digits)."""
    global _KEY  # computed once per process
    if _KEY is None:
        import llvmlite
        import numpy

        h = hashlib.sha256()
        for v in (numba.__version__, llvmlite.__version__, numpy.__version__, sys.version, platform.machine()):
            h.update(v.encode() + b"\0")
        for p in _kernel_sources():
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
        _KEY = h.hexdigest()[:16]
    return _KEY


def kernel_cache_dir() -> Path:
    """The directory this process's kernels are cached in: ``cache_root()/kernels/<kernel_source_key()>``."""
    return cache_root() / "kernels" / kernel_source_key()


@contextlib.contextmanager
def _flock(name: str, *, blocking: bool = True) -> Iterator[bool]:
    path = kernel_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def write_lock() -> contextlib.AbstractContextManager[bool]:
    """Exclusive lock held while one cache entry is saved (milliseconds)."""
    return _flock(".write.lock")


def build_lock(*, blocking: bool = True) -> contextlib.AbstractContextManager[bool]:
    """Exclusive lock held while a process builds the whole cache; yields False if ``blocking=False`` and taken."""
    return _flock(".build.lock", blocking=blocking)


class _KernelLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """Puts a kernel module's entries in ``kernel_cache_dir()/<module>``, stamped with the source key."""

    def __init__(self, py_func: Callable[..., Any], py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        self._cache_path = str(kernel_cache_dir() / Path(py_file).stem)

    def get_cache_path(self) -> str:
        return self._cache_path

    def get_source_stamp(self) -> str:
        # the key covers every kernel file, so a fresh clone of the same sources reuses the cache
        return kernel_source_key()

    @classmethod
    def from_function(cls, py_func: Callable[..., Any], py_file: str) -> _KernelLocator | None:
        # unlike numba's locators, no write check here: a cache warmed once may be read-only (a shared
        # folder on a cluster); a failed save is handled in _KernelCache.save_overload
        return cls(py_func, py_file) if os.path.exists(py_file) else None


class _SerialImpl(caching.CompileResultCacheImpl):
    _locator_classes = [_KernelLocator]  # numba's class attribute


class _ParallelImpl(_SerialImpl):
    @property
    def filename_base(self) -> str:
        return "par-" + super().filename_base


class _KernelCache(caching.FunctionCache):
    _impl_class = _SerialImpl

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            return super().load_overload(sig, target_context)
        except OSError as exc:  # an unreadable cache folder: compile instead
            _warn_once(f"cannot read the kernel cache in {kernel_cache_dir()} ({exc}); kernels compile in memory: "
                       "set APFAST_CACHE_DIR to a usable folder")
            return None

    def _save_overload(self, sig: Any, data: Any) -> None:
        # numba's own body, with only the index/data file update under the lock: serialising the
        # library (emitting its object code) is compilation work that must stay parallel
        if not self._enabled or not self._impl.check_cachable(data):
            return
        self._impl.locator.ensure_cache_path()
        key = self._index_key(sig, data.codegen)
        payload = self._impl.reduce(data)
        with write_lock():
            self._cache_file.save(key, payload)

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)
        except OSError as exc:  # read-only or full cache folder: keep the compiled kernel in memory only
            _warn_once(f"cannot save compiled kernels in {kernel_cache_dir()} ({exc}); they are kept in memory "
                       "for this process only: set APFAST_CACHE_DIR to a writable folder")


class _ParallelKernelCache(_KernelCache):
    _impl_class = _ParallelImpl


_WARNED: list[str] = []


def _warn_once(msg: str) -> None:
    if not _WARNED:
        _WARNED.append(msg)
        log.warning("%s", msg)


def _decorator(parallel: bool) -> Callable[[Callable[..., Any]], Any]:
    opts = {**_OPTIONS, **({"parallel": True} if parallel else {})}
    cache_cls = _ParallelKernelCache if parallel else _KernelCache

    def decorate(func: Callable[..., Any]) -> Any:
        disp = numba.njit(cache=False, **opts)(func)
        if CACHE and isinstance(disp, Dispatcher):  # NUMBA_DISABLE_JIT=1 returns the Python function
            try:
                # what numba's enable_caching does; the private attribute is not in numba's type stubs
                disp._cache = cache_cls(disp.py_func)  # type: ignore[attr-defined]
            except (OSError, RuntimeError) as exc:  # e.g. no home folder: compile in memory
                _warn_once(f"kernel cache unusable at {kernel_cache_dir()} ({exc}); kernels compile in memory in "
                           "every process: set APFAST_CACHE_DIR to a writable folder")
        return disp

    return decorate


jit = _decorator(parallel=False)
pjit = _decorator(parallel=True)
