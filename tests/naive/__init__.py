"""Slow, obviously correct NumPy/SciPy references the kernels are tested against (one module per kernel family)."""
