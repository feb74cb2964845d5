"""One output-folder policy for every command that writes results (train.py, publish, paper, convert, visualize).

A command owns the files it names, and only those: it refuses to replace them unless told to (``--overwrite`` /
``--force``), replaces them atomically when told, and never deletes a folder or a file it did not write.
"""
import fnmatch
import os
from pathlib import Path
from typing import IO, Callable, List, Sequence, Union

from .cli import UsageError
from .files import atomic_write

__all__ = ['OutputExistsError', 'OutputFolder']


class OutputExistsError(UsageError):
    """The command's files already exist in the folder and replacing them was not asked for."""


class OutputFolder:
    """A folder a command writes into, owning only the files that match `owned` (names or glob patterns).

    Args:
        path: The folder (created when the command writes).
        owned: The command's file names or glob patterns, e.g. ('results.json', 'checkpoint-*.pth.tar').
        overwrite: Whether existing owned files may be replaced.
        command: Names the command in messages.
        flag: The command-line flag that allows replacing (for the message).
    """

    def __init__(
            self,
            path: Union[str, Path],
            owned: Sequence[str],
            overwrite: bool = False,
            command: str = 'this command',
            flag: str = '--overwrite',
    ) -> None:
        self.path = Path(path)
        self.owned = tuple(owned)
        self.overwrite = overwrite
        self.command = command
        self.flag = flag

    def owns(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.owned)

    def existing(self) -> List[str]:
        """Owned files already in the folder, sorted."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file() and self.owns(p.name))

    def check(self) -> 'OutputFolder':
        """Refuse (one line) before any work when owned files exist and replacing them was not asked for."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputExistsError(f"output folder '{self.path}' is a file: expected a folder (or a new path)")
        ancestor = self.path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UsageError(f"output folder '{self.path}' cannot be created: '{ancestor}' is a file")
        folders = [name for name in self.owned if (self.path / name).is_dir()]
        if folders:
            raise OutputExistsError(f"'{self.path / folders[0]}' is a folder: expected a file name for the output of "
                                    f"{self.command}")
        existing = self.existing()
        if existing and not self.overwrite:
            shown = ', '.join(existing[:5]) + (f' and {len(existing) - 5} more' if len(existing) > 5 else '')
            raise OutputExistsError(
                f"'{self.path}' already holds {shown} from an earlier run of {self.command}; pass {self.flag} to "
                f"replace them (other files are never touched), or choose another folder")
        return self

    def file(self, name: str) -> str:
        """Path of an owned file (a name the command does not own is a bug in the command)."""
        if not self.owns(name):
            raise ValueError(f'{self.command} does not own {name!r} (owned: {self.owned})')
        return str(self.path / name)

    def write(self, name: str, write_fn: Callable[[IO[bytes]], None]) -> str:
        """Write an owned file atomically (temp file in the folder, then os.replace)."""
        return atomic_write(self.file(name), write_fn)

    def write_text(self, name: str, text: str) -> str:
        return self.write(name, lambda f: f.write(text.encode('utf-8')))

    def remove(self, names: Sequence[str]) -> List[str]:
        """Delete owned files (e.g. a replaced run's stale checkpoints); returns the names removed."""
        removed = []
        for name in names:
            path = self.file(name)
            if os.path.isfile(path):
                os.remove(path)
                removed.append(name)
        return removed
