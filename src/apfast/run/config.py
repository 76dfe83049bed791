"""Pipeline configuration: frozen dataclasses, TOML files and ``-c key=value`` overrides.

The configuration follows LSST ``pex_config`` semantics in dataclass form
(Rubin's pex_config semantics, as dataclasses). Each stage has a frozen, keyword-only config class whose
fields all carry a type, a default and a ``doc``; :class:`PipelineConfig` nests
one instance of each. Adding a stage is one new class plus one line in
:class:`PipelineConfig`.

Settings are applied in order and later settings win:

1. the defaults (or ``base``),
2. each ``-C file.toml`` in the order given (nested tables ``[apdb]`` or dotted
   keys ``apdb.db_url = ...``),
3. each ``-c key=value`` override in the order given.

An override value is parsed as a TOML literal (``999``, ``false``, ``"text"``,
``[1, 2]``). For ``str`` and ``Literal``-of-``str`` fields, text that is not a
TOML string is taken as is, so ``-c apdb.isolation_level=READ_UNCOMMITTED`` and
``-c apdb.db_url=sqlite:///apdb/association.db`` work unquoted. A field typed
``X | None`` is set to ``None`` with the string ``none`` (``-c
calibs.validity_days=none``, or ``validity_days = "none"`` in a file).

Examples
--------
>>> cfg = load_config(overrides=["apdb.isolation_level=READ_UNCOMMITTED", "calibs.validity_days=999"])
>>> cfg.apdb.isolation_level, cfg.calibs.validity_days
('READ_UNCOMMITTED', 999.0)
>>> load_config(overrides=["apdb.db_ur=x"])
Traceback (most recent call last):
...
apfast.errors.ConfigError: unknown config key 'apdb.db_ur'; did you mean 'apdb.db_url'? (from -c apdb.db_ur=x)

"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from apfast._configbase import (
    _MISSING,
    NONE_TEXT,
    ConfigSection,
    _check_value,
    _ConfigError,
    _hints,
    _is_optional,
    _is_section,
    _is_text,
    _union_args,
    describe_type,
    opt,
    subsection,
)
from apfast.errors import ConfigError

__all__ = [
    "ApdbConfig",
    "ConfigSection",
    "CalibsConfig",
    "FieldInfo",
    "IngestConfig",
    "NON_PRODUCT_KEYS",
    "PipelineConfig",
    "ProcessConfig",
    "RefcatConfig",
    "apply_overrides",
    "config_fields",
    "config_sha256",
    "config_to_toml",
    "describe_type",
    "is_product_key",
    "load_config",
    "opt",
    "subsection",
]



# --------------------------------------------------------------------------------------------------
# The sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestConfig(ConfigSection):
    """How raw files enter the repository (``apfast ingest``)."""

    mode: Literal["link", "copy", "move"] = opt(
        "link",
        "How each raw file is placed in the repository.",
        choices={
            "link": "symlink to the original file (fast; the original must stay in place)",
            "copy": "copy the file (safe; doubles disk use)",
            "move": "move the file into the repository (the original path disappears)",
        },
    )
    camera: str = opt(
        "DECam", "Camera name of a built-in camera (e.g. DECam) or the path of a camera TOML file."
    )

    def _validate(self) -> None:
        if not self.camera.strip():
            self._fail(
                "camera", self.camera, "give a built-in camera name such as 'DECam' or a camera TOML path"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibsConfig(ConfigSection):
    """Master calibrations (bias, flat, defects) and how long each stays valid."""

    validity_days: float | None = opt(
        None,
        "Days either side of a calibration's date during which it may be used; none = per-format defaults.",
    )

    def _validate(self) -> None:
        v = self.validity_days
        if v is not None and not (math.isfinite(v) and v >= 0):
            self._fail("validity_days", v, "use a finite number of days >= 0, or none for the defaults")


@dataclass(frozen=True, slots=True, kw_only=True)
class RefcatConfig(ConfigSection):
    """Reference catalogues for astrometry and photometry."""

    astrometry: str = opt(
        "gaia", "Name of the reference catalogue used for astrometry (folder under ref_cats/)."
    )
    photometry: str = opt(
        "ps1", "Name of the reference catalogue used for photometry (folder under ref_cats/)."
    )
    nside: int = opt(32, "HEALPix nside (a power of 2) of the catalogue shards; 32 gives ~1.8 deg pixels.")

    def _validate(self) -> None:
        for name in ("astrometry", "photometry"):
            value = getattr(self, name)
            if not value.strip() or "/" in value or "\\" in value:
                self._fail(
                    name, value, "give a catalogue folder name under ref_cats/, such as 'gaia' or 'ps1'"
                )
        n = self.nside
        if n < 1 or n > 2**13 or n & (n - 1):
            self._fail("nside", n, "use a power of 2 between 1 and 8192, e.g. 32")


_DB_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.+-]*://")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApdbConfig(ConfigSection):
    """The Alert Production Database (DIA objects, sources and forced sources)."""

    db_url: str = opt(
        "sqlite:///apdb/association.db",
        "SQLAlchemy URL of the APDB, e.g. sqlite:///apdb/association.db or postgresql://host/db.",
    )
    isolation_level: Literal["READ_COMMITTED", "READ_UNCOMMITTED", "REPEATABLE_READ", "SERIALIZABLE"] = opt(
        "READ_COMMITTED",
        "Transaction isolation level of APDB connections.",
        choices={
            "READ_COMMITTED": "see only committed rows (the usual choice)",
            "READ_UNCOMMITTED": "also see uncommitted rows (what Rubin uses with SQLite)",
            "REPEATABLE_READ": "rows read stay unchanged for the transaction",
            "SERIALIZABLE": "full isolation; slowest with concurrent writers",
        },
    )
    connection_timeout: float = opt(60.0, "Seconds to wait for a connection or a database lock (> 0).")
    connection_pool: bool = opt(True, "Keep a pool of open connections; false opens one per transaction.")

    def _validate(self) -> None:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in self.db_url):
            self._fail("db_url", self.db_url.encode("unicode_escape").decode("ascii"),
                       "remove the control characters (newline, NUL, ...) from the URL")
        if not _DB_URL_RE.match(self.db_url):
            self._fail(
                "db_url", self.db_url, "give an SQLAlchemy URL such as 'sqlite:///apdb/association.db'"
            )
        t = self.connection_timeout
        if not (math.isfinite(t) and t > 0):
            self._fail("connection_timeout", t, "use a finite number of seconds > 0, e.g. 60")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessConfig(ConfigSection):
    """How ``apfast process`` runs: threads, error handling, overwriting."""

    n_threads: int = opt(0, "Numba threads per process; 0 uses all cores.")
    doraise: bool = opt(False, "Stop at the first failing dataId instead of logging it and going on.")
    clobber_output: bool = opt(False, "Overwrite existing outputs instead of refusing to run.")
    skip_missing_templates: bool = opt(
        False,
        "Skip (status 'skipped', exit 0) a CCD that no template covers instead of failing it (exit 1); "
        "--skip-missing-templates sets it.",
    )

    def _validate(self) -> None:
        if self.n_threads < 0:
            self._fail("n_threads", self.n_threads, "use 0 for all cores or a positive thread count")


# The stage sections are defined beside their stages (they import only apfast._configbase).
from apfast.ccd.calibrate import CalibrateConfig  # noqa: E402
from apfast.ccd.characterize import CharacterizeConfig  # noqa: E402
from apfast.ccd.isr import IsrConfig  # noqa: E402
from apfast.dia.alerts import AlertsConfig  # noqa: E402
from apfast.dia.association import AssociationConfig  # noqa: E402
from apfast.dia.diapipe import DiaPipeConfig  # noqa: E402
from apfast.dia.diasource import DiaSourceConfig  # noqa: E402
from apfast.diffim.coadd import CoaddConfig  # noqa: E402
from apfast.diffim.decorrelate import DecorrelationConfig  # noqa: E402
from apfast.diffim.pair import SubtractConfig  # noqa: E402
from apfast.diffim.psfmatch import PsfMatchConfig  # noqa: E402
from apfast.diffim.stage import DifferenceConfig  # noqa: E402
from apfast.diffim.template import TemplateConfig  # noqa: E402
from apfast.diffim.warp import WarpConfig  # noqa: E402
from apfast.repo.writer import OutputConfig  # noqa: E402


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig(ConfigSection):
    """The whole pipeline: one section per stage (add a section with one line here)."""

    ingest: IngestConfig = subsection(IngestConfig)
    calibs: CalibsConfig = subsection(CalibsConfig)
    refcat: RefcatConfig = subsection(RefcatConfig)
    apdb: ApdbConfig = subsection(ApdbConfig)
    process: ProcessConfig = subsection(ProcessConfig)
    output: OutputConfig = subsection(OutputConfig)
    isr: IsrConfig = subsection(IsrConfig)
    characterize: CharacterizeConfig = subsection(CharacterizeConfig)
    calibrate: CalibrateConfig = subsection(CalibrateConfig)
    warp: WarpConfig = subsection(WarpConfig)
    coadd: CoaddConfig = subsection(CoaddConfig)
    template: TemplateConfig = subsection(TemplateConfig)
    difference: DifferenceConfig = subsection(DifferenceConfig)
    diffim: PsfMatchConfig = subsection(PsfMatchConfig)
    decorrelation: DecorrelationConfig = subsection(DecorrelationConfig)
    dia: DiaSourceConfig = subsection(DiaSourceConfig)
    association: AssociationConfig = subsection(AssociationConfig)
    alerts: AlertsConfig = subsection(AlertsConfig)
    dia_pipe: DiaPipeConfig = subsection(DiaPipeConfig)
    subtract: SubtractConfig = subsection(SubtractConfig)


#: Config keys (a section name ending in ``.`` covers the whole section) that cannot change any product
#: of a run: where the APDB lives and how it is reached, threads, error handling and overwriting. A
#: rerun's stored config (``config/apfast.toml``) that differs from a new run's only in these keys is
#: not a configuration change: the new run's config replaces it without ``--clobber-config``. The
#: command-line options ``-j``, ``--executor`` and the log level are not config keys, so never compared.
NON_PRODUCT_KEYS: tuple[str, ...] = (
    "apdb.",  # db_url, isolation_level, connection_timeout, connection_pool: where rows go, not what they are
    "process.",  # n_threads, doraise, clobber_output, skip_missing_templates
    "ingest.mode",  # link/copy/move of raws: the same pixels either way
    "subtract.",  # only `apfast subtract` reads these
)


def is_product_key(key: str) -> bool:
    """Whether dotted config ``key`` can change a product (it is not covered by :data:`NON_PRODUCT_KEYS`).

    Examples
    --------
    >>> is_product_key("diffim.kernel_size"), is_product_key("apdb.db_url")
    (True, False)
    """
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in NON_PRODUCT_KEYS)


class FieldInfo(NamedTuple):
    """One config key as listed by :func:`config_fields`: its annotation, default and doc."""

    type: Any
    default: Any
    doc: str


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def _register_prefixes(cls: type, prefix: str) -> None:
    """Tell every nested section class its dotted prefix, so its messages name full keys."""
    cls._key_prefix = prefix  # type: ignore[attr-defined]
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            _register_prefixes(tp, f"{prefix}{name}.")


_register_prefixes(PipelineConfig, "")


def config_fields(cls: type = PipelineConfig) -> dict[str, FieldInfo]:
    """List every leaf key of a config class by dotted name.

    Parameters
    ----------
    cls : type, optional
        A config class; the default lists the whole pipeline.

    Returns
    -------
    dict of str to FieldInfo
        ``{"apdb.db_url": FieldInfo(type=str, default='sqlite:///...', doc='...'), ...}``
        in declaration order. ``FieldInfo`` is a named tuple ``(type, default, doc)``.

    Examples
    --------
    >>> info = config_fields()["apdb.connection_timeout"]
    >>> info.type, info.default
    (<class 'float'>, 60.0)

    """
    out: dict[str, FieldInfo] = {}
    _collect_fields(cls, "", out, cls())
    return out


def _collect_fields(cls: type, prefix: str, out: dict[str, FieldInfo], instance: Any) -> None:
    """Walk the default ``instance`` so a section nested with a non-default factory reports its real defaults."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(instance, f.name)
        if _is_section(tp):
            _collect_fields(tp, f"{prefix}{f.name}.", out, value)
            continue
        out[f"{prefix}{f.name}"] = FieldInfo(tp, value, f.metadata.get("doc", ""))


def _all_keys() -> list[str]:
    """Every dotted key, sections included (for suggestions)."""
    keys: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for name, tp in _hints(cls).items():
            keys.append(f"{prefix}{name}")
            if _is_section(tp):
                walk(tp, f"{prefix}{name}.")

    walk(PipelineConfig, "")
    return keys


def _unknown_key(key: str, source: str) -> ConfigError:
    keys = _all_keys()
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:
        # A bare leaf name ("db_url") or a stale section name: match on the last component.
        last = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] == last][:3]
    where = f" ({source})" if source else ""
    if close:
        hint = " or ".join(f"'{k}'" for k in close)
        msg = f"unknown config key '{key}'; did you mean {hint}?{where}"
    else:
        sections = ", ".join(k for k in keys if "." not in k)
        msg = (
            f"unknown config key '{key}'{where}; keys are section.name with sections {sections}; "
            "`apfast config show` lists them all"
        )
    return _ConfigError(msg, key)


def _resolve(key: str, source: str) -> Any:
    """Return the annotation of dotted ``key`` (a leaf or a section) or raise for unknown keys."""
    cls: Any = PipelineConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not _is_section(cls):
            raise _unknown_key(key, source)
        hints = _hints(cls)
        if part not in hints:
            raise _unknown_key(key, source)
        cls = hints[part]
        if i == len(parts) - 1:
            return cls
    raise _unknown_key(key, source)  # pragma: no cover - empty key is caught earlier


# --------------------------------------------------------------------------------------------------
# Settings: (dotted key, typed value, source), collected from files and overrides
# --------------------------------------------------------------------------------------------------


class _Setting(NamedTuple):
    key: str
    value: Any
    source: str


def _leaf_settings(key: str, value: Any, source: str) -> list[_Setting]:
    """Type-check one value for ``key``; a table given for a section is expanded into its keys."""
    tp = _resolve(key, source)
    if _is_section(tp):
        if isinstance(value, Mapping):
            out: list[_Setting] = []
            for sub, v in value.items():
                out.extend(_leaf_settings(f"{key}.{sub}", v, source))
            return out
        example = next(iter(config_fields(tp)))
        msg = (
            f"config key '{key}' is a section, not a value ({source}); "
            f"set one of its keys instead, e.g. '{key}.{example}'"
        )
        raise _ConfigError(msg, key)
    if isinstance(value, Mapping):
        msg = (
            f"config key '{key}' is a value ({describe_type(tp)}), not a table ({source}); "
            f"write {key} = <value>"
        )
        raise _ConfigError(msg, key)
    return [_Setting(key, _check_value(value, tp, key, source), source)]


#: Rubin's ap_pipe spellings users copy from its documentation, and the apfast keys they mean
#: (``apfast config show`` lists them).
RUBIN_KEYS: dict[str, str] = {
    "diaPipe.apdb.db_url": "apdb.db_url",
    "diaPipe.apdb.isolation_level": "apdb.isolation_level",
    "diaPipe.apdb.connection_timeout": "apdb.connection_timeout",
}


def _parse_override(text: str) -> list[_Setting]:
    """Parse one ``-c key=value`` string (value is a TOML literal, or raw text for string keys)."""
    source = "from -c " + (text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text)
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        msg = (
            f"malformed config override {text!r}: expected KEY=VALUE with a dotted key, "
            "e.g. -c apdb.connection_timeout=30 or -c apdb.db_url=sqlite:///apdb/association.db"
        )
        raise ConfigError(msg)
    key = RUBIN_KEYS.get(key, key)
    tp = _resolve(key, source)
    raw = raw.strip()
    value: Any = _MISSING
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        parsed = None
    if parsed is not None and list(parsed) == ["v"]:
        value = parsed["v"]
    if _is_text(tp) and not isinstance(value, str):
        # Rubin users type string values unquoted: keep the text as typed.
        value = raw
    if value is _MISSING:
        if raw.lower() == NONE_TEXT and _is_optional(tp):
            value = None
        else:
            msg = (
                f"config override {text!r}: {raw!r} is not a valid TOML value for '{key}' "
                f"(expected {describe_type(tp)}), e.g. -c {key}={_example(tp)}"
            )
            raise _ConfigError(msg, key)
    return _leaf_settings(key, value, source)


def _example(tp: Any) -> str:
    args = _union_args(tp)
    if args is not None:
        return _example(next(a for a in args if a is not type(None)))
    return {bool: "true", int: "4", float: "2.5"}.get(tp, "[1, 2]" if typing.get_origin(tp) is tuple else "x")


def _mapping_settings(overrides: Mapping[str, object], source: str) -> list[_Setting]:
    out: list[_Setting] = []
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            msg = f"config key {key!r} ({source}) is not a dotted name such as 'apdb.db_url'"
            raise ConfigError(msg)
        out.extend(_leaf_settings(key, value, source))
    return out


def _file_settings(path: str | Path) -> list[_Setting]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        msg = f"config file {str(p)!r} does not exist; check the -C path"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"config file {str(p)!r} cannot be read as UTF-8 text: {exc}"
        raise ConfigError(msg) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends "(at line N, column M)": keep it, it is the location.
        msg = f"config file {str(p)!r} is not valid TOML: {exc}; fix the file at that line"
        raise ConfigError(msg) from None
    return _mapping_settings(data, f"in file {p}")


# --------------------------------------------------------------------------------------------------
# Building configs
# --------------------------------------------------------------------------------------------------


def _to_dict(cfg: Any) -> dict[str, Any]:
    """Nested dict of a config's values (sections become dicts; values are kept as is)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = _to_dict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
    return out


def _from_dict(cls: Any, data: Mapping[str, Any]) -> Any:
    hints = _hints(cls)
    kwargs = {k: (_from_dict(hints[k], v) if _is_section(hints[k]) else v) for k, v in data.items()}
    return cls(**kwargs)


def _apply(cfg: PipelineConfig, settings: Sequence[_Setting]) -> PipelineConfig:
    if not isinstance(cfg, PipelineConfig):
        msg = f"expected a PipelineConfig to apply overrides to, got {type(cfg).__name__}"
        raise ConfigError(msg)
    data = _to_dict(cfg)
    last_source: dict[str, str] = {}
    for s in settings:
        *parents, leaf = s.key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[leaf] = s.value
        last_source[s.key] = s.source
    try:
        return _from_dict(PipelineConfig, data)
    except ConfigError as exc:
        # Range and cross-field checks run on the finished config: say which setting caused it.
        key = getattr(exc, "key", None)
        if key in last_source:
            msg = f"{exc} ({last_source[key]})"
            raise _ConfigError(msg, key) from None
        raise


def apply_overrides(cfg: PipelineConfig, overrides: Mapping[str, object] | Sequence[str]) -> PipelineConfig:
    """Return a new config with ``overrides`` applied in order (later settings win).

    Parameters
    ----------
    cfg : PipelineConfig
        The starting configuration; it is not modified (configs are frozen).
    overrides : mapping or sequence of str
        Either ``["apdb.connection_pool=false", ...]`` (``-c`` strings, values parsed
        as TOML literals) or ``{"apdb.connection_pool": False}`` / ``{"apdb":
        {"connection_pool": False}}`` with Python values.

    Returns
    -------
    PipelineConfig
        The new, validated configuration.

    Raises
    ------
    ConfigError
        For an unknown key (with the closest valid keys), a string without ``=``,
        a value of the wrong type, or a value out of range.

    Examples
    --------
    >>> cfg = apply_overrides(PipelineConfig(), ["process.n_threads=4", "apdb.connection_pool=false"])
    >>> cfg.process.n_threads, cfg.apdb.connection_pool
    (4, False)

    """
    if isinstance(overrides, Mapping):
        settings = _mapping_settings(overrides, "in overrides mapping")
    elif isinstance(overrides, str):
        msg = (
            "overrides must be a list of 'key=value' strings or a mapping, "
            f"not the single string {overrides!r}"
        )
        raise ConfigError(msg)
    else:
        settings = [s for text in overrides for s in _parse_override(text)]
    return _apply(cfg, settings)


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    *,
    base: PipelineConfig | None = None,
) -> PipelineConfig:
    """Build the effective configuration from defaults, ``-C`` files and ``-c`` overrides.

    Parameters
    ----------
    files : sequence of str or Path
        TOML files applied in order. Keys may be nested tables (``[apdb]``) or dotted.
    overrides : sequence of str
        ``key=value`` strings applied after all files, in order.
    base : PipelineConfig, optional
        The starting point instead of the defaults (e.g. a camera's own settings).

    Returns
    -------
    PipelineConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        For a missing or unparsable file (naming the file and line), an unknown key,
        a malformed override, or a bad value. Nothing is applied when one setting fails.

    Examples
    --------
    >>> cfg = load_config(overrides=["calibs.validity_days=999", "calibs.validity_days=none"])
    >>> cfg.calibs.validity_days is None
    True

    """
    if isinstance(files, (str, Path)):
        files = [files]
    if isinstance(overrides, str):
        overrides = [overrides]
    settings: list[_Setting] = []
    for path in files:
        settings.extend(_file_settings(path))
    for text in overrides:
        settings.extend(_parse_override(text))
    return _apply(base if base is not None else PipelineConfig(), settings)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # '60.0', '1e-05', 'inf', '-inf' are all TOML floats
    if isinstance(value, str):
        # JSON escapes are TOML basic-string escapes; TOML also forbids a raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    msg = f"cannot write {value!r} ({type(value).__name__}) as a TOML value"
    raise TypeError(msg)


def _comment(text: str) -> list[str]:
    return [f"# {line}".rstrip() for line in text.splitlines()] or ["#"]


def config_to_toml(cfg: PipelineConfig) -> str:
    """Write the effective configuration as TOML: every key, its doc as a comment above it.

    ``None`` values are written as a comment when ``None`` is the default (loading
    the text leaves them ``None``) and as ``"none"`` otherwise, so the text always
    loads back to an equal config.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration to write.

    Returns
    -------
    str
        TOML text ending in a newline; ``load_config([file])`` of it equals ``cfg``.

    Examples
    --------
    >>> text = config_to_toml(PipelineConfig())
    >>> '[apdb]' in text and 'isolation_level = "READ_COMMITTED"' in text
    True

    """
    lines = [
        "# apfast effective configuration. Load it with `apfast ... -C this.toml`;",
        "# override single keys with -c section.key=value (later settings win).",
        "# Rubin's ap_pipe spellings are accepted and mean the apfast keys: "
        + "; ".join(f"-c {k}=... -> {v}" for k, v in RUBIN_KEYS.items())
        + "; -C .../config/calexpTemplates.py -> the built-in calexpTemplates.toml.",
    ]
    _section_toml(cfg, "", lines)
    return "\n".join(lines) + "\n"


def _section_toml(cfg: Any, prefix: str, lines: list[str]) -> None:
    cls = type(cfg)
    hints = _hints(cls)
    fields = dataclasses.fields(cfg)
    leaves = [f for f in fields if not _is_section(hints[f.name])]
    if leaves:
        lines.append("")
        if prefix:
            lines.extend(_comment((cls.__doc__ or "").strip().splitlines()[0].replace("``", "`")))
            lines.append(f"[{prefix.rstrip('.')}]")
    for f in leaves:
        tp = hints[f.name]
        value = getattr(cfg, f.name)
        lines.extend(_comment(f.metadata.get("doc", "")))
        choices = f.metadata.get("choices")
        if choices:
            lines.extend(f"#   {_toml_value(k)}: {v}" for k, v in choices.items())
        else:
            lines.append(f"# type: {describe_type(tp)}")
        if value is None:
            if f.default is None:
                lines.append(f"# {f.name} = (unset: none)")
            else:
                lines.append(f'{f.name} = "{NONE_TEXT}"')
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    for f in fields:
        if _is_section(hints[f.name]):
            _section_toml(getattr(cfg, f.name), f"{prefix}{f.name}.", lines)


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, float):
        return {"float": repr(value)}  # keep 1 and 1.0 apart, and nan/inf exact
    if isinstance(value, tuple):
        return [_canonical(v) for v in value]
    return value


def config_sha256(cfg: PipelineConfig) -> str:
    """SHA-256 of the configuration's values (not its comments), as 64 hex digits.

    Two configs with equal values have the same digest, even across apfast versions
    that only reword the docs. Store it beside every output for provenance.

    Parameters
    ----------
    cfg : PipelineConfig
        The configuration.

    Returns
    -------
    str
        Lower-case hex digest.

    Examples
    --------
    >>> config_sha256(PipelineConfig()) == config_sha256(load_config())
    True
    >>> len(config_sha256(PipelineConfig()))
    64

    """
    text = json.dumps(_canonical(_to_dict(cfg)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()
