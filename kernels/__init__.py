"""apfast's compiled core: pure Numba functions over native-endian C-contiguous arrays.

No I/O, no config objects, no astropy, no logging, no globals. Each kernel's
docstring gives shapes, dtypes, which arguments are written in place and the
equation it implements. Decorators come only from :mod:`apfast._jit`.

Other codes that want validated array-in, array-out functions rather than raw
kernels use :mod:`apfast.kernels.api` (``from apfast.kernels import api``). Its
functions are not re-exported here: ``detect``, ``warp``, ``background`` and
``convolve`` are also the names of kernel modules of this package.
"""
