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
difference.decorrelation.kernel_size=none``, or ``kernel_size = "none"`` in a file).

Other spellings of keys are accepted where they mean the same (:data:`RUBIN_KEYS`, the ap_pipe
spellings users copy from Rubin's documentation, and :data:`MOVED_KEYS`, keys of earlier apfast
versions); keys that were removed (:data:`REMOVED_KEYS`) are refused on the command line with what
replaced them, and ignored in files (an older rerun's stored config lists them).

Examples
--------
>>> cfg = load_config(overrides=["apdb.isolation_level=READ_UNCOMMITTED", "difference.decorrelation.kernel_size=31"])
>>> cfg.apdb.isolation_level, cfg.difference.decorrelation.kernel_size
('READ_UNCOMMITTED', 31)
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
import logging
import math
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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
    key_prefix,
    opt,
    subsection,
)
from apfast.errors import ConfigError
from apfast.repo.repository import NON_PRODUCT_KEYS, is_product_key

log = logging.getLogger(__name__)

__all__ = [
    "ApdbConfig",
    "ConfigSection",
    "FieldInfo",
    "NON_PRODUCT_KEYS",
    "PipelineConfig",
    "MOVED_KEYS",
    "ProcessConfig",
    "REMOVED_KEYS",
    "RUBIN_KEYS",
    "alias_lines",
    "apply_overrides",
    "canonical_key",
    "comparable_settings",
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


# The stage sections are defined beside their stages (they import only apfast._configbase); ApdbConfig
# is re-exported here, where it was defined before.
from apfast.ccd.ampoffset import AmpOffsetConfig  # noqa: E402
from apfast.ccd.calibrate import CalibrateConfig  # noqa: E402
from apfast.ccd.characterize import CharacterizeConfig  # noqa: E402
from apfast.ccd.inject import InjectConfig  # noqa: E402
from apfast.ccd.isr import IsrConfig  # noqa: E402
from apfast.dia.alerts import AlertsConfig  # noqa: E402
from apfast.dia.apdb import ApdbConfig  # noqa: E402
from apfast.dia.association import AssociationConfig  # noqa: E402
from apfast.dia.diapipe import DiaPipeConfig  # noqa: E402
from apfast.dia.diasource import DiaSourceConfig  # noqa: E402
from apfast.dia.filtering import DiaFilterConfig  # noqa: E402
from apfast.dia.reliability import ReliabilityConfig  # noqa: E402
from apfast.diffim.coadd import CoaddConfig  # noqa: E402
from apfast.diffim.pair import SubtractConfig  # noqa: E402
from apfast.diffim.stage import DifferenceConfig  # noqa: E402
from apfast.diffim.template import TemplateConfig  # noqa: E402
from apfast.diffim.warp import WarpConfig  # noqa: E402
from apfast.repo.writer import OutputConfig  # noqa: E402


@dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig(ConfigSection):
    """The whole pipeline: one section per stage (add a section with one line here)."""

    apdb: ApdbConfig = subsection(ApdbConfig)
    process: ProcessConfig = subsection(ProcessConfig)
    output: OutputConfig = subsection(OutputConfig)
    isr: IsrConfig = subsection(IsrConfig)
    amp_offset: AmpOffsetConfig = subsection(AmpOffsetConfig)
    characterize: CharacterizeConfig = subsection(CharacterizeConfig)
    calibrate: CalibrateConfig = subsection(CalibrateConfig)
    warp: WarpConfig = subsection(WarpConfig)
    coadd: CoaddConfig = subsection(CoaddConfig)
    template: TemplateConfig = subsection(TemplateConfig)
    difference: DifferenceConfig = subsection(DifferenceConfig)
    dia: DiaSourceConfig = subsection(DiaSourceConfig)
    dia_filter: DiaFilterConfig = subsection(DiaFilterConfig)
    reliability: ReliabilityConfig = subsection(ReliabilityConfig)
    association: AssociationConfig = subsection(AssociationConfig)
    alerts: AlertsConfig = subsection(AlertsConfig)
    dia_pipe: DiaPipeConfig = subsection(DiaPipeConfig)
    inject: InjectConfig = subsection(InjectConfig)
    subtract: SubtractConfig = subsection(SubtractConfig)


#: Config sections added by a regrouping whose defaults are what earlier versions did without them: a
#: stored config that lacks their keys compares as if it held the defaults (:func:`comparable_settings`).
ADDED_SECTIONS: tuple[str, ...] = ("dia.detection.", "inject.", "subtract.", "calibrate.astrometry_source",
                                   "calibrate.zero_point_source", "amp_offset.", "dia_filter.", "reliability.",
                                   "alerts.min_reliability", "calibrate.photocal.camera_colour_terms",
                                   "characterize.scale_variance.", "characterize.measurement.shape_min_sigma",
                                   "calibrate.measurement.shape_min_sigma", "difference.psfmatch.basis",
                                   "difference.psfmatch.delta_", "difference.psfmatch.auto_")

#: Keys added with a default that changes products: what a config written before them means (the
#: behaviour of the version that wrote it). A stored config lacking them compares as these values, so a
#: re-run into an old rerun names the real change (``dia_filter.do_filter false -> true``).
LEGACY_VALUES: dict[str, Any] = {
    "amp_offset.do_measure": False,
    "amp_offset.do_correct": False,
    "dia_filter.do_filter": False,
    "reliability.model": "none",
    "alerts.min_reliability": 0.0,
    "calibrate.photocal.camera_colour_terms": False,
    "characterize.scale_variance.apply": "never",
    "characterize.measurement.shape_min_sigma": 0.0,
    "calibrate.measurement.shape_min_sigma": 0.0,
    "difference.psfmatch.basis": "gaussian",
}


def comparable_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings of a stored config under the current keys, so an old rerun's config compares fairly.

    Old spellings (:data:`MOVED_KEYS`, :data:`RUBIN_KEYS`) become the keys they mean, keys that never had
    an effect (:data:`REMOVED_KEYS`) are left out, and the keys of
    :data:`ADDED_SECTIONS` a config lacks get the value that means what the older version did
    (:data:`LEGACY_VALUES`, else their defaults), as TOML would read them back (tuples as lists). Keys
    this version does not know are kept as they are.

    Parameters
    ----------
    flat : mapping of str to object
        ``{"difference.psfmatch.kernel_size": 21, ...}``: a parsed TOML config flattened to dotted keys.

    Returns
    -------
    dict of str to object
        The same settings under the current keys.

    Examples
    --------
    >>> flat = comparable_settings({"diffim.kernel_size": 25, "dia.threshold": 6.0})
    >>> flat["difference.psfmatch.kernel_size"], flat["dia.detection.threshold"], flat["dia.detection.polarity"]
    (25, 6.0, 'both')
    """
    out = {canonical_key(k): v for k, v in flat.items() if canonical_key(k) not in REMOVED_KEYS}
    if ADDED_SECTIONS and flat:
        for key, info in config_fields().items():
            if key.startswith(ADDED_SECTIONS) and key not in out:
                value = LEGACY_VALUES.get(key, info.default)
                if value is not None:
                    out[key] = list(value) if isinstance(value, tuple) else value
    return out


class FieldInfo(NamedTuple):
    """One config key as listed by :func:`config_fields`: its annotation, default and doc."""

    type: Any
    default: Any
    doc: str


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def _section_places(cls: type, prefix: str, out: dict[type, list[str]]) -> dict[type, list[str]]:
    """Every dotted prefix at which each section class sits below ``cls``."""
    out.setdefault(cls, []).append(prefix)
    for name, tp in _hints(cls).items():
        if _is_section(tp):
            _section_places(tp, f"{prefix}{name}.", out)
    return out


def _register_prefixes(cls: type, prefix: str) -> None:
    """Tell every section class used in one place its dotted prefix, so its messages name full keys.

    A class used in several places (``DetectionConfig``, ``MeasurementConfig``, ``BackgroundConfig``)
    keeps its own short prefix for direct construction; the loader names the full key of the place
    it builds (:func:`apfast._configbase.key_prefix`).
    """
    for section, places in _section_places(cls, prefix, {}).items():
        if len(places) == 1:
            section._key_prefix = places[0]  # type: ignore[attr-defined]


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


def _leaf_settings(key: str, value: Any, source: str, *, in_file: bool = False) -> list[_Setting]:
    """Type-check one value for ``key``; a table given for a section is expanded into its keys.

    ``in_file``: the value comes from a ``-C`` file, where removed keys are ignored instead of refused.
    """
    key = canonical_key(key)
    if key in REMOVED_KEYS:
        return _removed(key, value, source, in_file=in_file)
    if isinstance(value, Mapping) and _is_alias_section(key):
        return [s for sub, v in value.items() for s in _leaf_settings(f"{key}.{sub}", v, source, in_file=in_file)]
    tp = _resolve(key, source)
    if _is_section(tp):
        if isinstance(value, Mapping):
            out: list[_Setting] = []
            for sub, v in value.items():
                out.extend(_leaf_settings(f"{key}.{sub}", v, source, in_file=in_file))
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

#: Keys of earlier apfast versions that moved, and where they live now; a name ending in ``.`` moves
#: every key of that section. They are accepted wherever keys are (``-c``, ``-C`` files, the config a
#: rerun stored), so old command lines and reruns keep working; ``apfast config show`` lists them.
MOVED_KEYS: dict[str, str] = {
    "diffim.": "difference.psfmatch.",
    "decorrelation.": "difference.decorrelation.",
    "dia.threshold": "dia.detection.threshold",
    "dia.grow_footprint": "dia.detection.grow_merge",
}


#: Keys earlier versions had that never changed anything, with their old default and what does the job.
#: ``-c`` with one is a ConfigError saying so; a ``-C`` file may hold them (every rerun stored them):
#: they are ignored there, with a warning unless they have their old default.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "ingest.mode": ("link", "use `apfast ingest --mode` (or `apfast ingest-calibs --mode`)"),
    "ingest.camera": ("DECam", "use `apfast ingest --camera` (the camera of a new repository)"),
    "calibs.validity_days": (None, "use `apfast ingest-calibs --validity DAYS`"),
    "refcat.astrometry": ("gaia", "use calibrate.astrometry_refcat"),
    "refcat.photometry": ("ps1", "use calibrate.photometry_refcat"),
    "refcat.nside": (32, "use `apfast ingest-refcat --nside N`"),
}


def _removed(key: str, value: Any, source: str, *, in_file: bool) -> list[_Setting]:
    """Refuse a removed key given on the command line or in code; ignore it in a config file."""
    default, instead = REMOVED_KEYS[key]
    if not in_file:
        msg = f"config key '{key}' was removed (it never had an effect); {instead} ({source})"
        raise _ConfigError(msg, key)
    if value != default and not (default is None and isinstance(value, str) and value.lower() == NONE_TEXT):
        log.warning("ignoring config key '%s' = %r (%s): it was removed (it never had an effect); %s",
                    key, value, source, instead)
    return []


def canonical_key(key: str) -> str:
    """The current dotted key meant by ``key``, which may be a Rubin or an earlier apfast spelling.

    Parameters
    ----------
    key : str
        A dotted key (a leaf or a section) as typed or stored.

    Returns
    -------
    str
        The key it maps to (:data:`RUBIN_KEYS`, :data:`MOVED_KEYS`), or ``key`` itself.

    Examples
    --------
    >>> canonical_key("diffim.kernel_size"), canonical_key("diffim"), canonical_key("diaPipe.apdb.db_url")
    ('difference.psfmatch.kernel_size', 'difference.psfmatch', 'apdb.db_url')
    >>> canonical_key("apdb.db_url")
    'apdb.db_url'
    """
    for table in (RUBIN_KEYS, MOVED_KEYS):
        if key in table:
            return table[key]
        for old, new in table.items():
            if old.endswith("."):
                if key == old[:-1]:
                    return new[:-1]
                if key.startswith(old):
                    return new + key[len(old):]
    return key


def _is_alias_section(key: str) -> bool:
    """Whether ``key`` only starts alias or removed spellings (``diaPipe``, ``refcat``): a table of them."""
    return any(a.startswith(f"{key}.") for a in (*RUBIN_KEYS, *MOVED_KEYS, *REMOVED_KEYS))


def alias_lines() -> list[str]:
    """The accepted alias spellings and what they mean, one per line (``apfast config show`` prints them)."""
    lines = [f"-c {old}=... -> {new}" for old, new in RUBIN_KEYS.items()]
    lines.append("-C .../config/calexpTemplates.py -> the built-in calexpTemplates.toml")
    lines.extend(f"{old}* -> {new}*" if old.endswith(".") else f"{old} -> {new}" for old, new in MOVED_KEYS.items())
    lines.extend(f"{old}: removed (it never had an effect); {instead}" for old, (_, instead) in REMOVED_KEYS.items())
    return lines


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
    key = canonical_key(key)
    if key in REMOVED_KEYS:
        return _removed(key, raw, source, in_file=False)
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


def _mapping_settings(overrides: Mapping[str, object], source: str, *, in_file: bool = False) -> list[_Setting]:
    out: list[_Setting] = []
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
            msg = f"config key {key!r} ({source}) is not a dotted name such as 'apdb.db_url'"
            raise ConfigError(msg)
        out.extend(_leaf_settings(key, value, source, in_file=in_file))
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
    return _mapping_settings(data, f"in file {p}", in_file=True)


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


def _from_dict(cls: Any, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    kwargs = {k: (_from_dict(hints[k], v, f"{prefix}{k}.") if _is_section(hints[k]) else v) for k, v in data.items()}
    with key_prefix(prefix):  # a shared section class names the key where it sits
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
    >>> cfg = load_config(overrides=["difference.decorrelation.kernel_size=31",
    ...                              "difference.decorrelation.kernel_size=none"])
    >>> cfg.difference.decorrelation.kernel_size is None
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
        "#",
        "# Aliases: these spellings (Rubin ap_pipe's, and keys of earlier apfast versions) are accepted in",
        "# -c overrides, -C files and stored configs, and set the key after the arrow; removed keys are",
        "# refused by -c and ignored in files:",
        *(f"#   {line}" for line in alias_lines()),
    ]
    _section_toml(cfg, "", lines)
    return "\n".join(lines) + "\n"


def _section_toml(cfg: Any, prefix: str, lines: list[str], doc: str | None = None) -> None:
    """Append the TOML of section ``cfg`` at ``prefix``, headed by ``doc`` (default: its class's first doc line)."""
    cls = type(cfg)
    hints = _hints(cls)
    fields = dataclasses.fields(cfg)
    leaves = [f for f in fields if not _is_section(hints[f.name])]
    if leaves:
        lines.append("")
        if prefix:
            head = doc if doc is not None else (cls.__doc__ or "").strip().splitlines()[0]
            lines.extend(_comment(head.replace("``", "`")))
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
            # a nested section is headed by what it does where it sits (characterize's detection: bright stars)
            _section_toml(getattr(cfg, f.name), f"{prefix}{f.name}.", lines, f.metadata.get("doc") if prefix else None)


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
