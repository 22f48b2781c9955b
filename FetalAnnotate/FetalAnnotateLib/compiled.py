"""Loops compiled to machine code by numba, for the steps numpy cannot vectorise.

:func:`compiled` compiles a function on its first call and caches the machine code on disk
(in ``__pycache__`` beside the source, else in the user's cache folder, or where
``NUMBA_CACHE_DIR`` says), so later processes load it in a fraction of a second. The compiled
code releases the interpreter lock: threads run it on all cores.
"""

import numba


def compiled(function):
    """``function`` compiled by numba in nopython mode, cached on disk, releasing the interpreter lock.

    Where no cache folder is writable (a read-only installation and home folder, as in some
    containers), it is compiled in every process instead (a few seconds at its first call)
    rather than failing at import.
    """
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(function)
