"""Cameras described by data, not code branches.

A camera is a TOML file: which header keywords hold the exposure metadata,
the amplifier layout (data, overscan and trimmed sections, gain, read noise,
saturation, each read from a header keyword with a literal fallback), and the
detector numbering. DECam is built in (``decam.toml`` beside this module); any
other single- or multi-amplifier camera is one small TOML file away (see
``generic_example.toml``, which describes the SAAO 1.0 m STE3 CCD).

Examples
--------
>>> cam = get_camera("DECam")
>>> cam.detector_name(35)
'N4'
>>> cam.amplifiers[0].name
'A'
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apfast.errors import ConfigError, IngestError

__all__ = [
    "Amplifier",
    "Camera",
    "KeySpec",
    "Section",
    "builtin_cameras",
    "get_camera",
    "load_camera",
    "parse_section",
]

_HERE = Path(__file__).parent
_SECTION_RE = re.compile(r"^\s*\[\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*\]\s*$")


@dataclass(frozen=True, slots=True)
class Section:
    """A FITS section ``[x1:x2,y1:y2]`` (1-based, inclusive) as 0-based numpy slices.

    ``flip_x``/``flip_y`` record a section written high-to-low (``[2048:1025,...]``).
    """

    x0: int
    x1: int  # exclusive
    y0: int
    y1: int  # exclusive
    flip_x: bool = False
    flip_y: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the section."""
        return (self.y1 - self.y0, self.x1 - self.x0)

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(row_slice, column_slice)`` to index a numpy image."""
        return (slice(self.y0, self.y1), slice(self.x0, self.x1))

    def to_fits(self) -> str:
        """Return the section in FITS notation."""
        return f"[{self.x0 + 1}:{self.x1},{self.y0 + 1}:{self.y1}]"


def parse_section(text: str, *, what: str = "section") -> Section:
    """Parse a FITS section string such as ``'[57:1080,51:4146]'``.

    Parameters
    ----------
    text : str
        The section; spaces inside are allowed (``'[  17: 528,   1: 520]'``).
    what : str
        What the section is, for the error message.

    Raises
    ------
    ValueError
        If ``text`` is not of the form ``[x1:x2,y1:y2]`` with positive integers.

    Examples
    --------
    >>> parse_section("[57:1080,51:4146]").slices
    (slice(50, 4146, None), slice(56, 1080, None))
    >>> parse_section("[2048:1025,4096:1]").flip_x
    True
    """
    m = _SECTION_RE.match(str(text))
    if m is None:
        msg = f"{what} {text!r} is not a FITS section like '[57:1080,51:4146]'"
        raise ValueError(msg)
    a, b, c, d = (int(g) for g in m.groups())
    if min(a, b, c, d) < 1:
        msg = f"{what} {text!r} has a coordinate below 1; FITS sections are 1-based"
        raise ValueError(msg)
    return Section(min(a, b) - 1, max(a, b), min(c, d) - 1, max(c, d), flip_x=a > b, flip_y=c > d)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Where one value comes from: a header keyword, a filename regex, or a literal fallback."""

    key: str | None = None
    value: Any = None
    default: Any = None
    first_word: bool = False
    unit: str | None = None
    filename_regex: str | None = None

    @classmethod
    def from_toml(cls, spec: Any, where: str) -> KeySpec:
        """Build from a TOML inline table (or a bare literal, meaning ``value``)."""
        if not isinstance(spec, dict):
            return cls(value=spec)
        unknown = set(spec) - {"key", "value", "default", "first_word", "unit", "filename_regex"}
        if unknown:
            msg = (
                f"camera key {where} has unknown field(s) {sorted(unknown)}; "
                "allowed: key, value, default, first_word, unit, filename_regex"
            )
            raise ConfigError(msg)
        return cls(**spec)

    def resolve(self, header: Any, *, filename: str = "", what: str = "", required: bool = True) -> Any:
        """Return the value from ``header`` (a mapping of FITS cards) or the fallbacks.

        Raises
        ------
        IngestError
            If the keyword is absent, has no fallback, and ``required`` is true.
        """
        raw: Any = None
        if self.filename_regex is not None:
            m = re.search(self.filename_regex, Path(filename).name)
            if m is not None:
                raw = m.group(1)
        if raw is None and self.key is not None and self.key in header:
            raw = header[self.key]
            if isinstance(raw, str) and self.first_word:
                raw = raw.split()[0] if raw.split() else ""
        if raw is None:
            raw = self.value
        if raw is None:
            raw = self.default
        if raw is None and required:
            source = f"keyword {self.key}" if self.key else f"filename pattern {self.filename_regex!r}"
            msg = f"{filename}: missing {source} (needed for {what}); fix the header or the camera description"
            raise IngestError(msg)
        if isinstance(raw, str) and raw == "nan":
            return math.nan
        return raw


@dataclass(frozen=True, slots=True)
class Amplifier:
    """One amplifier: its sections in the raw image and the trimmed CCD, and its electronics."""

    name: str
    data_section: KeySpec
    bias_section: KeySpec
    trimmed_section: KeySpec
    gain: KeySpec
    read_noise: KeySpec
    saturation: KeySpec
    parallel_overscan: KeySpec | None = None
    readout_flip_x: bool = False


@dataclass(frozen=True, slots=True)
class Camera:
    """A camera description loaded from TOML; see the module docstring."""

    name: str
    description: str
    match: dict[str, str]
    multi_extension: bool
    detector_key: str | None
    max_detector: int
    pixel_scale: float
    raw_shape: tuple[int, int] | None
    trimmed_shape: tuple[int, int]
    raw_template: str
    exposure_keys: dict[str, KeySpec]
    amplifiers: tuple[Amplifier, ...]
    detectors: dict[int, dict[str, Any]] = field(default_factory=dict)
    dead_detectors: tuple[int, ...] = ()
    #: ``[photometry]``: colour terms from the photometric reference catalogue to this camera's bands
    #: (``'band:ref1-ref2:c0,c1,...'``: ``m_camera = m_ref + c0 + c1 x + c2 x^2 + ...``, ``x = ref1 - ref2``).
    colour_terms: tuple[str, ...] = ()
    #: Reference colour range ``(lo, hi)`` where the colour terms hold; stars outside it are not used.
    colour_range: tuple[float, float] | None = None
    #: Reference-catalogue band of each camera band where the names differ (DECam ``Y`` -> PS1 ``y``).
    ref_bands: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def detector_name(self, ccdnum: int) -> str:
        """Return the detector name (``'N4'`` for DECam ccdnum 35), or ``str(ccdnum)``."""
        info = self.detectors.get(int(ccdnum))
        return str(info["name"]) if info else str(ccdnum)

    def detector_number(self, name: str) -> int:
        """Return the ccdnum of a detector name (``'N4'`` -> 35)."""
        for num, info in self.detectors.items():
            if str(info.get("name", "")).upper() == name.upper():
                return num
        msg = f"camera {self.name} has no detector named {name!r}"
        raise KeyError(msg)

    def matches(self, header: Any) -> bool:
        """Whether a primary header belongs to this camera (all ``match`` keywords equal)."""
        for key, want in self.match.items():
            got = header.get(key)
            if got is None or str(got).strip() != str(want).strip():
                return False
        return True

    def to_toml(self) -> str:
        """Return the TOML text this camera was loaded from."""
        return self.source


_REQUIRED_EXPOSURE_KEYS = ("visit", "filter", "date_obs", "mjd", "exptime")
_AMP_FIELDS = ("data_section", "bias_section", "trimmed_section", "gain", "read_noise", "saturation")


def _camera_from_dict(d: dict[str, Any], source: str, where: str) -> Camera:
    def need(key: str) -> Any:
        if key not in d:
            msg = f"camera description {where} lacks the required key {key!r}"
            raise ConfigError(msg)
        return d[key]

    ek = {k: KeySpec.from_toml(v, f"exposure_keys.{k}") for k, v in need("exposure_keys").items()}
    missing = [k for k in _REQUIRED_EXPOSURE_KEYS if k not in ek]
    if missing:
        msg = f"camera description {where}: [exposure_keys] must define {', '.join(missing)}"
        raise ConfigError(msg)
    amps = []
    for i, a in enumerate(need("amplifiers")):
        lacking = [f for f in _AMP_FIELDS if f not in a]
        if lacking:
            msg = f"camera description {where}: amplifiers[{i}] lacks {', '.join(lacking)}"
            raise ConfigError(msg)
        amps.append(
            Amplifier(
                name=str(a.get("name", str(i))),
                **{f: KeySpec.from_toml(a[f], f"amplifiers[{i}].{f}") for f in _AMP_FIELDS},
                parallel_overscan=(
                    KeySpec.from_toml(a["parallel_overscan"], f"amplifiers[{i}].parallel_overscan")
                    if "parallel_overscan" in a
                    else None
                ),
                readout_flip_x=bool(a.get("readout_flip_x", False)),
            )
        )
    detectors = {int(k): dict(v) for k, v in d.get("detectors", {}).items()}
    phot = d.get("photometry", {})
    if not isinstance(phot, dict) or not isinstance(phot.get("colour_terms", []), list):
        msg = f"camera description {where}: [photometry] colour_terms must be a list of 'band:ref1-ref2:c0,c1,...'"
        raise ConfigError(msg)
    rng = phot.get("colour_range")
    if rng is not None and (not isinstance(rng, list) or len(rng) != 2):
        msg = f"camera description {where}: [photometry] colour_range must be [low, high], got {rng!r}"
        raise ConfigError(msg)
    multi = bool(d.get("multi_extension", False))
    raw_shape = d.get("raw_shape")
    return Camera(
        name=str(need("name")),
        description=str(d.get("description", "")),
        match={str(k): str(v) for k, v in d.get("match", {}).items()},
        multi_extension=multi,
        detector_key=d.get("detector_key"),
        max_detector=int(d.get("max_detector", 1)),
        pixel_scale=float(need("pixel_scale")),
        raw_shape=tuple(raw_shape) if raw_shape else None,
        trimmed_shape=tuple(need("trimmed_shape")),
        raw_template=str(d.get("raw_template", "raw/{date}/{filter}/{basename}")),
        exposure_keys=ek,
        amplifiers=tuple(amps),
        detectors=detectors,
        dead_detectors=tuple(int(x) for x in d.get("dead_detectors", ())),
        colour_terms=tuple(str(t) for t in phot.get("colour_terms", ())),
        colour_range=(float(phot["colour_range"][0]), float(phot["colour_range"][1])) if "colour_range" in phot
        else None,
        ref_bands={str(k): str(v) for k, v in phot.get("ref_bands", {}).items()},
        source=source,
    )


def load_camera(path: str | Path) -> Camera:
    """Load a camera description from a TOML file.

    Raises
    ------
    ConfigError
        If the file is not valid TOML or lacks a required key; the message names both.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        msg = (f"camera description {path} does not exist; "
               f"give a TOML file or a built-in name ({', '.join(builtin_cameras())})")
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as exc:
        msg = f"camera description {path} is not valid TOML: {exc}"
        raise ConfigError(msg) from None
    return _camera_from_dict(data, text, str(path))


def builtin_cameras() -> list[str]:
    """Names of the cameras shipped with apfast."""
    return ["DECam"]


def get_camera(name_or_path: str | Path = "DECam") -> Camera:
    """Return a built-in camera by name (case-insensitive) or load one from a TOML path."""
    if str(name_or_path).lower() == "decam":
        return load_camera(_HERE / "decam.toml")
    return load_camera(name_or_path)
