"""Crash-safe file writes: nothing a user saved is replaced by a half-written file."""
import os
import tempfile
from typing import IO, Callable

__all__ = ['atomic_write']


def atomic_write(path: str, write_fn: Callable[[IO[bytes]], None]) -> str:
    """Write ``path`` through a temp file in the same folder, fsync it, then ``os.replace`` it into place.

    The result gets ordinary permissions (0666 minus the umask), not the 0600 of ``mkstemp``; on any error the
    temp file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix='.tmp_', suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
