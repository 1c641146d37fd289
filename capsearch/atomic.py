"""Atomic writes: a file a run reads back is either its old content or its whole new content.

Every writer goes to a temporary file beside the target, flushes and fsyncs it, and renames it over the
target (os.replace is atomic on POSIX and Windows within one file system). A kill, an exception or a
full disk (OSError ENOSPC) part-way leaves the old file, or none, and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_target(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (for writers that take a file name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer closed it: flush its bytes to the disk
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path | str, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically; return the path."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_target(path) as tmp:
        tmp.write_bytes(raw)
    return Path(path)
