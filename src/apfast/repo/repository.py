"""Data repositories and their chaining (Gen 2 ``--rerun`` / ``--output`` semantics).

A *root* repository is a folder holding ``registry.sqlite3`` (plus ``camera.toml``,
``calibs/``, ``ref_cats/``, ``raw/``). An *output* repository holds
``repositoryCfg.json`` naming its parent repositories (absolute paths):

- ``--rerun OUT`` creates ``ROOT/rerun/OUT`` with parent ``ROOT``;
- ``--rerun IN:OUT`` creates ``ROOT/rerun/OUT`` with parent ``ROOT/rerun/IN``
  (which itself chains to ``ROOT``);
- ``--output DIR`` creates a standalone ``DIR`` with parent ``ROOT``.

Reads search the chain (the repository itself, then its parents depth first);
writes go to the repository itself. Re-using an output repository with a
different parent is an error naming both, as in Gen 2.

Examples
--------
>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> _ = (root / "registry.sqlite3").write_bytes(b"")
>>> out = create_output_repo(root, rerun="processed")
>>> out.relative_to(root).as_posix()
'rerun/processed'
>>> [p.name for p in Repository(out).chain] == ["processed", root.name]
True
"""

from __future__ import annotations

import datetime as _dt
import difflib
import hashlib
import json
import logging
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apfast._fileio import atomic_path
from apfast.errors import ConfigError, InputError

__all__ = [
    "CONFIG_RELPATH",
    "NON_PRODUCT_KEYS",
    "REGISTRY_NAME",
    "REPO_CFG_NAME",
    "Repository",
    "create_output_repo",
    "is_product_key",
    "write_config",
]

log = logging.getLogger(__name__)

REGISTRY_NAME = "registry.sqlite3"
REPO_CFG_NAME = "repositoryCfg.json"
CONFIG_RELPATH = Path("config") / "apfast.toml"
_CFG_FORMAT = "apfast-repository-1"


#: Config keys (a section name ending in ``.`` covers the whole section) that cannot change any product
#: of a run: where the APDB lives and how it is reached, threads, error handling and overwriting. A
#: rerun's stored config (``config/apfast.toml``) that differs from a new run's only in these keys is
#: not a configuration change: the new run's config replaces it without ``--clobber-config``. The
#: command-line options ``-j``, ``--executor`` and the log level are not config keys, so never compared.
NON_PRODUCT_KEYS: tuple[str, ...] = (
    "apdb.",  # db_url, isolation_level, connection_timeout, connection_pool: where rows go, not what they are
    "process.",  # n_threads, doraise, clobber_output, skip_missing_templates
    "subtract.",  # only `apfast subtract` reads these
)


def is_product_key(key: str) -> bool:
    """Whether dotted config ``key`` can change a product (it is not covered by :data:`NON_PRODUCT_KEYS`).

    Examples
    --------
    >>> is_product_key("difference.psfmatch.kernel_size"), is_product_key("apdb.db_url")
    (True, False)
    """
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in NON_PRODUCT_KEYS)


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path, mkdir=False, reserve=False) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / REPO_CFG_NAME
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        msg = f"repository config {cfg_path} cannot be read ({exc}); delete the folder or fix the file"
        raise InputError(msg) from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("parents"), list):
        msg = f"repository config {cfg_path} has no 'parents' list; it was not written by apfast"
        raise InputError(msg)
    return cfg


class Repository:
    """A data repository folder and its chain of parents.

    Parameters
    ----------
    path : str or Path
        The repository folder: a root (has ``registry.sqlite3``), an output
        repository (has ``repositoryCfg.json``) or a plain folder of datasets
        (e.g. a template repository), which then has no parents.

    Attributes
    ----------
    path : Path
        Absolute, resolved folder.
    parents : list of Path
        Direct parents from ``repositoryCfg.json`` (empty for a root).

    Raises
    ------
    InputError
        If the folder does not exist, its config is unreadable, a parent is
        missing, or the parents form a cycle.
    """

    def __init__(self, path: str | Path) -> None:
        p = Path(path).expanduser()
        if not p.is_dir():
            msg = (
                f"repository {p} does not exist or is not a folder; ingest raws into it or create it with "
                f"--rerun/--output"
            )
            raise InputError(msg)
        self.path = p.resolve()
        self.cfg: dict[str, Any] = {}
        self.parents: list[Path] = []
        if (self.path / REPO_CFG_NAME).is_file():
            self.cfg = _read_cfg(self.path)
            self.parents = [Path(x) for x in self.cfg["parents"]]
        for parent in self.parents:
            if not parent.is_dir():
                msg = (
                    f"repository {self.path} names parent {parent} in {REPO_CFG_NAME}, but that folder does "
                    "not exist; restore it or recreate this output repository"
                )
                raise InputError(msg)
        self.chain: list[Path] = self._build_chain()

    def _build_chain(self) -> list[Path]:
        chain: list[Path] = []

        def visit(p: Path, stack: tuple[Path, ...]) -> None:
            if p in stack:
                cycle = " -> ".join(str(s) for s in (*stack, p))
                msg = f"repository parents form a cycle: {cycle}; fix {REPO_CFG_NAME} of one of them"
                raise InputError(msg)
            if p not in chain:
                chain.append(p)
            if p == self.path:
                parents = self.parents
            elif (p / REPO_CFG_NAME).is_file():
                parents = [Path(x) for x in _read_cfg(p)["parents"]]
            else:
                parents = []
            for q in parents:
                if not q.is_dir():
                    msg = f"repository {p} names parent {q}, which does not exist; restore it or recreate {p}"
                    raise InputError(msg)
                visit(q.resolve(), (*stack, p))

        visit(self.path, ())
        return chain

    def __repr__(self) -> str:
        return f"Repository({str(self.path)!r})"

    @property
    def is_root(self) -> bool:
        """Whether this folder holds the raw registry."""
        return (self.path / REGISTRY_NAME).is_file()

    @property
    def root(self) -> Path:
        """The first repository of the chain holding ``registry.sqlite3``.

        Raises
        ------
        InputError
            If no repository of the chain has a registry.
        """
        for p in self.chain:
            if (p / REGISTRY_NAME).is_file():
                return p
        msg = (
            f"no repository in the chain {[str(p) for p in self.chain]} holds {REGISTRY_NAME}; "
            "ingest raw files first (apfast ingest REPO raws...) or point to the repository that has them"
        )
        raise InputError(msg)

    @property
    def write_root(self) -> Path:
        """Where new datasets are written: the repository itself."""
        return self.path

    def candidates(self, relpath: str | Path) -> list[Path]:
        """Every location searched for ``relpath``, in chain order."""
        return [p / relpath for p in self.chain]

    def resolve(self, relpath: str | Path) -> Path | None:
        """Return the first existing ``<repo>/relpath`` along the chain, or ``None``."""
        for cand in self.candidates(relpath):
            if cand.exists():
                return cand
        return None


def _check_name(name: str, what: str) -> str:
    bad = (
        not name
        or name.startswith(".")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or (os.sep in name)
        or (os.altsep is not None and os.altsep in name)
    )
    if bad:
        msg = (
            f"{what} {name!r} is not a valid name: use letters, digits, '-', '_' (no '/', '..' or leading "
            f"'.')"
        )
        raise ConfigError(msg)
    return name


def _ensure_output(out: Path, parent: Path, info: dict[str, Any]) -> Path:
    parent = parent.resolve()
    if out.exists():
        out_r = out.resolve()
        if out_r == parent:
            msg = f"output repository {out} is the same folder as its input; choose another --rerun/--output"
            raise ConfigError(msg)
        if (out / REPO_CFG_NAME).is_file():
            cfg = _read_cfg(out)
            have = [str(Path(x)) for x in cfg["parents"]]
            if have != [str(parent)]:
                msg = (
                    f"output repository {out_r} already exists with parent(s) {have}, but this run would "
                    f"chain it "
                    f"to {parent}; use a new --rerun/--output name or the original input"
                )
                raise ConfigError(msg)
            return out_r
        if (out / REGISTRY_NAME).is_file():
            msg = (
                f"{out_r} is a root repository (it has {REGISTRY_NAME}); it cannot be used as an output "
                f"repository"
            )
            raise ConfigError(msg)
        if any(out.iterdir()):
            msg = (
                f"output folder {out_r} exists, is not empty and is not an apfast repository "
                f"(no {REPO_CFG_NAME}); choose an empty or new folder"
            )
            raise ConfigError(msg)
    from apfast import __version__

    out.mkdir(parents=True, exist_ok=True)
    cfg = {
        "format": _CFG_FORMAT,
        "parents": [str(parent)],
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "apfast_version": __version__,
        **info,
    }
    _write_text_atomic(out / REPO_CFG_NAME, json.dumps(cfg, indent=2) + "\n")
    log.info("created output repository %s (parent %s)", out.resolve(), parent)
    return out.resolve()


def create_output_repo(
    input_repo: str | Path, *, rerun: str | None = None, output: str | Path | None = None
) -> Path:
    """Create (or re-open) the output repository of a run and return its absolute path.

    Parameters
    ----------
    input_repo : str or Path
        The input repository ``ROOT`` (the positional argument of ``apfast process``).
    rerun : str, optional
        ``'OUT'`` -> ``ROOT/rerun/OUT`` chained to ``ROOT``; ``'IN:OUT'`` ->
        ``ROOT/rerun/OUT`` chained to ``ROOT/rerun/IN`` (which must exist).
    output : str or Path, optional
        A standalone output folder chained to ``ROOT``. Exclusive with ``rerun``.

    Returns
    -------
    Path
        The output repository (created with ``repositoryCfg.json`` if new).

    Raises
    ------
    ConfigError
        If both or neither of ``rerun``/``output`` are given, a name is invalid,
        or an existing output repository has a different parent (message names both).
    InputError
        If the input repository (or ``ROOT/rerun/IN``) does not exist.
    """
    if (rerun is None) == (output is None):
        msg = "give exactly one of --rerun and --output (they are mutually exclusive)"
        raise ConfigError(msg)
    root = Repository(input_repo)
    if rerun is not None:
        parts = str(rerun).split(":")
        if len(parts) > 2:
            msg = f"--rerun {rerun!r} has more than one ':'; use OUT or IN:OUT"
            raise ConfigError(msg)
        out_name = _check_name(parts[-1], "rerun")
        parent = root.path
        if len(parts) == 2:
            in_name = _check_name(parts[0], "rerun input")
            parent = root.path / "rerun" / in_name
            if not parent.is_dir():
                msg = f"--rerun {rerun}: input rerun {parent} does not exist; run --rerun {in_name} first"
                raise InputError(msg)
            Repository(parent)  # validates its own chain
        return _ensure_output(root.path / "rerun" / out_name, parent, {"mode": "rerun", "rerun": str(rerun)})
    return _ensure_output(Path(output).expanduser(), root.path, {"mode": "output"})  # type: ignore[arg-type]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


_UNSET = object()


def _fmt(value: Any) -> str:
    """A config value as written in TOML (``true``, ``"text"``, ``21``, ``[1, 2]``), or ``<unset>``."""
    if value is _UNSET:
        return "<unset>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return repr(value)


def _differing_keys(old: str, new: str, normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                    ) -> list[tuple[str, Any, Any]] | None:
    """``(dotted key, old value, new value)`` of every key that differs; ``None`` if either is not TOML.

    With ``normalize`` (the run layer passes :func:`apfast.run.config.comparable_settings`) both sides
    are read under the current keys, so a config stored with keys that have since moved (``diffim.*``)
    equals the same settings written now.
    """
    norm = normalize if normalize is not None else (lambda flat: flat)
    try:
        a = norm(_flatten(tomllib.loads(old)))
        b = norm(_flatten(tomllib.loads(new)))
    except tomllib.TOMLDecodeError:
        return None
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, _UNSET) != b.get(k, _UNSET))
    return [(k, a.get(k, _UNSET), b.get(k, _UNSET)) for k in keys]


def _describe(diffs: list[tuple[str, Any, Any]], limit: int = 10) -> str:
    if not diffs:
        return "comments only"
    shown = "; ".join(f"{k} {_fmt(a)} -> {_fmt(b)}" for k, a, b in diffs[:limit])
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return shown + more


def _line_difference(old: str, new: str) -> str:
    diff = [
        line
        for line in difflib.unified_diff(old.splitlines(), new.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    return "differing lines: " + " | ".join(diff[:10])


def write_config(repo: str | Path | Repository, toml_text: str, *, clobber: bool = False,
                 normalize: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> str:
    """Persist the run configuration in ``<repo>/config/apfast.toml`` (+ ``.sha256``).

    Parameters
    ----------
    repo : str, Path or Repository
        The output repository.
    toml_text : str
        The effective configuration (``apfast config show`` text).
    clobber : bool
        Overwrite a stored config that differs (Gen 2 ``--clobber-config``).
    normalize : callable, optional
        Maps a flat ``{dotted key: value}`` config to the current keys before comparing
        (:func:`apfast.run.config.comparable_settings`); by default keys are compared as written.

    Returns
    -------
    str
        The sha256 (hex) of ``toml_text``, for ``write_exposure(config_sha=...)``.

    Raises
    ------
    ConfigError
        If a config differing in a product-affecting key is already stored and
        ``clobber`` is false; the message lists those keys with old and new values.

    Notes
    -----
    Keys of :data:`NON_PRODUCT_KEYS` (the ``apdb`` and ``process``
    sections) are left out of the comparison: a run that differs
    from the stored config only there replaces it (the full config is stored
    either way), so ``process-ccd`` then ``process -c apdb.db_url=...`` into one
    rerun works. With ``normalize`` both configs are compared under the current keys, so a
    config an earlier version stored with keys that have since moved or been removed
    (:func:`apfast.run.config.comparable_settings`) equals the same settings now.
    """
    base = repo.write_root if isinstance(repo, Repository) else Path(repo)
    sha = hashlib.sha256(toml_text.encode("utf-8")).hexdigest()
    path = base / CONFIG_RELPATH
    sha_path = path.with_name(path.name + ".sha256")
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        old_sha = hashlib.sha256(old.encode("utf-8")).hexdigest()
        if old_sha == sha:
            if not sha_path.is_file():
                _write_text_atomic(sha_path, sha + "\n")
            return sha
        diffs = _differing_keys(old, toml_text, normalize)
        product = None if diffs is None else [d for d in diffs if is_product_key(d[0])]
        # only keys that cannot change a product (NON_PRODUCT_KEYS)
        if diffs is not None and product == []:
            log.info("%s: updating run settings that do not change products: %s", path, _describe(diffs))
        elif not clobber:
            what = _line_difference(old, toml_text) if product is None else _describe(product)
            msg = (
                f"{path} holds a different configuration: {what}; pass --clobber-config to replace it or "
                f"use a new --rerun/--output"
            )
            raise ConfigError(msg)
        else:
            log.warning("overwriting configuration %s (--clobber-config)", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(path, toml_text)
    _write_text_atomic(sha_path, sha + "\n")
    return sha
