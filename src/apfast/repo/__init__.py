"""The repository and its I/O: the Butler, the raw and calib registries, dataId expressions, ingest of
raws, master calibrations and reference catalogues, output repositories and the background writer.

May import: the core (:mod:`apfast.errors`, :mod:`apfast.exposure`, :mod:`apfast.masks`,
:mod:`apfast._configbase`, :mod:`apfast.camera`, :mod:`apfast.psfmatch_diag`) and :mod:`apfast.kernels`.
Never the stages or orchestration (:mod:`apfast.run`).
"""
