"""MNIST and Fashion-MNIST read from their idx files wherever they lie, gzipped or not.

torchvision's `MNIST` / `FashionMNIST` (what timm's ``torch/mnist`` and ``torch/fashion_mnist`` build) only read
uncompressed files under ``ROOT/<ClassName>/raw/``. The same four files also come flat and gzipped: Debian's
``dataset-fashion-mnist`` package puts them in ``/usr/share/datasets/fashion-mnist/``, a read-only system folder.
These subclasses find the files in either layout and decompress them in memory, so the data folder is never written
to; with ``download=True`` they fall back to torchvision's download into the torchvision layout. Images are PIL
'L' images as torchvision gives them, or 'RGB' ones (``img_mode``) for a 3-channel model, as timm's datasets do with
``input_img_mode``. Everything else (``classes``, ``targets``, the transforms) is torchvision's.
"""
import gzip
import os
import zlib
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from PIL import Image
from torchvision.datasets import MNIST, FashionMNIST

__all__ = ['IdxFileError', 'MNISTFiles', 'FashionMNISTFiles', 'find_idx_file', 'read_idx', 'idx_file_names',
           'IMG_MODES']

_UBYTE = 0x08  # the idx type code of unsigned bytes, the only one the MNIST family uses
IMG_MODES = ('L', 'RGB')  # grey as stored, or grey repeated in three channels for a 3-channel model


class IdxFileError(ValueError):
    """An idx file is truncated, not gzip where its name says so, or not an idx file of unsigned bytes."""


def idx_file_names(train: bool) -> Tuple[str, str]:
    """The (images, labels) file names of a split, without the .gz that a download or a Debian package adds."""
    prefix = 'train' if train else 't10k'
    return f'{prefix}-images-idx3-ubyte', f'{prefix}-labels-idx1-ubyte'


def find_idx_file(root: str, folder_name: str, name: str) -> Optional[str]:
    """The idx file ``name`` (or ``name.gz``) in torchvision's ``ROOT/<folder_name>/raw/`` or in ``ROOT`` itself."""
    for folder in (os.path.join(root, folder_name, 'raw'), root):
        for candidate in (name, name + '.gz'):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def read_idx(path: str) -> torch.Tensor:
    """An idx file of unsigned bytes (gzipped when its name ends in .gz) as a uint8 tensor of its recorded shape."""
    try:
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                data = f.read()
        else:
            with open(path, 'rb') as f:
                data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise IdxFileError(f"'{path}' is not a complete gzip file ({e})") from None
    except OSError as e:  # unreadable: permissions, a folder of that name, an I/O error
        raise IdxFileError(f"'{path}' could not be read ({e.strerror or e})") from None
    if len(data) < 4 or data[:2] != b'\0\0' or data[2] != _UBYTE or not 1 <= data[3] <= 4:
        raise IdxFileError(f"'{path}' is not an idx file of unsigned bytes (its first bytes are {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFileError(f"'{path}' is truncated inside its header")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    expected = header + int(torch.tensor(shape).prod())
    if len(data) != expected:
        raise IdxFileError(f"'{path}' holds {len(data)} bytes, its header {shape} needs {expected}: truncated or "
                           f"damaged")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*shape)


class _IdxFilesMixin:
    """Find the split's files in either layout and read them; torchvision does the rest."""
    folder_name: str  # torchvision's folder: ROOT/<folder_name>/raw
    root: str
    train: bool
    classes: list
    data: torch.Tensor
    targets: torch.Tensor
    transform: Optional[Callable]
    target_transform: Optional[Callable]

    def __init__(self, root: str, train: bool = True, transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None, download: bool = False, img_mode: str = 'L') -> None:
        if img_mode not in IMG_MODES:
            raise ValueError(f"img_mode {img_mode!r}: expected one of {', '.join(IMG_MODES)}")
        self.img_mode = img_mode
        super().__init__(root, train=train, transform=transform, target_transform=target_transform,
                         download=download)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        """(image, class index) as torchvision gives them, the image in ``img_mode``."""
        img = Image.fromarray(self.data[index].numpy())  # uint8 H x W: mode 'L'
        if img.mode != self.img_mode:
            img = img.convert(self.img_mode)
        target = int(self.targets[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    @property
    def raw_folder(self) -> str:  # where torchvision's download puts the files (not this subclass's name)
        return os.path.join(self.root, self.folder_name, 'raw')

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, self.folder_name, 'processed')

    def _split_files(self) -> Dict[str, Optional[str]]:
        return {name: find_idx_file(self.root, self.folder_name, name) for name in idx_file_names(self.train)}

    def _check_exists(self) -> bool:
        return all(self._split_files().values())

    def _load_data(self) -> Tuple[torch.Tensor, torch.Tensor]:
        images_file, labels_file = self._split_files().values()
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise IdxFileError(f"'{images_file}' ({list(images.shape)}) and '{labels_file}' ({list(labels.shape)}) "
                               f"do not pair up: expected N images of H x W and N labels")
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise IdxFileError(f"'{labels_file}' has label {int(labels.max())}: expected 0..{len(self.classes) - 1}")
        return images, labels.long()


class MNISTFiles(_IdxFilesMixin, MNIST):
    """torchvision's MNIST, read from gzipped or plain idx files in a flat folder or torchvision's layout."""
    folder_name = 'MNIST'


class FashionMNISTFiles(_IdxFilesMixin, FashionMNIST):
    """torchvision's FashionMNIST, read from gzipped or plain idx files in a flat folder or torchvision's layout."""
    folder_name = 'FashionMNIST'
