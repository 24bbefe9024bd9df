"""Atomic file output: write to a temporary name beside the target, then rename.

A crash or Ctrl-C mid-write never leaves a half-written file, and a user's existing file is
replaced only by a complete new one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text or bytes) to `path` through a temporary file and os.replace."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".part", dir=p.parent or ".")
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write a JSON report atomically (numpy scalars and arrays are converted)."""
    return atomic_write(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
