"""How many threads the in-process kernels use (spreading, gathering, FFTs).

Default 2 (the machines this is built for have 2 cores; results depend on the count, since each
thread sums its own grid), `$DREFINE_THREADS` to change it, and `single_threaded()` for tasks
that run side by side on one core each: batch members use it, so a member gives the same numbers
on a dask worker and in-process.
"""
from __future__ import annotations

import contextlib
import os

DEFAULT_THREADS = 2
_override: list[int] = []


def kernel_threads(requested: int | None = None) -> int:
    """`requested` when given, else the innermost `single_threaded()`, `$DREFINE_THREADS`, 2."""
    if requested:
        return int(requested)
    if _override:
        return _override[-1]
    env = os.environ.get("DREFINE_THREADS", "")
    return max(1, int(env)) if env.strip().isdigit() else DEFAULT_THREADS


@contextlib.contextmanager
def single_threaded():
    """Kernels started inside use one thread (numba's parallel loops too)."""
    import numba

    _override.append(1)
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)
        _override.pop()
