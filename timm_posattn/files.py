"""Crash-safe file writes: nothing a user saved is replaced by a half-written file, and no temp file outlives its
writer for long.

Every write goes through a temp file in the target's folder, named ``.tmp_<owner>_*`` after the command that writes
it and locked (``fcntl.flock``) while it is written. A lock dies with its process, so a temp file that nobody holds
is the leftover of a killed writer: `remove_stale_temps` reclaims exactly those of one owner, never a live one.
"""
import errno
import fcntl
import os
import tempfile
from typing import IO, Callable, List

__all__ = ['atomic_write', 'move_into_place', 'ordinary_permissions', 'remove_stale_temps', 'temp_prefix']


def temp_prefix(owner: str) -> str:
    """The name prefix of the temp files ``owner`` (a command's key) writes."""
    return f'.tmp_{owner}_'


def ordinary_permissions(path: str) -> None:
    """0666 minus the umask, as a plain open() would give (mkstemp and some writers give 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _locked_temp(directory: str, owner: str, suffix: str):
    """A new temp file, locked; retried if a cleaner reclaimed it in the instant before the lock was taken."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix(owner), suffix=suffix)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)


def atomic_write(path: str, write_fn: Callable[[IO[bytes]], None], replace: bool = True,
                 owner: str = 'timm_posattn') -> str:
    """Write ``path`` through a locked temp file in the same folder, fsync it, then put it in place.

    ``replace``: put it in place with ``os.replace`` (an existing file is replaced whole); False creates ``path``
    only if it does not exist, atomically (a hard link), and raises FileExistsError otherwise, so that two racing
    writers cannot both "create" it. The result gets ordinary permissions (0666 minus the umask), not the 0600 of
    ``mkstemp``; on any error the temp file is removed and ``path`` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _locked_temp(directory, owner, os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
            ordinary_permissions(tmp)
            if replace:
                os.replace(tmp, path)
            else:
                _create_from(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    return path


def move_into_place(tmp: str, path: str, replace: bool = True) -> str:
    """Put a complete temp file (written by a library that takes a path) in place as `atomic_write` does."""
    if replace:
        os.replace(tmp, path)
    else:
        _create_from(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    return path


def _create_from(tmp: str, path: str) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist (FileExistsError otherwise), atomically."""
    try:
        os.link(tmp, path)
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, 'File exists', path) from None
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # no hard links here: claim the name exclusively, then fill it in one rename
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, path)
        return
    os.remove(tmp)


def remove_stale_temps(directory: str, owner: str) -> List[str]:
    """Remove the temp files of ``owner``'s killed writes in ``directory`` (those no live process holds locked);
    returns their names."""
    prefix, removed = temp_prefix(owner), []
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # its writer is alive
        try:
            os.remove(path)
            removed.append(name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed
