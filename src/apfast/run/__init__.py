"""Orchestration: the command line, the assembled configuration, the pipeline that runs the stages of
each CCD and is the only caller of the APDB transaction per CCD-visit, the ``-j N``/Dask executor and the
kernel warm-up.

May import everything below it (:mod:`apfast.repo`, :mod:`apfast.ccd`, :mod:`apfast.diffim`,
:mod:`apfast.dia`, the core and the kernels); nothing below imports it.
"""
