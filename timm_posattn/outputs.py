"""One output policy for every command that writes files (train.py, validate.py, publish, paper, convert, visualize,
export and the benchmarks).

A command owns the files it writes, and only those. The policy is a mechanism, not a list of cases:

* **Checked before work.** `OutputFolder.check` refuses, in one line and before anything is computed, a folder that
  cannot be written (read-only, a file in the way) and files of an earlier run that replacing was not asked for.
* **Claimed, not checked.** A command that writes a folder of files holds an exclusive lock on it for its lifetime
  (`OutputFolder.claim`: ``fcntl.flock`` on ``.timm_posattn.lock``). A second process is refused in one line and
  touches nothing; the checks run under the lock, so no other run can slip in between check and write. A lock dies
  with its process: a killed run never blocks the next.
* **A manifest, never name patterns.** What a claim wrote is listed in the command's manifest
  (``.timm_posattn-<key>.json``) together with the run id. ``--overwrite``/``--force`` removes exactly the files the
  previous manifest lists; a user's file that merely looks like one of ours is never deleted.
* **Sets are committed whole.** Files that belong together (a published model, a conversion, the paper's results)
  are staged beside the old ones and switched in by a journaled commit: a kill before the journal is written leaves
  the old set, a kill after it leaves a commit that the next claim of the folder, or the next reader
  (`finish_interrupted_commits`), completes. No command ever works on a mix of old and new files.
* **Created, not clobbered.** A single output file is created with no-clobber semantics unless replacing was asked
  for, so two racing processes cannot both write it.
* **Temp files are reclaimed.** Temp files are named after their command and locked while written; a claim removes
  its command's unlocked (dead) temp files and staging folders (`files.remove_stale_temps`).
"""
import fcntl
import fnmatch
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .cli import UsageError
from .files import atomic_write, ordinary_permissions, remove_stale_temps

__all__ = [
    'OutputError', 'OutputExistsError', 'OutputBusyError', 'OutputFolder', 'FolderClaim', 'LOCK_NAME',
    'manifest_name', 'read_manifest', 'finish_interrupted_commits',
]

_logger = logging.getLogger(__name__)

LOCK_NAME = '.timm_posattn.lock'
_MANIFEST_PREFIX = '.timm_posattn-'
_STAGING_PREFIX = '.staging_'
_MANIFEST_VERSION = 1


class OutputError(UsageError):
    """An output could not be written (read-only or full disk, permissions): one line, nothing half-written."""


class OutputExistsError(OutputError):
    """The command's files already exist and replacing them was not asked for."""


class OutputBusyError(OutputError):
    """Another process is writing the same folder."""


def manifest_name(key: str) -> str:
    """The manifest file of the command whose key is ``key`` (e.g. 'train', 'publish')."""
    return f'{_MANIFEST_PREFIX}{key}.json'


def _describe_os_error(error: OSError) -> str:
    return error.strerror or str(error)


def read_manifest(folder: Union[str, Path], key: str) -> Optional[Dict[str, Any]]:
    """The manifest a command (``key``) keeps in ``folder``; None if it has none. A damaged one is one line."""
    path = Path(folder) / manifest_name(key)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise OutputError(f"'{path}' (what an earlier run wrote) cannot be read ({e}): restore it, or choose "
                          f"another folder") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get('files'), list) \
            or not all(isinstance(name, str) and name and os.path.basename(name) == name for name in manifest['files']):
        raise OutputError(f"'{path}' (what an earlier run wrote) is damaged: expected a 'files' list of names in "
                          f"this folder; restore it, or choose another folder")
    return manifest


class OutputFolder:
    """A folder a command writes into, and the names it may write there.

    Args:
        path: The folder (created when the command writes).
        owned: The command's file names or glob patterns, e.g. ('results.json', 'checkpoint-*.pth.tar'): files of
            these names in the folder are refused without ``overwrite``. They are never used to delete anything.
        overwrite: Whether the command may replace its own earlier files.
        command: Names the command in messages.
        flag: The command-line flag that allows replacing (for the message).
        key: The command's short name in manifest and temp file names (default: from ``command``).
    """

    def __init__(
            self,
            path: Union[str, Path],
            owned: Sequence[str],
            overwrite: bool = False,
            command: str = 'this command',
            flag: str = '--overwrite',
            key: Optional[str] = None,
    ) -> None:
        self.path = Path(path)
        self.owned = tuple(owned)
        self.overwrite = overwrite
        self.command = command
        self.flag = flag
        self.key = key or _default_key(command)

    def owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.owned)

    def existing(self) -> List[str]:
        """Files of the owned names already in the folder, sorted."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and self.owns(p.name))

    def file(self, name: str) -> str:
        """Path of an owned file (a name the command does not own is a bug in the command)."""
        if not self.owns(name):
            raise ValueError(f'{self.command} does not own {name!r} (owned: {self.owned})')
        return str(self.path / name)

    def check_writable(self) -> None:
        """Refuse (one line) a folder that cannot be created or written: a file in the way, a read-only file system,
        permissions."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"output folder '{self.path}' is a file: expected a folder (or a new path)")
        ancestor = self.path
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"output folder '{self.path}' cannot be created: '{ancestor}' is a file")
        why = why_unwritable(ancestor)
        if why:
            raise OutputError(f"cannot write into '{self.path}': '{ancestor}' {why}; choose another folder")

    def _refuse_existing(self, listed: Sequence[str] = ()) -> None:
        folders = [name for name in self.owned if (self.path / name).is_dir()]
        if folders:
            raise OutputExistsError(f"'{self.path / folders[0]}' is a folder: expected a file name for the output of "
                                    f"{self.command}")
        existing = sorted(set(self.existing()) | {n for n in listed if (self.path / n).is_file()})
        if existing and not self.overwrite:
            shown = ', '.join(existing[:5]) + (f' and {len(existing) - 5} more' if len(existing) > 5 else '')
            raise OutputExistsError(
                f"'{self.path}' already holds {shown}, which {self.command} writes; pass {self.flag} to replace "
                f"them (other files are never touched), or choose another folder")

    def check(self) -> 'OutputFolder':
        """Refuse (one line) before any work: a folder that cannot be written, or owned files that exist while
        replacing them was not asked for."""
        self.check_writable()
        self._refuse_existing(_listed(self.path, self.key))
        return self

    def write(self, name: str, write_fn: Callable[[IO[bytes]], None]) -> str:
        """Write one owned file atomically, for a command that writes single files (no claim): replaced only with
        ``overwrite``, otherwise created if absent (never clobbered, even by a racing process)."""
        path = self.file(name)
        try:
            return atomic_write(path, write_fn, replace=self.overwrite, owner=self.key)
        except FileExistsError:
            raise OutputExistsError(f"'{path}' appeared while {self.command} ran (another process?); pass "
                                    f"{self.flag} to replace it") from None
        except OSError as e:
            raise OutputError(f"could not write '{path}': {_describe_os_error(e)}") from None

    def write_text(self, name: str, text: str) -> str:
        return self.write(name, lambda f: f.write(text.encode('utf-8')))

    def claim(self, resume: bool = False) -> 'FolderClaim':
        """Take the folder for this command's lifetime (see `FolderClaim`); use as a context manager."""
        return FolderClaim(self, resume=resume)


def _default_key(command: str) -> str:
    """'train.py' -> 'train', 'python -m timm_posattn.export' -> 'export', 'benchmarks/x.py' -> 'benchmarks-x'."""
    name = (command.split() or ['output'])[-1].replace('.py', '').rsplit('.', 1)[-1]
    return re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') or 'output'


def why_unwritable(folder: Path) -> Optional[str]:
    """Why files cannot be created in an existing folder (None: they can)."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return 'is on a read-only file system'
    except OSError:
        pass
    return None if os.access(folder, os.W_OK | os.X_OK) else 'is not writable by this user'


def _listed(folder: Path, key: str) -> List[str]:
    manifest = read_manifest(folder, key) if folder.is_dir() else None
    return list(manifest['files']) if manifest else []


class FolderClaim:
    """A command's exclusive hold on its output folder, and the manifest of what it wrote there.

    Entering it locks the folder (refusing a second process in one line), completes a commit an earlier run left
    half done, reclaims this command's stale temp files, and refuses the previous run's files unless the folder's
    ``overwrite`` allows replacing them. ``resume=True`` continues the run the manifest describes (train.py
    ``--resume`` in place): its files stay listed and its run id is kept.
    """

    def __init__(self, folder: OutputFolder, resume: bool = False) -> None:
        self.folder = folder
        self.path = folder.path
        self.key = folder.key
        self.resume = resume
        self.run_id = uuid.uuid4().hex  # a resumed claim takes the manifest's
        self.previous: Optional[Dict[str, Any]] = None  # the manifest found when claiming
        self.manifest: Dict[str, Any] = {}
        self._lock_fd: Optional[int] = None
        self._staged: List[str] = []
        self._staging_used = False
        self._created: List[Path] = []  # the lock file and folders this claim created (gone again if it wrote nothing)
        self._wrote = False

    # -- lifetime ----------------------------------------------------------------------------------------------

    def __enter__(self) -> 'FolderClaim':
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> 'FolderClaim':
        folder = self.folder
        folder.check_writable()
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        try:
            os.makedirs(self.path, exist_ok=True)
            self._created = missing[::-1]
            self._lock_fd = self._lock()
        except OSError as e:
            self._remove_created()
            raise OutputError(f"cannot write into '{self.path}': {_describe_os_error(e)}") from None
        except OutputBusyError:
            self._remove_created()
            raise
        fd = self._lock_fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f'{folder.command} (pid {os.getpid()})\n'.encode(), 0)
            self._settle()
        except BaseException:
            self.release()
            raise
        return self

    def _settle(self) -> None:
        """Under the lock: finish the interrupted commits (every command's: the lock is the folder's), reclaim dead
        temp files, check what is there."""
        for key, _ in _interrupted_commits(self.path):
            _finish_commit(self.path, key)
        remove_stale_temps(str(self.path), self.key)
        for staging in self.path.glob(f'{_STAGING_PREFIX}{self.key}_*'):
            if staging.is_dir():  # staged by a run killed before its commit: never part of any set
                shutil.rmtree(staging, ignore_errors=True)
        self.previous = read_manifest(self.path, self.key)
        previous_files = list(self.previous['files']) if self.previous else []
        if self.resume:
            if self.previous is None:
                raise OutputError(f"'{self.path}' has no manifest of {self.folder.command}: nothing to continue")
            self.run_id = self.previous.get('run_id') or self.run_id
            self.manifest = dict(self.previous)
            return
        self.folder._refuse_existing(previous_files)
        self.manifest = {'version': _MANIFEST_VERSION, 'command': self.folder.command, 'run_id': self.run_id,
                         'created': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'files': []}

    def _lock(self) -> int:
        """Open and lock the lock file; retried when the file was replaced between open and lock (a claim that
        wrote nothing removes the lock file it created)."""
        lock = self.path / LOCK_NAME
        while True:
            created = not lock.exists()
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode('utf-8', 'replace').strip() or 'another process'
                os.close(fd)
                raise OutputBusyError(f"'{self.path}' is being written by {holder}: wait for it to finish, or "
                                      f"choose another folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                if created:
                    self._created.append(lock)
                return fd
            os.close(fd)

    def _remove_created(self) -> None:
        """Leave no trace of a claim that wrote nothing: the lock file and folders it created."""
        for path in reversed(self._created):
            try:
                path.unlink() if path.name == LOCK_NAME else path.rmdir()
            except OSError:
                break  # not empty (someone else wrote there): leave it
        self._created = []

    def release(self) -> None:
        if self._staged or self._staging_used:  # staged but never committed (the command failed): in no set
            shutil.rmtree(self.staging, ignore_errors=True)
            self._staged, self._staging_used = [], False
        if self._lock_fd is not None:
            if not self._wrote:
                self._remove_created()  # while still locked: no other claim can hold this lock file
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the manifest ------------------------------------------------------------------------------------------

    @property
    def files(self) -> List[str]:
        return list(self.manifest.get('files', []))

    def _save_manifest(self) -> None:
        self._wrote = True
        text = json.dumps(self.manifest, indent=2) + '\n'
        try:
            atomic_write(str(self.path / manifest_name(self.key)), lambda f: f.write(text.encode()), owner=self.key)
        except OSError as e:
            raise OutputError(f"could not write into '{self.path}': {_describe_os_error(e)}") from None

    def update(self, **fields: Any) -> None:
        """Record facts about the run in the manifest (e.g. what it was forked from)."""
        self.manifest.update(fields)
        self._save_manifest()

    def record(self, name: str) -> str:
        """List ``name`` as this run's (before it is written: a killed write never leaves an unlisted file of ours);
        returns its path."""
        if os.path.basename(name) != name or not name:
            raise ValueError(f'{name!r} is not a file name in the folder')
        if name not in self.manifest['files']:
            self.manifest['files'].append(name)
            self._save_manifest()
        return str(self.path / name)

    def forget(self, name: str) -> None:
        if name in self.manifest['files']:
            self.manifest['files'].remove(name)
            self._save_manifest()

    def path_of(self, name: str) -> str:
        return str(self.path / name)

    def write(self, name: str, write_fn: Callable[[IO[bytes]], None]) -> str:
        """Write a file of this run atomically (listed first)."""
        path = self.record(name)
        try:
            return atomic_write(path, write_fn, owner=self.key)
        except OSError as e:
            raise OutputError(f"could not write '{path}': {_describe_os_error(e)}") from None

    def write_text(self, name: str, text: str) -> str:
        return self.write(name, lambda f: f.write(text.encode('utf-8')))

    def remove(self, names: Sequence[str]) -> List[str]:
        """Delete files this run's manifest lists (others are refused: a bug in the caller); returns those removed."""
        removed = []
        for name in names:
            if name not in self.manifest['files']:
                raise ValueError(f'{name!r} is not listed in the manifest of {self.folder.command}')
            path = self.path / name
            if path.is_file():
                path.unlink()
                removed.append(name)
            self.forget(name)
        return removed

    def remove_previous(self) -> List[str]:
        """Replace an earlier run (``overwrite``): delete exactly the files its manifest lists, and nothing else."""
        previous = [n for n in (self.previous or {}).get('files', []) if n not in self.manifest['files']]
        if not previous:
            return []
        self.manifest['files'] = previous + self.manifest['files']  # listed until deleted: a kill leaks nothing
        self._save_manifest()
        return self.remove(previous)

    # -- sets --------------------------------------------------------------------------------------------------

    @property
    def staging(self) -> Path:
        return self.path / f'{_STAGING_PREFIX}{self.key}_{self.run_id}'

    def staging_folder(self) -> Path:
        """The folder the set is staged in (for writers that fill a folder, e.g. timm's save_for_hf); name the files
        they wrote in `commit`."""
        try:
            os.makedirs(self.staging, exist_ok=True)
        except OSError as e:
            raise OutputError(f"could not write into '{self.path}': {_describe_os_error(e)}") from None
        self._staging_used = True
        return self.staging

    def stage(self, name: str, write_fn: Callable[[IO[bytes]], None]) -> str:
        """Write a file of the set beside the old one (in the staging folder); `commit` switches the set in."""
        if os.path.basename(name) != name or not name:
            raise ValueError(f'{name!r} is not a file name in the folder')
        self.folder.file(name)  # an owned name
        try:
            os.makedirs(self.staging, exist_ok=True)
            atomic_write(str(self.staging / name), write_fn, owner=self.key)
        except OSError as e:
            raise OutputError(f"could not write into '{self.path}': {_describe_os_error(e)}") from None
        if name not in self._staged:
            self._staged.append(name)
        return str(self.path / name)

    def stage_text(self, name: str, text: str) -> str:
        return self.stage(name, lambda f: f.write(text.encode('utf-8')))

    def commit(self, names: Optional[Sequence[str]] = None) -> List[str]:
        """Switch the staged set (``names``, default: the files staged with `stage`) in for the previous one:
        journal, then move each file into place, then drop the previous set's files that the new one does not have.
        Returns the paths of the set."""
        if names is not None:
            missing = [n for n in names if not (self.staging / n).is_file()]
            if missing:
                raise RuntimeError(f'{self.folder.command} staged no {missing} in {self.staging}')
            for name in names:
                self.folder.file(name)  # an owned name
            self._staged = list(names)
        previous = [n for n in (self.previous or {}).get('files', []) if n not in self._staged]
        self.manifest['journal'] = {'staging': self.staging.name, 'files': list(self._staged), 'remove': previous}
        self.manifest['files'] = sorted(set(self.manifest['files']) | set(self._staged) | set(previous))
        self._save_manifest()  # the commit point: from here on the new set is the folder's
        staged, self._staged, self._staging_used = self._staged, [], False  # the journal owns the staging folder now
        _finish_commit(self.path, self.key, self.manifest)
        self.manifest = read_manifest(self.path, self.key) or self.manifest
        return [str(self.path / name) for name in staged]


def _finish_commit(folder: Path, key: str, manifest: Optional[Dict[str, Any]] = None) -> bool:
    """Roll a journaled commit forward (idempotent); the caller holds the folder's lock. Returns whether there was
    one."""
    manifest = manifest if manifest is not None else read_manifest(folder, key)
    journal = (manifest or {}).get('journal')
    if not journal:
        return False
    staging = folder / str(journal.get('staging', ''))
    if not staging.name.startswith(_STAGING_PREFIX) or staging.parent != folder:
        raise OutputError(f"'{folder / manifest_name(key)}' is damaged: its journal names '{staging}'")
    for name in journal.get('files', []):
        if (staging / name).is_file():
            ordinary_permissions(str(staging / name))  # whatever wrote it (save_for_hf may write 0600)
            os.replace(staging / name, folder / name)
    for name in journal.get('remove', []):
        if name in manifest['files'] and (folder / name).is_file():
            (folder / name).unlink()
    manifest = dict(manifest)
    manifest['files'] = sorted(set(journal.get('files', [])) | (set(manifest['files']) - set(journal['remove'])))
    manifest.pop('journal')
    text = json.dumps(manifest, indent=2) + '\n'
    atomic_write(str(folder / manifest_name(key)), lambda f: f.write(text.encode()), owner=key)
    shutil.rmtree(staging, ignore_errors=True)
    return True


def _interrupted_commits(folder: Path) -> List[Tuple[str, str]]:
    """(key, command) of every manifest in ``folder`` whose journaled commit a killed run left half done. Unreadable
    manifests are not judged here: the claim or reader of that command refuses them."""
    pending = []
    for path in sorted(folder.glob(f'{_MANIFEST_PREFIX}*.json')):
        key = path.name[len(_MANIFEST_PREFIX):-len('.json')]
        try:
            manifest = read_manifest(folder, key)
        except OutputError:
            continue
        if (manifest or {}).get('journal'):
            pending.append((key, manifest.get('command', key)))
    return pending


def finish_interrupted_commits(folder: Union[str, Path]) -> List[str]:
    """Complete the commits that killed runs left half done in ``folder``, before anything reads it; returns the
    commands whose commit was completed. Refused in one line when the folder is being written or cannot be.

    A process that holds the folder's claim finds none: claiming finished them."""
    folder = Path(folder)
    pending = _interrupted_commits(folder) if folder.is_dir() else []
    if not pending:
        return []
    key, command = pending[0]
    if why_unwritable(folder):
        raise OutputError(f"'{folder}' holds a set of files that {command} was switching in when it was "
                          f"stopped, and the folder is not writable to finish it; run {command} again there")
    with OutputFolder(folder, (), overwrite=True, command=command, key=key).claim(resume=True):
        pass  # claiming finishes every interrupted commit of the folder
    done = [command for _, command in pending]
    for command in done:
        _logger.info(f"Finished the interrupted commit of {command} in '{folder}'")
    return done
