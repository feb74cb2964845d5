"""The spatially structured dataset of Jelassi, Sander & Li (NeurIPS 2022, arXiv 2210.09221).

An input is D patches of dimension d. The patches are split into L hidden sets S_1..S_L (the *partition*,
fixed by the dataset seed and never shown to a model). A sample draws a label y in {-1, +1} and one set S_l;
every patch of S_l carries ``y * w*``, every other patch carries ``delta_j * w*`` with delta_j in {-1, 0, +1}
(probabilities q/2, 1-q, q/2), and all patches get Gaussian noise orthogonal to w*. Only a model that learns which
patches belong together can tell the signal set from the random +-w* patches: that is what positional attention
is supposed to learn ("patch association").

Two forms are provided:
  * tensors ``(N, D, d)`` with labels in {-1, +1} for the simplified model (``sample_structured``);
  * ``StructuredImageDataset``: 32x32 RGB PIL images whose 4x4 patches carry the patch vectors (D=64, d=48), labels
    in {0, 1}, usable by timm's ``create_loader`` with mean ``STRUCTURED_MEAN`` and std ``STRUCTURED_STD``.
"""
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .dataset_info import STRUCTURED_MEAN, STRUCTURED_STD, get_dataset_info

__all__ = [
    'StructuredConfig', 'StructuredImageDataset', 'make_structure', 'orthogonal_feature', 'sample_structured',
    'encode_patches_to_image', 'decode_image_to_patches', 'STRUCTURED_MEAN', 'STRUCTURED_STD',
    'IMAGE_SIZE', 'PATCH_SIZE', 'VALUE_RANGE',
]

IMAGE_SIZE = 32
PATCH_SIZE = 4
GRID_SIZE = IMAGE_SIZE // PATCH_SIZE  # 8x8 = 64 patches
# Patch values v are stored as uint8 round(127.5 + 127.5 * v / VALUE_RANGE): ToTensor + Normalize(0.5, 1/6) gives v
# back up to the 8-bit quantisation step (2 * VALUE_RANGE / 255 ~ 0.024); |v| > VALUE_RANGE is clipped.
VALUE_RANGE = 3.0

# Sample seeds of the splits are offset so that train/validation/test never share a sample stream.
_SPLIT_OFFSETS = {'train': 0, 'validation': 1, 'test': 2}
_DEFAULT_NUM_SAMPLES = {'train': 5000, 'validation': 1000, 'test': 1000}


@dataclass(frozen=True)
class StructuredConfig:
    """Parameters of the structured dataset.

    Defaults are the image form (64 patches of 3x4x4 pixels on an 8x8 grid) with 8 hidden sets of 8 patches:
    q=0.5 makes a quarter of the non-signal patches +w* and a quarter -w*, so counting +-w* patches alone is a weak
    classifier and grouping patches by set pays off; sigma=0.2 per coordinate keeps it learnable by a tiny ViT on CPU.
    """
    num_patches: int = GRID_SIZE * GRID_SIZE  # D
    num_sets: int = 8  # L, each set has C = D / L patches
    patch_dim: int = 3 * PATCH_SIZE * PATCH_SIZE  # d
    q: float = 0.5  # probability that a non-signal patch carries +-w*
    sigma: float = 0.2  # std of the noise per coordinate (projected orthogonal to w*)
    seed: int = 0  # picks the partition and w*

    def __post_init__(self):
        if self.num_patches < 1 or self.num_sets < 1 or self.patch_dim < 2:
            raise ValueError(
                f'expected num_patches >= 1, num_sets >= 1, patch_dim >= 2, got '
                f'{self.num_patches}, {self.num_sets}, {self.patch_dim}')
        if self.num_patches % self.num_sets:
            raise ValueError(
                f'expected num_sets to divide num_patches (equal-size sets), '
                f'got D={self.num_patches}, L={self.num_sets}')
        if not 0.0 <= self.q <= 1.0:
            raise ValueError(f'expected 0 <= q <= 1, got q={self.q}')
        if self.sigma < 0:
            raise ValueError(f'expected sigma >= 0, got sigma={self.sigma}')

    @property
    def set_size(self) -> int:
        """C = D / L, the number of patches of each hidden set."""
        return self.num_patches // self.num_sets


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def make_structure(config: StructuredConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """The hidden partition (LongTensor (D,), set id of each patch) and the unit feature w* (d,), from config.seed.

    The partition is a random permutation cut into L equal sets, so the sets are not spatially contiguous: a model
    cannot find them from locality, only from the data.
    """
    g = _generator(config.seed)
    perm = torch.randperm(config.num_patches, generator=g)
    partition = torch.empty(config.num_patches, dtype=torch.long)
    partition[perm] = torch.arange(config.num_patches) // config.set_size
    w = torch.randn(config.patch_dim, generator=g)
    return partition, w / w.norm()


def orthogonal_feature(feature: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random unit vector orthogonal to ``feature``: the new feature w' of a transfer task."""
    g = _generator(seed)
    w = torch.randn(feature.shape[-1], generator=g)
    unit = feature / feature.norm()
    w = w - (w @ unit) * unit
    return w / w.norm()


def sample_structured(
        config: StructuredConfig,
        num_samples: int,
        seed: int,
        partition: Optional[torch.Tensor] = None,
        feature: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` inputs ``X`` (N, D, d) and labels ``y`` (N,) in {-1., +1.}.

    ``partition``/``feature`` default to ``make_structure(config)``; pass another feature (e.g. from
    ``orthogonal_feature``) for a downstream task with the same structure. ``seed`` picks the samples only.
    """
    if num_samples < 0:
        raise ValueError(f'expected num_samples >= 0, got {num_samples}')
    if partition is None or feature is None:
        default_partition, default_feature = make_structure(config)
        partition = default_partition if partition is None else partition
        feature = default_feature if feature is None else feature
    D, d, L = config.num_patches, config.patch_dim, config.num_sets
    if partition.shape != (D,) or feature.shape != (d,):
        raise ValueError(f'expected partition of shape ({D},) and feature of shape ({d},), '
                         f'got {tuple(partition.shape)} and {tuple(feature.shape)}')
    feature = feature / feature.norm()
    g = _generator(seed)
    y = torch.randint(0, 2, (num_samples,), generator=g).float() * 2 - 1
    signal_set = torch.randint(0, L, (num_samples,), generator=g)
    # delta in {-1, 0, +1} with probabilities q/2, 1-q, q/2
    u = torch.rand(num_samples, D, generator=g)
    delta = torch.where(u < config.q / 2, -1.0, torch.where(u < config.q, 1.0, 0.0))
    in_signal_set = partition.unsqueeze(0) == signal_set.unsqueeze(1)  # (N, D)
    coef = torch.where(in_signal_set, y.unsqueeze(1), delta)
    noise = torch.randn(num_samples, D, d, generator=g) * config.sigma
    noise = noise - (noise @ feature).unsqueeze(-1) * feature  # orthogonal to w*
    x = coef.unsqueeze(-1) * feature + noise
    return x, y


def encode_patches_to_image(patches: torch.Tensor) -> np.ndarray:
    """(..., 64, 48) patch vectors -> uint8 HWC images (..., 32, 32, 3); patch j is row j // 8, column j % 8.

    A patch vector is laid out (channel, row, col) like a Conv2d patch-embedding weight. Values are clipped to
    +-VALUE_RANGE before quantisation.
    """
    expected = (GRID_SIZE * GRID_SIZE, 3 * PATCH_SIZE * PATCH_SIZE)
    if tuple(patches.shape[-2:]) != expected:
        raise ValueError(f'expected patches of shape (..., {expected[0]}, {expected[1]}), got {tuple(patches.shape)}')
    lead = patches.shape[:-2]
    p = patches.reshape(-1, GRID_SIZE, GRID_SIZE, 3, PATCH_SIZE, PATCH_SIZE)
    img = p.permute(0, 1, 4, 2, 5, 3).reshape(*lead, IMAGE_SIZE, IMAGE_SIZE, 3)  # (gh, ph, gw, pw, c)
    pixels = torch.round(127.5 + 127.5 * img / VALUE_RANGE).clamp(0, 255)
    return pixels.to(torch.uint8).numpy()


def decode_image_to_patches(image: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_patches_to_image`` for a normalized CHW tensor (3, 32, 32) -> (64, 48) patch vectors."""
    if tuple(image.shape) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f'expected an image tensor of shape (3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(image.shape)}')
    p = image.reshape(3, GRID_SIZE, PATCH_SIZE, GRID_SIZE, PATCH_SIZE).permute(1, 3, 0, 2, 4)
    return p.reshape(GRID_SIZE * GRID_SIZE, 3 * PATCH_SIZE * PATCH_SIZE)


def _split_seed(seed: int, split: str) -> int:
    return 1_000_003 * (int(seed) + 1) + 7919 * _SPLIT_OFFSETS[split]


class StructuredImageDataset(Dataset):
    """The structured dataset as 32x32 RGB images (4x4 patches carry the patch vectors) with labels {0, 1}.

    ``seed`` picks the hidden structure (partition, w*) and, together with ``split``, the samples: all splits of one
    seed share partition and w* and differ only in their samples. Items are ``(PIL.Image, int)`` like timm's image
    datasets, so ``transform`` can be a timm eval transform with ``STRUCTURED_MEAN``/``STRUCTURED_STD``.
    """

    def __init__(
            self,
            split: str = 'train',
            num_samples: Optional[int] = None,
            seed: int = 0,
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            config: Optional[StructuredConfig] = None,
    ):
        info = get_dataset_info('structured')  # the table holds the accepted split names
        if info.split(split) is None:
            raise ValueError(f"expected split in {', '.join(info.splits)}, got {split!r}")
        split = info.split(split)
        config = replace(config or StructuredConfig(), seed=seed)
        if (config.num_patches, config.patch_dim) != (GRID_SIZE * GRID_SIZE, 3 * PATCH_SIZE * PATCH_SIZE):
            raise ValueError(
                f'the image form needs num_patches={GRID_SIZE * GRID_SIZE} and patch_dim={3 * PATCH_SIZE ** 2}, '
                f'got {config.num_patches} and {config.patch_dim}')
        self.split = split
        self.config = config
        self.num_samples = _DEFAULT_NUM_SAMPLES[split] if num_samples is None else int(num_samples)
        self.transform = transform
        self.target_transform = target_transform
        self.partition, self.feature = make_structure(config)
        x, y = sample_structured(config, self.num_samples, _split_seed(seed, split), self.partition, self.feature)
        self.images = encode_patches_to_image(x)
        self.targets = ((y + 1) / 2).long().tolist()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        """timm's datasets name their samples; these have no file, so give a stable synthetic name."""
        return f'structured_{self.split}_{index:06d}'

    def filenames(self, basename: bool = False, absolute: bool = False):
        return [self.filename(i) for i in range(len(self))]
