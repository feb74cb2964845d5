"""MNIST and Fashion-MNIST from their idx files (timm_posattn.idx_datasets through data.create_dataset): both layouts,
gzipped or not, never writing to the data folder; damaged files and missing folders are one line. Small files in the
real format are written by tests/idx_files.py; one test reads the real Fashion-MNIST files where Debian's
dataset-fashion-mnist package put them, and skips where it is not installed (CI)."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from idx_files import FASHION, MNIST, make_split, split_file, write_dataset, write_idx
from timm_posattn.data import DatasetError, create_dataset
from timm_posattn.dataset_info import get_dataset_info
from timm_posattn.idx_datasets import IdxFileError, read_idx

REAL_FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')  # Debian's dataset-fashion-mnist package


def _listing(root: Path):
    """Every path under root with its size and modification time: what 'nothing was written' compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob('*'))}


@pytest.mark.parametrize('layout', ['flat', 'torchvision'])
@pytest.mark.parametrize('gz', [True, False], ids=['gz', 'plain'])
@pytest.mark.parametrize('name, folder', [('torch/fashion_mnist', FASHION), ('torch/mnist', MNIST)])
def test_both_layouts_gzipped_or_not(tmp_path, layout, gz, name, folder):
    root = write_dataset(tmp_path / 'data', n_train=30, n_test=12, gz=gz, layout=layout, folder=folder)
    before = _listing(root)
    train_ds = create_dataset(name, root=str(root), split='train')
    test_ds = create_dataset(name, root=str(root), split='validation')  # the table's alias of the test split
    assert (len(train_ds), len(test_ds)) == (30, 12)
    images, labels = make_split(12, seed=1)  # what write_dataset wrote for t10k
    image, label = test_ds[3]
    assert image.mode == 'L' and image.size == (28, 28)
    assert torch.equal(torch.from_numpy(np.array(image)), images[3])
    assert label == int(labels[3]) and test_ds.targets.tolist() == labels.tolist()
    assert len(train_ds.classes) == get_dataset_info(name).num_classes == 10
    assert _listing(root) == before  # read where they lie: nothing decompressed or cached into the data folder


def test_rgb_mode_repeats_the_grey_channel(tmp_path):
    root = write_dataset(tmp_path / 'data', n_train=4, n_test=4)
    grey, _ = create_dataset('torch/fashion_mnist', root=str(root), split='test')[1]
    rgb, _ = create_dataset('torch/fashion_mnist', root=str(root), split='test', input_img_mode='RGB')[1]
    assert rgb.mode == 'RGB' and (np.asarray(rgb) == np.asarray(grey)[..., None]).all()
    with pytest.raises(DatasetError, match="image mode 'CMYK'"):
        create_dataset('torch/fashion_mnist', root=str(root), split='test', input_img_mode='CMYK')


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _corrupt(kind: str, root: Path) -> str:
    """Damage the test split in one way; returns what the error must say."""
    images, labels = split_file(root, train=False), split_file(root, train=False, what='labels')
    if kind == 'truncated gzip':
        _truncate(images, images.stat().st_size // 2)
        return 'not a complete gzip file'
    if kind == 'not gzip':
        images.write_bytes(b'plain bytes, not gzip')
        return 'not a complete gzip file'
    if kind == 'truncated plain':
        plain = images.with_suffix('')
        plain.write_bytes(gzip.decompress(images.read_bytes())[:-100])
        images.unlink()
        return 'truncated or damaged'
    if kind == 'not idx':
        images.write_bytes(gzip.compress(b'\x1f\x8b\x08\x00 not an idx header'))
        return 'not an idx file of unsigned bytes'
    if kind == 'header cut':
        images.write_bytes(gzip.compress(bytes([0, 0, 8, 3, 0, 0])))
        return 'truncated inside its header'
    if kind == 'counts differ':
        write_idx(labels, make_split(5, seed=9)[1])
        return 'do not pair up'
    if kind == 'label out of range':
        write_idx(labels, torch.full((20,), 12, dtype=torch.uint8))
        return 'has label 12: expected 0..9'
    raise AssertionError(kind)


@pytest.mark.parametrize('kind', ['truncated gzip', 'not gzip', 'truncated plain', 'not idx', 'header cut',
                                  'counts differ', 'label out of range'])
def test_damaged_files_are_one_error_naming_the_file(tmp_path, kind):
    root = write_dataset(tmp_path / 'data', n_train=8, n_test=20)
    expected = _corrupt(kind, root)
    with pytest.raises(DatasetError) as info:
        create_dataset('torch/fashion_mnist', root=str(root), split='validation')
    message = str(info.value)
    assert '\n' not in message and expected in message and "split 'test'" in message, message
    assert create_dataset('torch/fashion_mnist', root=str(root), split='train')  # the other split is intact


def test_read_idx_refuses_other_element_types(tmp_path):
    path = tmp_path / 'floats-idx1-ubyte'
    path.write_bytes(bytes([0, 0, 0x0D, 1]) + (2).to_bytes(4, 'big') + bytes(8))  # 0x0D: float32
    with pytest.raises(IdxFileError, match='not an idx file of unsigned bytes'):
        read_idx(str(path))


@pytest.mark.parametrize('name, files, hint', [
    ('torch/fashion_mnist', 'train-images-idx3-ubyte(.gz)', 'apt-get install dataset-fashion-mnist'),
    ('torch/mnist', 'train-images-idx3-ubyte(.gz)', '--dataset-download'),
])
def test_missing_folder_or_files_say_what_to_install(tmp_path, name, files, hint):
    for root in (tmp_path / 'missing', tmp_path):  # no folder; a folder without the files
        with pytest.raises(DatasetError) as info:
            create_dataset(name, root=str(root), split='train')
        assert files in str(info.value) and hint in str(info.value) and '\n' not in str(info.value)
    (tmp_path / 'file').write_text('x')
    with pytest.raises(DatasetError, match='is a file, not a folder'):
        create_dataset(name, root=str(tmp_path / 'file'), split='train')
    with pytest.raises(DatasetError, match='needs --data-dir'):
        create_dataset(name, root=None, split='train')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file']  # nothing written, no folder created


@pytest.mark.skipif(not REAL_FASHION_MNIST.is_dir(),
                    reason=f'{REAL_FASHION_MNIST} not found: Debian package dataset-fashion-mnist not installed '
                           f'(apt-get install dataset-fashion-mnist)')
def test_real_fashion_mnist_files_match_the_dataset_table():
    """The package's four .gz files read where they lie: 60,000 / 10,000 images of 28x28, 10 balanced classes, and the
    normalization the table (and so train.py, validate.py and the pretrained cfg) uses is the data's own."""
    before = _listing(REAL_FASHION_MNIST)
    info = get_dataset_info('torch/fashion_mnist')
    train_ds = create_dataset(info.dataset_name, root=str(REAL_FASHION_MNIST), split='train')
    test_ds = create_dataset(info.dataset_name, root=str(REAL_FASHION_MNIST), split='validation')
    assert (len(train_ds), len(test_ds)) == (60000, 10000)
    assert tuple(train_ds.data.shape[1:]) == info.input_size[1:] == (28, 28)
    assert torch.bincount(train_ds.targets).tolist() == [6000] * 10
    assert torch.bincount(test_ds.targets).tolist() == [1000] * 10
    assert tuple(train_ds.classes) == info.label_names
    pixels = train_ds.data.double() / 255
    assert pixels.mean().item() == pytest.approx(info.mean[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(info.std[0], abs=5e-4)
    assert _listing(REAL_FASHION_MNIST) == before
