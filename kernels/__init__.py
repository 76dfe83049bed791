"""apfast's compiled core: pure Numba functions over native-endian C-contiguous arrays.

No I/O, no config objects, no astropy, no logging, no globals. Each kernel's
docstring gives shapes, dtypes, which arguments are written in place and the
equation it implements. Decorators come only from :mod:`apfast._jit`.
"""
