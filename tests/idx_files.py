"""Tiny MNIST-family datasets in the real idx format, for the tests (tests/ is on sys.path under pytest).

The idx format: two zero bytes, the type code (0x08: unsigned bytes), the number of dimensions, each dimension as a
big-endian uint32, then the data. The images of class c are noise around a bright square whose place depends on c,
so that the data has something to learn and every class is present.
"""
import gzip
from pathlib import Path
from typing import Optional

import torch

FASHION = 'FashionMNIST'  # torchvision's folder names
MNIST = 'MNIST'


def idx_bytes(array: torch.Tensor) -> bytes:
    """A uint8 tensor as an idx file's bytes."""
    assert array.dtype == torch.uint8
    header = bytes([0, 0, 0x08, array.dim()]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    return header + array.contiguous().numpy().tobytes()


def write_idx(path: Path, array: torch.Tensor) -> Path:
    """Write an idx file, gzipped when the name ends in .gz."""
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == '.gz' else data)
    return path


def make_split(n: int, size: int = 28, num_classes: int = 10, seed: int = 0):
    """(images uint8 N x size x size, labels uint8 N): every class present, a square per class on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)].to(torch.uint8)
    images = torch.randint(0, 60, (n, size, size), generator=g, dtype=torch.uint8)
    for i, c in enumerate(labels.tolist()):
        r, col = divmod(c, 4)
        images[i, 2 + 6 * r:6 + 6 * r, 2 + 6 * col:6 + 6 * col] = 230
    return images, labels


def write_dataset(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, layout: str = 'flat',
                  folder: str = FASHION, seed: int = 0, size: int = 28) -> Path:
    """The four idx files of an MNIST-family dataset under ``root``: flat (as Debian's package lays them out) or in
    torchvision's ``root/<folder>/raw/``. Returns ``root``."""
    where = root if layout == 'flat' else root / folder / 'raw'
    suffix = '.gz' if gz else ''
    for prefix, n, split_seed in (('train', n_train, seed), ('t10k', n_test, seed + 1)):
        images, labels = make_split(n, size=size, seed=split_seed)
        write_idx(where / f'{prefix}-images-idx3-ubyte{suffix}', images)
        write_idx(where / f'{prefix}-labels-idx1-ubyte{suffix}', labels)
    return root


def split_file(root: Path, train: bool, what: str = 'images') -> Optional[Path]:
    """The file of a split that `write_dataset` wrote (any layout, gz or not)."""
    prefix = 'train' if train else 't10k'
    kind = 'images-idx3' if what == 'images' else 'labels-idx1'
    found = sorted(root.rglob(f'{prefix}-{kind}-ubyte*'))
    return found[0] if found else None
