"""DECam Community Pipeline InstCal-like files (ooi image, oow weight, ood data quality) from an apfast simulation.

The image is the simulation's noiseless post-ISR truth (ADU, sky included) plus Gaussian noise of the
true variance, cropped to ``crop``; the header WCS is the simulation's approximate header WCS written
as TPV (identity polynomial plus a small quadratic term, as the CP writes SCAMP solutions), so the
astrometric refit starts from a TPV WCS that is off by the simulated pointing error.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.io import fits

from apfast.sim.simulate import truth_image

#: Pixels the helper marks in the DQ plane (ood values): rows of a bad column and a saturated block.
BAD_COLUMN = 100
SAT_BLOCK = (slice(200, 204), slice(300, 304))
ZERO_WEIGHT = (slice(0, 8), slice(0, 1024))


def write_instcal(sim_dir: Path, raw_file: Path, visit: int, ccdnum: int, out_dir: Path, *,
                  crop: tuple[int, int, int, int] = (1536, 2560, 512, 1536), seed: int = 0) -> list[Path]:
    """Write ``c4d_<visit>_ooi_g_v1.fits.fz`` and its ``oow``/``ood`` partners; return the three paths."""
    rng = np.random.default_rng(seed + visit * 100 + ccdnum)
    meta = json.loads((Path(sim_dir) / "truth" / f"ccd_{visit}_{ccdnum}.json").read_text())
    truth = truth_image(sim_dir, visit, ccdnum).astype(np.float64)
    gain_b, gain_a = meta["amps"]["B"]["gain"], meta["amps"]["A"]["gain"]
    gain = np.empty_like(truth)
    gain[:, :1024] = gain_b
    gain[:, 1024:] = gain_a
    rn_e = meta["amps"]["A"]["read_noise_e"]
    var = truth / gain + (rn_e / gain) ** 2
    image = truth + rng.normal(size=truth.shape) * np.sqrt(var)
    y0, y1, x0, x1 = crop
    image, var = image[y0:y1, x0:x1].astype(np.float32), var[y0:y1, x0:x1]
    weight = (1.0 / var).astype(np.float32)
    weight[ZERO_WEIGHT] = 0.0
    dq = np.zeros(image.shape, np.int16)
    dq[:, BAD_COLUMN] = 1
    dq[SAT_BLOCK] = 3
    primary = fits.getheader(raw_file, 0)
    primary["PROCTYPE"] = "InstCal"
    arawgain = float(0.5 * (gain_a + gain_b))
    primary["ARAWGAIN"] = (arawgain, "[e/adu] Average raw gain")
    # the CP's zero point is of the image's ADU; per amplifier the truth differs by 2.5 log10(gain / ARAWGAIN)
    primary["MAGZERO"] = (float(meta["zero_point_e"] - 2.5 * np.log10(arawgain)), "[mag] zero point (ADU)")
    ext = fits.Header()
    ext["CCDNUM"] = ccdnum
    ext["EXTNAME"] = meta["detector"]
    ext["SATURATE"] = 1e9
    wcs = dict(meta["header_wcs_trimmed"])
    wcs["CRPIX1"] -= x0
    wcs["CRPIX2"] -= y0
    wcs["CTYPE1"], wcs["CTYPE2"] = "RA---TPV", "DEC--TPV"
    for k, v in wcs.items():
        ext[k] = v
    for axis in (1, 2):  # xi = x + 1e-6 x^2 (degrees of the intermediate plane): TPV, close to the truth
        ext[f"PV{axis}_0"], ext[f"PV{axis}_1"], ext[f"PV{axis}_2"] = 0.0, 1.0, 0.0
        ext[f"PV{axis}_4"] = 1e-6
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, data in (("ooi", image), ("oow", weight), ("ood", dq)):
        path = out_dir / f"c4d_{visit}_{kind}_g_v1.fits.fz"
        hdul = fits.HDUList([fits.PrimaryHDU(header=primary),
                             fits.CompImageHDU(data, header=ext, compression_type="RICE_1" if kind == "ood" else
                                               "GZIP_2")])
        hdul.writeto(path, overwrite=True)
        paths.append(path)
    return paths
