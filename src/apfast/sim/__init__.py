"""Simulated DECam data with truth (raws, calibrations, reference catalogues), format-exact test files and
the demo that runs every stage on them.

May import anything (it drives the whole pipeline in the demo); no pipeline module imports it.
"""
