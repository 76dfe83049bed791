"""The columns of the DIA source table of ``apfast subtract`` (a module without imports: the CLI's help prints them)."""

from __future__ import annotations

__all__ = ["DIA_TABLE_COLUMNS"]

#: The columns of :func:`apfast.dia.pair.dia_table` and what they hold (also the CSV/FITS column documentation).
DIA_TABLE_COLUMNS: dict[str, str] = {
    "id": "source number, 1..n",
    "x": "column (0-based pixels of the science image)",
    "y": "row (0-based pixels of the science image)",
    "ra": "right ascension (degrees, science WCS)",
    "dec": "declination (degrees, science WCS)",
    "flux": "PSF flux on the difference in science image units (DN), positive = brighter in the science",
    "flux_err": "1-sigma error of flux (same units)",
    "snr": "flux / flux_err",
    "is_negative": "true when the source is fainter in the science than in the template",
    "is_dipole": "true when a dipole (positive and negative lobe: a misalignment or a moving source)",
    "flags": "bitmask: 1 PSF flux failed, 2 edge or off image, 4 bad or no-data pixels, 8 saturated, "
             "16 cosmic ray or interpolated, 32 suspect",
    "reliability": "real/bogus score 0..1 of apfast's shipped model (apfast.dia.reliability; trained on "
                   "simulated DECam data: a guide, not a verdict, on other cameras)",
}
