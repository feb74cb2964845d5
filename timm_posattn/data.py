"""Dataset factory for training and evaluation.

timm's ``create_dataset`` covers image folders, tar files, ``torch/cifar10``/``torch/cifar100``, ``hfds/``, ``wds/``
and more, but not SVHN nor the paper's synthetic dataset, and it reads ``torch/mnist`` / ``torch/fashion_mnist`` only
from uncompressed files in torchvision's layout. This module adds SVHN and the synthetic dataset, reads the MNIST
family from gzipped or plain idx files in either layout (`idx_datasets`), and otherwise defers to timm,
turning the many ways a missing or malformed dataset fails (AssertionError, RuntimeError, FileNotFoundError...)
into one :class:`DatasetError` whose message says what was expected, so scripts can print a single line.
"""
import os
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Subset
from timm.data import create_dataset as timm_create_dataset

from .cli import UsageError, one_line
from .dataset_info import DatasetInfo, get_dataset_info

__all__ = ['DatasetError', 'create_dataset', 'is_structured', 'random_subset']

_STRUCTURED = get_dataset_info('structured')
_SVHN = get_dataset_info('svhn')
_IDX = ('mnist', 'fashion_mnist')  # the table keys read by `idx_datasets`
_FOLDER_NAMES = ('', 'folder', 'image_folder', 'imagefolder')
_SIZED_BY_NUM_SAMPLES = ('hfids', 'tfds', 'wds')  # timm's iterable readers take num_samples; other datasets do not
# the split folders timm's folder datasets look for (timm.data.dataset_factory: the split's name, or a synonym)
_SPLIT_FOLDER_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))
_SPLIT_FOLDER_NAMES = ('test',) + sum(_SPLIT_FOLDER_SYNONYMS, ())


class DatasetError(UsageError):
    """A dataset could not be opened; the message names the dataset, split, path and what was expected."""


def is_structured(name: Optional[str]) -> bool:
    """True for the built-in spatially structured dataset of the paper (``structured``)."""
    return (name or '').lower() in _STRUCTURED.names


def _split(info: DatasetInfo, split: str) -> str:
    """The loader's split for an accepted split name of a table dataset (`dataset_info` holds the aliases)."""
    resolved = info.split(split)
    if resolved is None:
        raise DatasetError(f"dataset '{info.dataset_name}' has no split '{split}': expected one of "
                           f"{', '.join(info.splits)}")
    return resolved


def _create_structured(split: str, num_samples: Optional[int], data_seed: int) -> Dataset:
    from .structured import StructuredImageDataset
    return StructuredImageDataset(split=_split(_STRUCTURED, split), num_samples=num_samples, seed=data_seed)


def _create_svhn(root: Optional[str], split: str, download: bool) -> Dataset:
    from torchvision.datasets import SVHN
    if not root:
        raise DatasetError("dataset 'torch/svhn' needs --data-dir (where the .mat files are; add --dataset-download "
                           "to fetch them)")
    split = _split(_SVHN, split)  # SVHN has no validation split: 'validation' is its test split (papers report it)
    try:
        return SVHN(root=root, split=split, download=download)
    except RuntimeError as e:
        hint = '' if download else ' (add --dataset-download to fetch it)'
        raise DatasetError(f"dataset 'torch/svhn' split '{split}' not found under '{root}': "
                           f"expected {split}_32x32.mat{hint}") from e


def _create_idx(info: DatasetInfo, root: Optional[str], split: str, download: bool,
                img_mode: Optional[str] = None) -> Dataset:
    from .idx_datasets import IMG_MODES, FashionMNISTFiles, IdxFileError, MNISTFiles, idx_file_names
    name = info.dataset_name
    cls = FashionMNISTFiles if info.key == 'fashion_mnist' else MNISTFiles
    split = _split(info, split)
    img_mode = img_mode or 'L'
    if img_mode not in IMG_MODES:
        raise DatasetError(f"dataset '{name}' has grey images: image mode '{img_mode}' is not one of "
                           f"{', '.join(IMG_MODES)} (1 or 3 input channels)")
    files = ', '.join(f'{n}(.gz)' for n in idx_file_names(split == 'train'))
    where = f"expected {files} in it or in its {cls.folder_name}/raw/"
    hint = f"; {info.install_hint}" if info.install_hint else ''
    if not root:
        raise DatasetError(f"dataset '{name}' needs --data-dir: the folder of its idx files ({files}){hint}, "
                           f"or add --dataset-download to fetch them")
    if not download and not os.path.isdir(root):
        missing = 'is a file, not a folder' if os.path.exists(root) else 'does not exist'
        raise DatasetError(f"dataset folder '{root}' for '{name}' {missing}: {where}{hint}, "
                           f"or add --dataset-download to fetch them")
    try:
        return cls(root, train=split == 'train', download=download, img_mode=img_mode)
    except IdxFileError as e:
        raise DatasetError(f"dataset '{name}' split '{split}': {e}") from None
    except RuntimeError as e:  # torchvision: not found (and not downloaded), or the download failed
        if download:
            raise DatasetError(f"dataset '{name}' could not be downloaded to '{root}': {one_line(e)[:200]}") from None
        raise DatasetError(f"dataset '{name}' split '{split}' not found in '{root}': {where}{hint}, "
                           f"or add --dataset-download to fetch them") from None


def _check_split_folder(root: str, split: str) -> None:
    """timm reads the whole root when it finds no folder for the split: with split folders there, that would train
    or evaluate on all of them together."""
    if not os.path.isdir(root):
        return
    present = sorted(d for d in os.listdir(root)
                     if d.lower() in _SPLIT_FOLDER_NAMES and os.path.isdir(os.path.join(root, d)))
    name = split.split('[')[0]
    synonyms = next((group for group in _SPLIT_FOLDER_SYNONYMS if name in group), (name,))
    if present and not any(os.path.isdir(os.path.join(root, s)) for s in synonyms):
        raise DatasetError(f"no folder for split '{split}' under '{root}' (it has {', '.join(present)}): timm would "
                           f"read all of them as one dataset; name one of these splits (train.py: --val-split '' "
                           f"skips evaluation)")


def _check_root(name: str, root: Optional[str], download: bool, split: str) -> None:
    """Reject roots that cannot hold the dataset before timm fails on them with a less helpful error."""
    prefix = name.partition('/')[0].lower() if '/' in name else ''
    if name.lower() in _FOLDER_NAMES or name.lower() in ('torch/folder', 'torch/image_folder'):
        if not root:
            raise DatasetError('an image-folder dataset needs --data-dir: a folder with train/ and validation/ '
                               'sub-folders of class folders, or a .tar file')
        if not os.path.exists(root):
            raise DatasetError(f"dataset path '{root}' does not exist: expected a folder with train/ and "
                               f"validation/ sub-folders of class folders, or a .tar file")
        if os.path.isfile(root) and not root.endswith('.tar'):
            raise DatasetError(f"dataset path '{root}' is a file: expected a folder of class folders or a .tar file")
        _check_split_folder(root, split)
    elif prefix == 'torch':
        if not root:
            raise DatasetError(f"dataset '{name}' needs --data-dir (where it is stored, or go with --dataset-download)")
        if not download and not os.path.isdir(root):
            raise DatasetError(f"dataset path '{root}' for '{name}' does not exist "
                               f"(add --dataset-download to fetch it there)")


def create_dataset(
        name: str,
        root: Optional[str] = None,
        split: str = 'validation',
        is_training: bool = False,
        download: bool = False,
        num_samples: Optional[int] = None,
        data_seed: int = 0,
        **kwargs: Any,
) -> Dataset:
    """Create a dataset by timm-style name: ``structured``, ``torch/svhn``, or any name timm's factory takes.

    Args:
        name: ``structured``, ``torch/svhn``, ``torch/cifar10``, ``hfds/...``, ``wds/...``, or '' for a folder/tar.
        root: Dataset location (unused by ``structured``).
        split: Split name; ``validation`` maps to ``test`` for datasets that only have train/test.
        is_training: Passed to timm (shuffling of iterable datasets).
        download: Allow torchvision datasets to download.
        num_samples: Number of samples of ``structured`` or of timm's iterable datasets (refused for the others,
            whose size is fixed).
        data_seed: Seed that generates the ``structured`` dataset (its hidden partition and samples).
        **kwargs: Passed through to ``timm.data.create_dataset``; ``input_img_mode`` ('RGB', 'L') also applies to
            the MNIST family (grey images, repeated in three channels for 'RGB').

    Raises:
        DatasetError: when the dataset is missing, empty, or the split does not exist.
    """
    name = name or ''
    if num_samples is not None and not (is_structured(name) or name.partition('/')[0].lower() in _SIZED_BY_NUM_SAMPLES):
        raise DatasetError(f"dataset '{name or 'image folder'}' has a fixed size: a number of samples applies only to "
                           f"structured and to iterable datasets ({', '.join(p + '/' for p in _SIZED_BY_NUM_SAMPLES)})")
    if kwargs.get('class_map') and (is_structured(name) or name.partition('/')[0].lower() == 'torch'):
        raise DatasetError(f"dataset '{name}' has fixed labels: a class map applies to image folders and to the "
                           f"hfds/, hfids/, tfds/, wds/ readers")
    if is_structured(name):
        return _create_structured(split, num_samples, data_seed)
    if name.lower() == _SVHN.dataset_name:
        return _create_svhn(root, split, download)
    info = get_dataset_info(name) if name.lower().startswith('torch/') else None
    if info is not None and info.key in _IDX:
        return _create_idx(info, root, split, download, kwargs.get('input_img_mode'))

    _check_root(name, root, download, split)
    try:
        ds = timm_create_dataset(
            name, root=root, split=split, is_training=is_training, download=download, num_samples=num_samples,
            **kwargs)
    except DatasetError:
        raise
    except (AssertionError, RuntimeError, ImportError, ValueError, OSError) as e:  # OSError: FileNotFound, NotADir
        detail = str(e).strip() or type(e).__name__
        if 'download=True' in detail:
            detail += ' (on the command line: --dataset-download)'
        raise DatasetError(f"could not open dataset '{name or 'image folder'}' split '{split}' at '{root}': "
                           f"{detail}") from e
    try:
        empty = len(ds) == 0
    except TypeError:  # iterable datasets without a length
        empty = False
    if empty:
        raise DatasetError(f"dataset '{name or 'image folder'}' split '{split}' at '{root}' has no images")
    return ds


class _TransformSubset(Subset):
    """A subset that passes on the transform timm's `create_loader` sets, to the dataset it draws from."""

    @property
    def transform(self) -> Any:
        return self.dataset.transform

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value


def random_subset(dataset: Dataset, num_samples: Optional[int], seed: int = 0) -> Dataset:
    """``num_samples`` items drawn at random (seeded) from a dataset that has more; otherwise the dataset itself
    (an iterable dataset too: its readers cut it)."""
    if num_samples is None or not hasattr(dataset, '__len__') or len(dataset) <= num_samples:
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return _TransformSubset(dataset, order[:num_samples].tolist())
