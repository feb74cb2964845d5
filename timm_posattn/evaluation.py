"""The one evaluation: top-1/top-5 and loss of a model on a dataset split, as validate.py and publish measure them.

validate.py evaluates whatever it is pointed at; publish evaluates the folder it has just written and verified, so
that the model card reports the accuracy of exactly the published weights. Both go through this module: the
preprocessing a model was trained with (`resolve_preprocessing`: a train.py checkpoint's recorded values, a
published folder's pretrained cfg, or the dataset's own normalization for a fresh model), the dataset opened in the
model's channel count (`open_eval_dataset`), and timm's eval loader and metrics (`evaluate_dataset`).
"""
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from timm import utils
from timm.data import create_loader, resolve_data_config
from torch.utils.data import Dataset

from .cli import UsageError
from .data import create_dataset
from .dataset_info import get_dataset_info
from .loading import PREPROCESSING_ARGS, LoadedModel, TrainCheckpoint

__all__ = [
    'DATA_KEYS', 'NonFiniteOutputError', 'model_input_channels', 'resolve_data', 'resolve_preprocessing',
    'check_input_size', 'image_mode', 'open_eval_dataset', 'create_eval_loader', 'evaluate_dataset', 'split_name',
]

# what resolve_data_config reads: the preprocessing a model was trained with
DATA_KEYS = PREPROCESSING_ARGS  # what validate.py takes on its command line


class NonFiniteOutputError(UsageError):
    """The model produced NaN or inf logits: the accuracy would be meaningless."""


def model_input_channels(model: nn.Module) -> int:
    """The channels the model's first layer takes (timm's ``first_conv``), else its cfg's input size."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    first_conv = cfg.get('first_conv')
    if isinstance(first_conv, str):
        try:
            return int(model.get_submodule(first_conv).in_channels)
        except AttributeError:
            pass
    return int((cfg.get('input_size') or (3,))[0])


def resolve_data(ckpt: Optional[TrainCheckpoint], dataset: Optional[str] = None, data_dir: Optional[str] = None,
                 split: Optional[str] = None, num_samples: Optional[int] = None, data_seed: Optional[int] = None,
                 tag: Optional[str] = None) -> Dict[str, Any]:
    """Dataset, location, split, samples and seed to evaluate on: given values, else the checkpoint's evaluation set
    (its --dataset, --data-dir, --val-split, --val-num-samples and --data-seed), else the dataset a published
    model's tag names (``tag``: e.g. 'fashion_mnist' -> torch/fashion_mnist); ``structured`` without any."""
    saved = ckpt.args if ckpt is not None else {}
    tagged = get_dataset_info(tag) if tag and ckpt is None else None
    if dataset is None and tagged is not None and (tagged.synthetic or tagged.dataset_name.startswith('torch/')):
        dataset = tagged.dataset_name
    if dataset is None:
        dataset = (saved.get('dataset') or '') if 'dataset' in saved else ('' if data_dir else 'structured')
    same_data = ckpt is not None and (saved.get('dataset') or '') == dataset
    split = split if split is not None else (saved.get('val_split') if same_data else None) or 'validation'
    same_split = same_data and split == (saved.get('val_split') or 'validation')
    if num_samples is None and same_split:
        num_samples = saved.get('val_num_samples')
    data_seed = data_seed if data_seed is not None else ((saved.get('data_seed') or 0) if same_data else 0)
    data_dir = data_dir if data_dir is not None else (saved.get('data_dir') if same_data else None)
    return dict(dataset=dataset, root=data_dir, split=split, num_samples=num_samples, data_seed=data_seed)


def _check_channels(what: str, values: Optional[Sequence[float]], channels: int, origin: str) -> None:
    if values is not None and len(values) not in (1, channels):
        raise UsageError(f'{what} has {len(values)} values ({origin}) but the model takes {channels} input '
                         f'channel(s): give --mean and --std with 1 value or one per channel')


def resolve_preprocessing(loaded: LoadedModel, dataset: Optional[str], overrides: Mapping[str, Any]
                          ) -> Dict[str, Any]:
    """timm's data config: given values (`overrides`, keys of `DATA_KEYS`) over the model's training preprocessing.

    A train.py checkpoint records what its run used; a published folder / tag carries it in its pretrained cfg; a
    freshly initialized model takes the dataset's own normalization from the table in `timm_posattn.dataset_info`.
    The input size has the model's channel count, and a mean/std that cannot be one per channel is refused (one
    line) instead of failing inside the loader.
    """
    recorded: Dict[str, Any] = {}
    origin = ''
    if loaded.checkpoint is not None:
        recorded.update({k: loaded.checkpoint.args.get(k) for k in DATA_KEYS})
        origin = f"recorded in {loaded.checkpoint.path}"
    elif not loaded.published:
        info = get_dataset_info(dataset)
        if info is not None:
            recorded.update(mean=info.mean, std=info.std, crop_pct=info.crop_pct, interpolation=info.interpolation)
            origin = f"the normalization of {info.title}"
    given = {k: v for k, v in overrides.items() if k in DATA_KEYS and v is not None}
    settings = {k: v for k, v in {**recorded, **given}.items() if v not in (None, '')}
    channels = model_input_channels(loaded.model)
    if settings.get('input_size') and settings['input_size'][0] != channels:
        raise UsageError(f"the model takes {channels}-channel inputs, not {settings['input_size'][0]} "
                         f"(--input-size {' '.join(map(str, settings['input_size']))})")
    settings['in_chans'] = channels
    for key in ('mean', 'std'):
        _check_channels(key, settings.get(key), channels, 'given' if key in given else origin)
    data_config = resolve_data_config(settings, model=loaded.model)
    for key in ('mean', 'std'):  # from the model's cfg when neither the run nor the user gave them
        if key not in settings:
            _check_channels(key, data_config[key], channels, "the model's pretrained cfg")
    data_config['mean'], data_config['std'] = (
        tuple(v) * (channels if len(v) == 1 else 1) for v in (data_config['mean'], data_config['std']))
    data_config['input_size'] = (channels, *data_config['input_size'][1:])
    check_input_size(loaded.model, data_config['input_size'])
    return data_config


def check_input_size(model: nn.Module, input_size: Sequence[int]) -> None:
    """A fixed-size model refuses other inputs in its forward (an assertion): say so before any work."""
    patch_embed = getattr(model, 'patch_embed', None)
    img_size = getattr(patch_embed, 'img_size', None)
    if getattr(patch_embed, 'strict_img_size', False) and img_size and tuple(img_size) != tuple(input_size[1:]):
        raise UsageError(f'the model takes {img_size[0]}x{img_size[1]} inputs, not {input_size[1]}x{input_size[2]} '
                         f'(--img-size / --input-size): evaluate at its size, or pass --model-kwargs '
                         f'dynamic_img_size=True')


def image_mode(data_config: Mapping[str, Any]) -> str:
    """The PIL mode a dataset must give for these inputs: grey for 1 channel, RGB otherwise (train.py's rule)."""
    return 'L' if data_config['input_size'][0] == 1 else 'RGB'


def open_eval_dataset(name: str, root: Optional[str], split: str, data_config: Mapping[str, Any],
                      **kwargs: Any) -> Dataset:
    """`data.create_dataset` for evaluation, its images in the model's channel count (grey data repeated in three
    channels for an RGB model); raises `DatasetError` (one line) when it cannot be opened."""
    return create_dataset(name, root=root, split=split, is_training=False, input_img_mode=image_mode(data_config),
                          **kwargs)


def split_name(dataset: Optional[str], split: str = 'validation') -> str:
    """The split a loader reads for an accepted name: 'test' for 'validation' on a dataset without a validation
    split (the table's aliases); the name itself for other datasets."""
    info = get_dataset_info(dataset)
    return (info.split(split) if info is not None else None) or split


def create_eval_loader(dataset: Dataset, data_config: Mapping[str, Any], batch_size: int = 256, workers: int = 2,
                       device: Optional[torch.device] = None) -> Any:
    """timm's eval loader: resize, centre crop and normalization of ``data_config``, batches on ``device``."""
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=workers,
        use_prefetcher=True, device=device or torch.device('cpu'))


def evaluate_dataset(
        model: nn.Module,
        dataset: Dataset,
        data_config: Mapping[str, Any],
        batch_size: int = 256,
        workers: int = 2,
        device: Optional[torch.device] = None,
        amp_dtype: Optional[torch.dtype] = None,
        channels_last: bool = False,
) -> Dict[str, Any]:
    """Top-1/top-5 (%), mean loss and image count of ``model`` (eval mode, on ``device``) on ``dataset``, through
    timm's eval loader (resize, centre crop, normalization of ``data_config``) and `timm.utils.accuracy`.

    Refuses non-finite outputs (`NonFiniteOutputError`) and labels the model has no class for (`UsageError`).
    """
    device = device or next(model.parameters()).device
    loader = create_eval_loader(dataset, data_config, batch_size=batch_size, workers=workers, device=device)
    amp_autocast = torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float16,
                                  enabled=amp_dtype is not None)
    loss_fn = nn.CrossEntropyLoss()
    losses_m, top1_m, top5_m = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    seen = 0
    start = time.time()
    model.eval()
    with torch.inference_mode(), amp_autocast:
        for batch_idx, (input, target) in enumerate(loader):
            if channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            output = model(input)
            if not torch.isfinite(output).all():
                raise NonFiniteOutputError(
                    f'batch {batch_idx} (images {seen}-{seen + input.shape[0] - 1}) gave non-finite outputs (NaN '
                    f'or inf){" under AMP " + str(amp_dtype).replace("torch.", "") if amp_dtype else ""}: the '
                    f'accuracy would be meaningless')
            num_classes = output.shape[-1]
            if int(target.max()) >= num_classes:
                raise UsageError(f'the dataset has label {int(target.max())} but the model has {num_classes} '
                                 f'classes: evaluate it on the data it was trained for, or pass --num-classes')
            acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, num_classes)))
            losses_m.update(loss_fn(output.float(), target).item(), input.shape[0])
            top1_m.update(acc1.item(), input.shape[0])
            top5_m.update(acc5.item(), input.shape[0])
            seen += input.shape[0]
    if not seen:
        raise UsageError('the dataset split has no images: nothing to evaluate')
    return {'num_samples': top1_m.count, 'top1': round(top1_m.avg, 4), 'top5': round(top5_m.avg, 4),
            'loss': round(losses_m.avg, 6), 'seconds': round(time.time() - start, 2)}
