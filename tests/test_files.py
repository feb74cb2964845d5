"""atomic_write: complete files with ordinary permissions, and the old file kept when a write fails."""
import os

import pytest

from timm_posattn.files import atomic_write


def test_writes_with_ordinary_permissions(tmp_path):
    path = tmp_path / 'sub' / 'out.json'
    assert atomic_write(str(path), lambda f: f.write(b'{}')) == str(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_bytes() == b'{}' and path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ['out.json']


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / 'model.pth.tar'
    path.write_bytes(b'good')

    def crash(f):
        f.write(b'half')
        raise RuntimeError('disk full')

    with pytest.raises(RuntimeError, match='disk full'):
        atomic_write(str(path), crash)
    assert path.read_bytes() == b'good' and [p.name for p in tmp_path.iterdir()] == ['model.pth.tar']
