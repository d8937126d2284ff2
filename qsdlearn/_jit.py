"""Numba plumbing shared by every compiled module: one ``njit`` with the project's options.

The on-disk cache is used only where it can be written: next to the package, or in
``NUMBA_CACHE_DIR`` when the user sets it. A read-only install compiles without a cache
instead of failing.
"""

import os

import numba


def cache_is_writable():
    """Whether numba's on-disk cache can be used (never on read-only installs)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    return os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK)


_CACHE = cache_is_writable()


def njit(**options):
    """``numba.njit`` with the project's options: cached where possible, no GIL held."""
    return numba.njit(cache=_CACHE, nogil=True, **options)
