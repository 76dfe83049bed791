"""``apfast subtract`` and :func:`apfast.subtract_fits`: difference two FITS images of one sky.

The files are read by :mod:`apfast.repo.pairio`, the chain runs in
:func:`apfast.diffim.pair.subtract_pair` (no I/O), and the outputs are written
back by :mod:`apfast.repo.pairio`. Configuration is the pipeline's
(``characterize.*``, ``difference.*`` (``psfmatch``, ``decorrelation``),
``warp.*``, ``dia.*``, ``subtract.*``; ``apfast config show`` lists them) with
different defaults suited to single images of any size:

* ``difference.psfmatch.mode = "auto"``: convolve whichever image is sharper;
* ``characterize.detection.include_threshold_multiplier = 2``: PSF candidates from
  10-sigma peaks instead of 50-sigma ones (a 256 px cutout has ~5 of the latter);
* ``characterize.psf.min_stars = 3``: a constant PSF from 3 isolated stars is
  accepted (the PSF's spatial order drops automatically with few stars);
* ``difference.psfmatch.min_stamps = 3``: a kernel from 3 stars (with fewer than 6 the kernel
  and background are spatially constant, :func:`apfast.diffim.psfmatch.solve_kernel`);
* ``difference.psfmatch.fft_planner`` and ``difference.decorrelation.fft_planner`` ``FFTW_ESTIMATE``: images of
  any size come once each, and measuring FFTW plans for a new shape costs seconds
  (7 of the 8 s of a first 256 px pair).

Examples
--------
>>> import apfast
>>> res = apfast.subtract_fits("sci.fits", "ref.fits", output="diff.fits")  # doctest: +SKIP
>>> res.stats["kernel_sum"], res.difference.image.shape                       # doctest: +SKIP
(1.08, (256, 256))
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apfast.dia.pair_columns import DIA_TABLE_COLUMNS
from apfast.errors import AlgorithmError, InputError

if TYPE_CHECKING:  # the CLI builds its parser from this module: the stages load only when a command runs
    import numpy as np

    from apfast.diffim.pair import PairResult

__all__ = ["SUBTRACT_DEFAULTS", "SubtractFitsResult", "add_subtract_parser", "subtract_config", "subtract_fits"]

log = logging.getLogger(__name__)

#: Defaults of ``apfast subtract`` that differ from the pipeline's, by section class name and key.
SUBTRACT_DEFAULTS: dict[tuple[str, str], Any] = {
    ("PsfMatchConfig", "mode"): "auto",
    ("CharacterizeConfig", "detection.include_threshold_multiplier"): 2.0,
    ("CharacterizeConfig", "psf.min_stars"): 3,
    ("PsfMatchConfig", "min_stamps"): 3,
    ("PsfMatchConfig", "fft_planner"): "FFTW_ESTIMATE",
    ("DecorrelationConfig", "fft_planner"): "FFTW_ESTIMATE",
}


@dataclass(frozen=True, slots=True, eq=False)
class SubtractFitsResult:
    """What :func:`subtract_fits` made.

    Attributes
    ----------
    difference : Exposure
        The decorrelated ``science - template`` on the science grid (science units).
    table : dict of str to ndarray or None
        DIA sources (:data:`apfast.dia.pair.DIA_TABLE_COLUMNS`) when ``detect``.
    stats : dict
        Mode, half-maximum FWHMs, kernel sum, stamps, pull statistics ... (:class:`apfast.diffim.pair.PairResult`).
    pair : PairResult
        Everything else: the prepared science, the warped template, the matched image, the kernel.
    outputs : list of Path
        Files written (none without ``output``).
    """

    difference: Any
    table: dict[str, np.ndarray] | None
    stats: dict[str, Any]
    pair: PairResult
    outputs: list[Path]


def _section_keys(cfg: Any) -> dict[str, tuple[str, Any]]:
    """Each config section's dotted key and value, by class name (found by type, so section renames do not matter)."""
    out: dict[str, tuple[str, Any]] = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                out.setdefault(type(value).__name__, (f"{prefix}{f.name}", value))
                walk(value, f"{prefix}{f.name}.")

    walk(cfg, "")
    return out


def subtract_config(files: Sequence[str | Path] = (), overrides: Sequence[str] | Mapping[str, object] = (),
                    *, mode: str | None = None) -> Any:
    """The configuration of ``apfast subtract``: its defaults (module docstring), then files, then overrides.

    Parameters
    ----------
    files : sequence of path
        TOML files (``-C``).
    overrides : sequence of ``"key=value"`` or mapping
        ``-c`` overrides; keys as ``apfast config show`` prints them.
    mode : str, optional
        ``difference.psfmatch.mode`` (the ``--mode`` option), applied last.

    Returns
    -------
    PipelineConfig
    """
    from apfast.run.config import PipelineConfig, apply_overrides, load_config

    keys = _section_keys(PipelineConfig())
    base = apply_overrides(PipelineConfig(), {f"{keys[cls][0]}.{k}": v for (cls, k), v in SUBTRACT_DEFAULTS.items()})
    if isinstance(overrides, Mapping):
        cfg = apply_overrides(load_config(files, base=base), overrides)
    else:
        cfg = load_config(files, list(overrides), base=base)
    if mode is not None:
        cfg = apply_overrides(cfg, {f"{keys['PsfMatchConfig'][0]}.mode": mode})
    return cfg


def _output_stem(path: Path) -> Path:
    name = path.name
    for ext in (".fits.fz", ".fits.gz", ".fits", ".fit", ".fts"):
        if name.lower().endswith(ext):
            return path.with_name(name[: -len(ext)])
    return path


def subtract_fits(
    science: str | Path, template: str | Path, *, output: str | Path | None = None,
    science_variance: str | Path | None = None, template_variance: str | Path | None = None,
    science_weight: str | Path | None = None, template_weight: str | Path | None = None,
    science_mask: str | Path | None = None, template_mask: str | Path | None = None,
    science_hdu: int | str | None = None, template_hdu: int | str | None = None,
    science_psf: str | Path | None = None, template_psf: str | Path | None = None,
    mode: str | None = None, detect: bool = False,
    config: Sequence[str] | Mapping[str, object] = (), config_files: Sequence[str | Path] = (),
) -> SubtractFitsResult:
    """Difference two FITS images of one sky (``science - template``), optionally writing the products.

    Parameters
    ----------
    science, template : str or Path
        FITS images with a celestial WCS (TPV, SIP or plain); sky may be present.
    output : str or Path, optional
        Difference file to write (apfast exposure format: IMAGE, MASK, VARIANCE,
        PSF_* HDUs); with ``detect`` also ``<stem>_diaSrc.fits`` and ``<stem>_diaSrc.csv``.
    science_variance, template_variance : str or Path, optional
        Variance images (same shape); else ``*_weight`` (inverse variance), else estimated.
    science_weight, template_weight : str or Path, optional
        Inverse-variance images.
    science_mask, template_mask : str or Path, optional
        Mask images: non-zero = bad (except ``subtract.mask_ignore_bits``).
    science_hdu, template_hdu : int or str, optional
        HDU index or EXTNAME of each image; default the first image HDU (variance, weight
        and mask files are always read from their first image HDU).
    science_psf, template_psf : str or Path, optional
        PSF model images (e.g. WebbPSF, at each image's pixel scale) used instead of measuring
        the PSF on the image; cut to ``subtract.psf_max_size`` about the peak.
    mode : {"auto", "convolveTemplate", "convolveScience"}, optional
        Which image is convolved (default ``auto``).
    detect : bool
        Detect and measure DIA sources on the difference.
    config : sequence of str or mapping
        Config overrides, e.g. ``["difference.psfmatch.n_star_per_cell=5"]`` or
        ``{"difference.psfmatch.n_star_per_cell": 5}``.
    config_files : sequence of path
        TOML config files applied before ``config``.

    Returns
    -------
    SubtractFitsResult

    Raises
    ------
    apfast.errors.InputError
        Unreadable or non-FITS files, no image HDU, no celestial WCS, shape mismatches,
        images that do not overlap.
    apfast.errors.ConfigError
        Unknown config keys or bad values.
    apfast.errors.AlgorithmError
        Too few PSF stars or kernel stars (the message names the config key to change).

    Examples
    --------
    >>> res = subtract_fits("DEC-OBS04a.mini.fits", "DEC-OBS18a.mini.fits", output="diff.fits")  # doctest: +SKIP
    >>> sorted(res.stats)[:3]                                                                        # doctest: +SKIP
    ['fwhm_science', 'fwhm_science_characterize', 'fwhm_template']
    """
    from apfast.diffim.pair import make_exposure, subtract_pair
    from apfast.repo.pairio import (
        read_fits_image,
        read_fits_plane,
        read_psf_image,
        write_dia_table,
        write_difference,
    )

    cfg = subtract_config(config_files, config, mode=mode)
    keys = _section_keys(cfg)
    scfg = keys["SubtractConfig"][1]
    exposures = []
    for role, path, var, wgt, msk, hdu in (
        ("science", science, science_variance, science_weight, science_mask, science_hdu),
        ("template", template, template_variance, template_weight, template_mask, template_hdu),
    ):
        img = read_fits_image(path, hdu=hdu, what=f"{role} image")
        planes: dict[str, Any] = {}
        for name, p in (("variance", var), ("weight", wgt), ("mask", msk)):
            if p is not None:
                planes[name] = read_fits_plane(p, shape=img.data.shape, what=f"{role} {name}")
        exposures.append(make_exposure(
            img.data, wcs=img.wcs, gain=img.header_float(scfg.gain_keys),
            saturation=img.header_float(scfg.saturation_keys), zero_point=img.header_float(scfg.zero_point_keys),
            mask_ignore_bits=scfg.mask_ignore_bits, role=role, **planes,
        ))
    psfs = [None if p is None else read_psf_image(p, max_size=scfg.psf_max_size, what=f"{role} PSF")
            for role, p in (("science", science_psf), ("template", template_psf))]
    res = subtract_pair(
        exposures[0], exposures[1], config=scfg, characterize=keys["CharacterizeConfig"][1],
        warp=keys["WarpConfig"][1], psfmatch=keys["PsfMatchConfig"][1],
        decorrelation=keys["DecorrelationConfig"][1], difference=keys["DifferenceConfig"][1],
        science_psf=psfs[0], template_psf=psfs[1],
    )
    if detect:
        from apfast.dia.pair import detect_pair_sources

        res = detect_pair_sources(res, config=keys["DiaSourceConfig"][1])
    outputs: list[Path] = []
    if output is not None:
        st = res.stats
        cards: dict[str, tuple[Any, str]] = {
            "DIFFMODE": (st["mode"], "which image was convolved"),
            "DIFFKSUM": (round(st["kernel_sum"], 6), "PSF-matching kernel sum at the image centre"),
            "DIFFNSTP": (st["n_stamps"], "kernel stamps in the spatial fit"),
            "DIFFKSIZ": (st["kernel_size"], "kernel side (pixels)"),
            "DIFFFWHS": (round(st["fwhm_science"], 4), "science PSF FWHM (px, half maximum)"),
            "DIFFFWHT": (round(st["fwhm_template"], 4), "template PSF FWHM (px, half maximum)"),
            "DIFFPSTD": (round(st["pull_std"], 4), "robust std of diff/sqrt(var), source-free"),
            "DIFFOVLP": (round(st["overlap"], 4), "fraction of the science covered by the template"),
            "DIFFSCI": (str(Path(science).name)[:68], "science image"),
            "DIFFTMPL": (str(Path(template).name)[:68], "template image"),
        }
        outputs.append(write_difference(output, res.difference, cards))
        if res.table is not None:
            stem = _output_stem(Path(output))
            fp, cp = write_dia_table(stem.with_name(stem.name + "_diaSrc.fits"),
                                     stem.with_name(stem.name + "_diaSrc.csv"), res.table, DIA_TABLE_COLUMNS,
                                     cards={k: cards[k] for k in ("DIFFMODE", "DIFFSCI", "DIFFTMPL")})
            outputs += [fp, cp]
    return SubtractFitsResult(difference=res.difference, table=res.table, stats=res.stats, pair=res,
                              outputs=outputs)


def summary(res: SubtractFitsResult, seconds: float) -> str:
    """The one-paragraph report ``apfast subtract`` prints."""
    st = res.stats
    parts = [
        f"subtract: {st['mode']} (PSF FWHM science {st['fwhm_science']:.2f} px, template "
        f"{st['fwhm_template']:.2f} px at half maximum); kernel {st['kernel_size']} px from {st['n_stamps']} of "
        f"{st['n_candidates']} stamps, sum {st['kernel_sum']:.4f}; template covers {st['overlap']:.0%} of the "
        f"science; difference pulls in {st['n_pull_pixels']} source-free pixels: median {st['pull_median']:+.3f}, "
        f"robust std {st['pull_std']:.3f}; residual at the kernel stars {st['star_residual']:.1%} of their flux",
    ]
    if st.get("n_dia_sources") is not None:
        parts.append(f"{st['n_dia_sources']} DIA sources")
    parts.append(f"{seconds:.1f} s")
    text = "; ".join(parts)
    if res.outputs:
        text += " -> " + ", ".join(str(p) for p in res.outputs)
    return text


def _cmd_subtract(args: argparse.Namespace) -> int:
    from apfast.run.cli import _config_files, _out

    hdus = list(args.hdu or [])
    if len(hdus) > 2:
        from apfast.errors import ConfigError

        msg = f"--hdu takes one HDU (both images) or two (science, template), got {len(hdus)}"
        raise ConfigError(msg)
    sci_hdu = hdus[0] if hdus else None
    tmpl_hdu = hdus[-1] if hdus else None
    t0 = time.perf_counter()
    try:
        res = subtract_fits(
            args.science, args.template, output=args.output,
            science_variance=args.science_variance, template_variance=args.template_variance,
            science_weight=args.science_weight, template_weight=args.template_weight,
            science_mask=args.science_mask, template_mask=args.template_mask,
            science_hdu=sci_hdu, template_hdu=tmpl_hdu, science_psf=args.science_psf,
            template_psf=args.template_psf, mode=args.mode, detect=args.detect,
            config=list(args.config or ()), config_files=_config_files(args.config_file or ()),
        )
    except (InputError, AlgorithmError) as exc:
        # bad inputs and too few stars are the user's to fix (the message says how): a usage error
        exc.exit_code = 2
        raise
    _out(summary(res, time.perf_counter() - t0))
    return 0


_DESCRIPTION = """\
Difference two FITS images of the same sky: SCIENCE - TEMPLATE, written to -o DIFF.fits.

Each image comes from its primary or first image HDU (or --hdu), with its celestial WCS (TPV,
SIP or plain) from the header. Variance: a --*-variance file, or a --*-weight (inverse variance)
file, or estimated from the image (robust sky noise plus sources over the header GAIN). Masks:
non-zero pixels are bad. Each image is sky-subtracted and its PSF measured (characterize.*), or
taken from --*-psf (a PSF model image such as WebbPSF's, for fields with few isolated stars); the
template is warped onto the science grid (warp.*), PSF-matched with a spatially varying kernel
(difference.psfmatch.*: Alard-Lupton Gaussians, or one value per kernel pixel when they leave
structured residuals, basis = auto), subtracted and decorrelated (difference.decorrelation.*).

DIFF.fits holds IMAGE, MASK and VARIANCE HDUs plus the difference PSF; its primary header has
DIFFMODE (which image was convolved), DIFFKSUM (kernel sum), DIFFNSTP (stamps) and more. With
--detect, DIA sources go to DIFF_diaSrc.fits and DIFF_diaSrc.csv with columns
""" + "\n".join(f"  {k:<12} {v}" for k, v in DIA_TABLE_COLUMNS.items()) + """

Config: -c/-C set any key `apfast config show` lists. Defaults that differ from `apfast process`,
for single images of any size: difference.psfmatch.mode = auto (convolve the sharper image),
characterize.detection.include_threshold_multiplier = 2, characterize.psf.min_stars = 3,
difference.psfmatch.min_stamps = 3,
difference.psfmatch.fft_planner = difference.decorrelation.fft_planner = FFTW_ESTIMATE.

Errors in the inputs (missing or non-FITS files, no WCS, images that do not overlap, too few
stars) exit with status 2 and a one-line message naming the file or the config key to change."""


def add_subtract_parser(sub: Any) -> None:
    """Register the ``subtract`` subcommand on the subparsers of :func:`apfast.run.cli.build_parser`."""
    from apfast.run.cli import _add_config_args

    p = sub.add_parser("subtract", help="difference two FITS images of the same sky (any telescope)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("science", help="the science FITS image (the later epoch; positive = brighter in it)")
    p.add_argument("template", help="the template (reference) FITS image; any WCS that overlaps the science")
    p.add_argument("-o", "--output", required=True, metavar="DIFF.fits", help="the difference file to write")
    for role in ("science", "template"):
        p.add_argument(f"--{role}-variance", default=None, metavar="FILE", help=f"variance image of the {role}")
        p.add_argument(f"--{role}-weight", default=None, metavar="FILE",
                       help=f"inverse-variance (weight) image of the {role}, instead of a variance")
        p.add_argument(f"--{role}-mask", default=None, metavar="FILE",
                       help=f"mask image of the {role}: non-zero = bad (see subtract.mask_ignore_bits)")
        p.add_argument(f"--{role}-psf", default=None, metavar="FILE",
                       help=f"PSF model image of the {role} (e.g. WebbPSF, its pixel scale) instead of measuring it")
    p.add_argument("--mode", choices=["auto", "convolveTemplate", "convolveScience"], default=None,
                   help="which image is convolved (default auto: the sharper one; config difference.psfmatch.mode)")
    p.add_argument("--detect", action="store_true",
                   help="detect and measure DIA sources: DIFF_diaSrc.fits and DIFF_diaSrc.csv")
    p.add_argument("--hdu", nargs="+", default=None, metavar="N",
                   help="HDU index or EXTNAME of both images, or two: science then template (default: the "
                        "first image HDU)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_subtract)
