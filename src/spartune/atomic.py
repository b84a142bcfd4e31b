"""Write then rename: every file spartune writes appears whole or not at all.

A crash, a full disk or a reader running beside the writer must never see half a checkpoint,
half a table or half a figure. Each writer writes to a hidden temporary name in the target's
own folder (so the rename stays on one file system, where `os.replace` is atomic) and moves it
into place only once the write has finished; a write that fails removes its temporary file and
raises `WriteError`, which names the file the user asked for, not the temporary one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()  # what open() would give a new file here

# The errors of a full disk, a file-size limit (ulimit -f) and a full quota.
NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class WriteError(OSError):
    """Writing `filename` failed; nothing of it was left behind. `errno` is the cause's, when
    the cause was an OS error (torch and matplotlib sometimes wrap it in their own)."""


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`.

        with replacing(out / "trials.csv") as tmp:
            df.to_csv(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _MODE)  # mkstemp's 0600 would make every result private to its writer
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut keeps one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):
            raise WriteError(_errno(e), _reason(e), str(path)) from e
        raise


def write_text(path: str | Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """For serialisers (torch.save) that report a full disk as an error of their own: have
    them write into memory, and let this plain write meet the OS error itself."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def _errno(e: BaseException) -> int:
    """The OS error behind `e`, following the chain torch and matplotlib wrap it in."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        text = str(e)
        for code in NO_SPACE:
            if os.strerror(code) in text:
                return code
        e = e.__cause__ or e.__context__
    return errno.EIO


def _reason(e: BaseException) -> str:
    code = _errno(e)
    if code in NO_SPACE:
        return os.strerror(code)
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__


def no_space(e: BaseException) -> bool:
    """Is `e` a write that failed for want of space (disk, quota or file-size limit)?"""
    return isinstance(e, OSError) and e.errno in NO_SPACE


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock between local processes (flock on `path`, created if missing); the
    kernel drops it when its holder dies, so a killed process never leaves it held."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
