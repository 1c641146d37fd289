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


def unwritable(path: Path | str) -> str | None:
    """Why nothing can be created at `path` (a folder, or a file to be), or None where it can.

    Judged on `path` where it is a folder, else on its nearest existing folder (the one a new folder or
    file would be made in, or an existing file replaced in): a read-only file system, or no write
    permission (root has it everywhere but on a read-only file system).
    """
    path = Path(path).absolute()
    here = next((p for p in (path, *path.parents) if p.exists()), None)
    if here is not None and here == path and path.is_file():
        here = path.parent  # a file is written beside itself and renamed over (atomic_write)
    if here is None or not here.is_dir():
        return None  # a file in the way is its own error, named by the caller
    try:
        read_only = bool(os.statvfs(here).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        read_only = False
    if read_only:
        return "is on a read-only file system" + (f" ({here})" if here != path else "")
    if not os.access(here, os.W_OK | os.X_OK):
        return f"cannot be written ({here} is not writable)" if here != path else "is not writable"
    return None
