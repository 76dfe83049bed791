"""Descriptions of calibrated (instrument-signature-removed) images: the ``[calibrated]`` table.

A calibrated camera is an ordinary camera TOML (so ``REPO/camera.toml`` loads with
:func:`apfast.camera.load_camera`) plus a ``[calibrated]`` table saying

- how the CCD number and the extra dataId keys come from the header (``ccdnum``, ``dataid``);
- how the image, weight and mask files of one exposure are paired (``[calibrated.files]``: the
  token of each kind in the file name, e.g. ``_ooi_``/``_oow_``/``_ood_``);
- the weight map's meaning (``weight_kind``), the gain (pixels become electrons with ``electrons =
  true``, the default, as ISR's output is; the variance without a weight map uses it too), the read
  noise, the saturation level and the header zero point of the file's units (``magzero``);
- how data-quality values become :mod:`apfast.masks` planes (``[calibrated.dq]``: ``mode = "bits"``
  maps bit numbers, ``mode = "values"`` maps whole integer values).

Built in: ``decam-instcal`` and ``ztf`` (TOML files beside this module).

Examples
--------
>>> cal = get_calibrated_camera("ztf")
>>> cal.camera.name, cal.dq_mode, cal.files["image"]
('ZTF', 'bits', '_sciimg')
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apfast.camera import Camera, KeySpec, load_camera
from apfast.errors import ConfigError
from apfast.masks import MASK_BITS

__all__ = ["CalibratedCamera", "builtin_calibrated_cameras", "get_calibrated_camera", "is_calibrated_camera"]

_HERE = Path(__file__).parent
_BUILTIN = {"decam-instcal": "decam-instcal.toml", "ztf": "ztf.toml"}
_WEIGHT_KINDS = ("inverse_variance", "variance", "sigma")
_FILE_KINDS = ("image", "weight", "mask")


@dataclass(frozen=True, slots=True)
class CalibratedCamera:
    """A camera plus how its calibrated products are read (the ``[calibrated]`` table)."""

    camera: Camera
    ccdnum: KeySpec
    ccdnum_offset: int
    dataid: dict[str, str]
    files: dict[str, str]
    weight_kind: str
    gain: KeySpec | None
    read_noise: KeySpec | None
    saturation: KeySpec | None
    magzero: KeySpec | None
    filter_map: dict[str, str]
    to_electrons: bool
    dq_mode: str
    dq_map: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def kind_of(self, name: str) -> str | None:
        """Which product (``'image'``, ``'weight'``, ``'mask'``) a file name is, or ``None``."""
        for kind in _FILE_KINDS:
            token = self.files.get(kind)
            if token and token in name:
                return kind
        return None

    def partner_name(self, image_name: str, kind: str) -> str | None:
        """The file name of the ``kind`` product paired with an image file name (``None``: no such product)."""
        token = self.files.get(kind)
        if not token:
            return None
        return image_name.replace(self.files["image"], token, 1)

    def map_filter(self, value: str) -> str:
        """The band name for a header filter value (``'ZTF_r'`` -> ``'r'``); unmapped values pass through."""
        return self.filter_map.get(value, value)


def _spec(table: dict[str, Any], key: str, where: str) -> KeySpec | None:
    if key not in table:
        return None
    return KeySpec.from_toml(table[key], f"{where}.{key}")


def calibrated_from_camera(camera: Camera) -> CalibratedCamera:
    """Parse the ``[calibrated]`` table of a loaded camera.

    Raises
    ------
    ConfigError
        If the description has no ``[calibrated]`` table or a malformed entry; the message names the key.
    """
    where = camera.name
    data = tomllib.loads(camera.source) if camera.source else {}
    cal = data.get("calibrated")
    if not isinstance(cal, dict):
        msg = (
            f"camera {where} has no [calibrated] table, so it cannot describe calibrated images; use "
            f"{', '.join(_BUILTIN)} or add a [calibrated] table (see {_HERE / 'ztf.toml'})"
        )
        raise ConfigError(msg)
    files = {str(k): str(v) for k, v in cal.get("files", {}).items() if k in _FILE_KINDS}
    if not files.get("image"):
        msg = f"camera {where}: calibrated.files.image (the image file-name token, e.g. '_ooi_') is required"
        raise ConfigError(msg)
    weight_kind = str(cal.get("files", {}).get("weight_kind", "inverse_variance"))
    if weight_kind not in _WEIGHT_KINDS:
        msg = f"camera {where}: calibrated.files.weight_kind = {weight_kind!r} is not one of {', '.join(_WEIGHT_KINDS)}"
        raise ConfigError(msg)
    ccd = cal.get("ccdnum", {"value": 1})
    offset = int(ccd.pop("offset", 0)) if isinstance(ccd, dict) else 0
    dq = cal.get("dq", {})
    mode = str(dq.get("mode", "bits"))
    if mode not in ("bits", "values"):
        msg = f"camera {where}: calibrated.dq.mode = {mode!r} is not 'bits' or 'values'"
        raise ConfigError(msg)
    dq_map: dict[int, tuple[str, ...]] = {}
    for k, planes in dq.get("map", {}).items():
        try:
            n = int(k)
        except ValueError:
            msg = f"camera {where}: calibrated.dq.map key {k!r} is not an integer"
            raise ConfigError(msg) from None
        names = (planes,) if isinstance(planes, str) else tuple(str(p) for p in planes)
        unknown = [p for p in names if p not in MASK_BITS]
        if unknown:
            msg = (f"camera {where}: calibrated.dq.map.{k} names unknown mask plane(s) {unknown}; "
                   f"known: {', '.join(MASK_BITS)}")
            raise ConfigError(msg)
        if mode == "bits" and not 0 <= n < 63:
            msg = f"camera {where}: calibrated.dq.map bit {n} is outside 0..62"
            raise ConfigError(msg)
        dq_map[n] = names
    return CalibratedCamera(
        camera=camera,
        ccdnum=KeySpec.from_toml(ccd, "calibrated.ccdnum"),
        ccdnum_offset=offset,
        dataid={str(k): str(v) for k, v in cal.get("dataid", {}).items()},
        files=files,
        weight_kind=weight_kind,
        gain=_spec(cal, "gain", "calibrated"),
        read_noise=_spec(cal, "read_noise", "calibrated"),
        saturation=_spec(cal, "saturation", "calibrated"),
        magzero=_spec(cal, "magzero", "calibrated"),
        filter_map={str(k): str(v) for k, v in cal.get("filter_map", {}).items()},
        to_electrons=bool(cal.get("electrons", True)),
        dq_mode=mode,
        dq_map=dq_map,
    )


def builtin_calibrated_cameras() -> list[str]:
    """Names of the calibrated-image descriptions shipped with apfast."""
    return list(_BUILTIN)


def get_calibrated_camera(name_or_path: str | Path | Camera) -> CalibratedCamera:
    """A built-in calibrated camera by name (``'decam-instcal'``, ``'ztf'``, any case) or a TOML path.

    Raises
    ------
    ConfigError
        Unknown name or missing file (the message lists the built-in names), or no ``[calibrated]`` table.
    """
    if isinstance(name_or_path, Camera):
        return calibrated_from_camera(name_or_path)
    key = str(name_or_path).lower()
    if key in _BUILTIN:
        return calibrated_from_camera(load_camera(_HERE / _BUILTIN[key]))
    if not str(name_or_path).endswith(".toml") and not Path(name_or_path).exists():
        msg = (f"unknown calibrated camera {str(name_or_path)!r}; give one of {', '.join(_BUILTIN)} "
               "or a TOML description with a [calibrated] table (--camera FILE.toml)")
        raise ConfigError(msg)
    return calibrated_from_camera(load_camera(name_or_path))


def is_calibrated_camera(camera: Camera) -> bool:
    """Whether a camera description has a ``[calibrated]`` table."""
    return bool(camera.source) and isinstance(tomllib.loads(camera.source).get("calibrated"), dict)
