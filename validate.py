#!/usr/bin/env python3
"""Evaluate a model on a dataset split and print top-1/top-5.

The model is a train.py checkpoint (its architecture, model kwargs, classes, preprocessing and evaluation data are
read from the checkpoint; its EMA weights when it has them, as the run ranked them), a timm model name
(``--pretrained`` for its weights, ``--checkpoint`` for others), or a ``hf-hub:org/repo`` / ``local-dir:/path``
model whose recorded sha256 is checked. Everything is loaded through `timm_posattn.loading`. Arguments keep the
names of timm's validate.py.

    python validate.py --checkpoint output/train/EXP/model_best.pth.tar
    python validate.py --model vit_posattn_small_patch4_32 --checkpoint best.pth.tar \
        --dataset torch/cifar10 --data-dir /data/cifar10
    python validate.py --model hf-hub:ORG/REPO --dataset torch/cifar10 --data-dir /data/cifar10
    python validate.py --model local-dir:/path/to/export --dataset structured
"""
import argparse
import json
import logging
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from timm import utils
from timm.data import create_loader, resolve_data_config

import timm_posattn  # noqa: F401  registers the vit_posattn_* models with timm
from timm_posattn.cli import (
    ArgumentParser, ParseKwargs, UsageError, device_arg, float_range, int_range, run_command,
)
from timm_posattn.data import DatasetError, create_dataset
from timm_posattn.dataset_info import get_dataset_info
from timm_posattn.loading import LoadedModel, TrainCheckpoint, add_ema_arguments, open_model
from timm_posattn.outputs import OutputFolder

_logger = logging.getLogger('validate')

# what resolve_data_config reads: the preprocessing a model was trained with
DATA_KEYS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog='validate.py', description='Evaluate a model on a dataset split (top-1/top-5)')
    group = parser.add_argument_group('Model')
    group.add_argument('--model', '-m', metavar='NAME', default=None,
                       help="timm model name, hf-hub:org/repo, local-dir:/path or a train.py checkpoint "
                            "(default: the --checkpoint's architecture)")
    group.add_argument('--checkpoint', default=None, metavar='PATH',
                       help='train.py checkpoint, timm checkpoint or .safetensors weights to evaluate')
    group.add_argument('--pretrained', action='store_true', default=False,
                       help="evaluate the model name's published weights")
    add_ema_arguments(group)
    group.add_argument('--num-classes', type=int_range(1), default=None, metavar='N',
                       help='number of classes (default: the checkpoint\'s / model\'s)')
    group.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs,
                       help="model kwargs over the checkpoint's, e.g. dynamic_img_size=True")
    group = parser.add_argument_group('Data')
    group.add_argument('--data-dir', metavar='DIR', default=None,
                       help="path to the dataset (default: the checkpoint's)")
    group.add_argument('--dataset', metavar='NAME', default=None,
                       help="dataset name as in train.py (default: the checkpoint's; structured without a "
                            "checkpoint or --data-dir; '' for an image folder)")
    group.add_argument('--split', metavar='NAME', default=None,
                       help="dataset split (default: the checkpoint's --val-split, else validation)")
    group.add_argument('--num-samples', default=None, type=int_range(1), metavar='N',
                       help="samples of the structured (or an iterable) dataset (default: the checkpoint's "
                            "--val-num-samples)")
    group.add_argument('--data-seed', default=None, type=int_range(0), metavar='S',
                       help="seed of the structured dataset (default: the checkpoint's, else 0)")
    group.add_argument('--dataset-download', action='store_true', default=False,
                       help='allow download of torch/ datasets into --data-dir')
    group.add_argument('--class-map', default='', metavar='FILENAME', help='path to class to idx mapping file')
    group = parser.add_argument_group('Preprocessing (default: what the model was trained with)')
    group.add_argument('--img-size', default=None, type=int_range(1), metavar='N', help='input image size')
    group.add_argument('--input-size', default=None, nargs=3, type=int_range(1), metavar='N',
                       help='input dims (c h w)')
    group.add_argument('--crop-pct', default=None, type=float_range(0, 1, low_open=True), metavar='PCT',
                       help='center crop fraction, in (0, 1]')
    group.add_argument('--mean', type=float_range(), nargs=3, default=None, metavar='MEAN', help='dataset mean')
    group.add_argument('--std', type=float_range(0, low_open=True), nargs=3, default=None, metavar='STD',
                       help='dataset std (> 0)')
    group.add_argument('--interpolation', default=None, metavar='NAME',
                       choices=('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos'),
                       help='resize interpolation')
    group = parser.add_argument_group('Run')
    group.add_argument('-b', '--batch-size', default=256, type=int_range(1), metavar='N',
                       help='mini-batch size (default: 256)')
    group.add_argument('-j', '--workers', default=2, type=int_range(0), metavar='N',
                       help='data loading workers (default: 2)')
    group.add_argument('--device', type=device_arg, default=None,
                       help='device (default: cuda if available, else cpu)')
    group.add_argument('--amp', action='store_true', default=False, help='use AMP mixed precision')
    group.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'), help='AMP dtype')
    group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
    group.add_argument('--results-file', default=None, metavar='FILENAME', help='write the results as JSON here')
    group.add_argument('--overwrite', action='store_true', default=False,
                       help='replace an existing --results-file')
    return parser


class NonFiniteOutputError(UsageError):
    """The model produced NaN or inf logits: the accuracy would be meaningless."""


def load_eval_model(args: argparse.Namespace) -> LoadedModel:
    """The model named by --model / --checkpoint, through timm_posattn.loading (sha256 and finiteness checked)."""
    overrides = dict(args.model_kwargs or {})
    if args.num_classes is not None:
        overrides['num_classes'] = args.num_classes
    if args.checkpoint is None and not args.model:
        raise UsageError('give --checkpoint (a train.py checkpoint) or --model (a timm model name, hf-hub:ORG/REPO, '
                         'local-dir:PATH or a checkpoint file)')
    loaded = open_model(args.model or None, checkpoint=args.checkpoint, pretrained=args.pretrained or None,
                        use_ema=args.use_ema, **overrides)
    if not loaded.trained:
        _logger.warning(f'{loaded.weights}: no --checkpoint or --pretrained, the accuracy is that of an untrained '
                        f'model')
    return loaded


def resolve_data(args: argparse.Namespace, ckpt: Optional[TrainCheckpoint]) -> Dict[str, Any]:
    """Dataset, location, split, samples and seed: given values, else the checkpoint's evaluation set."""
    saved = ckpt.args if ckpt is not None else {}
    if args.dataset is not None:
        dataset = args.dataset
    elif 'dataset' in saved:
        dataset = saved['dataset'] or ''
    else:
        dataset = '' if args.data_dir else 'structured'
    same_data = ckpt is not None and (saved.get('dataset') or '') == dataset
    split = args.split if args.split is not None else (saved.get('val_split') if same_data else None) or 'validation'
    same_split = same_data and split == (saved.get('val_split') or 'validation')
    num_samples = args.num_samples
    if num_samples is None and same_split:
        num_samples = saved.get('val_num_samples')
    data_seed = args.data_seed if args.data_seed is not None else ((saved.get('data_seed') or 0) if same_data else 0)
    data_dir = args.data_dir if args.data_dir is not None else (saved.get('data_dir') if same_data else None)
    return dict(dataset=dataset, root=data_dir, split=split, num_samples=num_samples, data_seed=data_seed)


def resolve_preprocessing(args: argparse.Namespace, loaded: LoadedModel, dataset: str) -> Dict[str, Any]:
    """timm's data config: given values over the model's training preprocessing.

    A train.py checkpoint records what its run used; a published folder / tag carries it in its pretrained cfg; a
    freshly initialized model takes the dataset's own normalization from the table in `timm_posattn.dataset_info`.
    """
    settings: Dict[str, Any] = {}
    if loaded.checkpoint is not None:
        settings.update({k: loaded.checkpoint.args.get(k) for k in DATA_KEYS})
    elif not loaded.published:
        info = get_dataset_info(dataset)
        if info is not None:
            settings.update(mean=info.mean, std=info.std, crop_pct=info.crop_pct, interpolation=info.interpolation)
    settings.update({k: getattr(args, k) for k in DATA_KEYS if getattr(args, k, None) is not None})
    settings = {k: v for k, v in settings.items() if v not in (None, '')}
    data_config = resolve_data_config(settings, model=loaded.model)
    _check_input_size(loaded.model, data_config['input_size'])
    return data_config


def _check_input_size(model: nn.Module, input_size: Sequence[int]) -> None:
    """A fixed-size model refuses other inputs in its forward (an assertion): say so before any work."""
    patch_embed = getattr(model, 'patch_embed', None)
    img_size = getattr(patch_embed, 'img_size', None)
    if getattr(patch_embed, 'strict_img_size', False) and img_size and tuple(img_size) != tuple(input_size[1:]):
        raise UsageError(f'the model takes {img_size[0]}x{img_size[1]} inputs, not {input_size[1]}x{input_size[2]} '
                         f'(--img-size / --input-size): evaluate at its size, or pass --model-kwargs '
                         f'dynamic_img_size=True')


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    """Top-1/top-5 and loss of the model on the dataset split; refuses non-finite weights and outputs."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    loaded = load_eval_model(args)
    model = loaded.model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data = resolve_data(args, loaded.checkpoint)
    data_config = resolve_preprocessing(args, loaded, data['dataset'])
    dataset = create_dataset(data['dataset'], root=data['root'], split=data['split'],
                             download=args.dataset_download, num_samples=data['num_samples'],
                             data_seed=data['data_seed'], class_map=args.class_map)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=args.workers,
        use_prefetcher=True, device=device)

    amp_autocast = torch.autocast(device_type=device.type, dtype=getattr(torch, args.amp_dtype), enabled=args.amp)
    loss_fn = nn.CrossEntropyLoss()
    losses_m, top1_m, top5_m = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    seen = 0
    print(f'Evaluating {loaded.weights}', flush=True)
    start = time.time()
    with torch.inference_mode(), amp_autocast:
        for batch_idx, (input, target) in enumerate(loader):
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            output = model(input)
            if not torch.isfinite(output).all():
                raise NonFiniteOutputError(
                    f'batch {batch_idx} (images {seen}-{seen + input.shape[0] - 1}) gave non-finite outputs (NaN '
                    f'or inf){" under --amp " + args.amp_dtype if args.amp else ""}: the accuracy would be '
                    f'meaningless')
            num_classes = output.shape[-1]
            if int(target.max()) >= num_classes:
                raise UsageError(f'the dataset has label {int(target.max())} but the model has {num_classes} '
                                 f'classes: evaluate it on the data it was trained for, or pass --num-classes')
            acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, num_classes)))
            losses_m.update(loss_fn(output.float(), target).item(), input.shape[0])
            top1_m.update(acc1.item(), input.shape[0])
            top5_m.update(acc5.item(), input.shape[0])
            seen += input.shape[0]
    return {
        'model': getattr(loaded.checkpoint, 'arch', None) or args.model,
        'checkpoint': loaded.checkpoint.path if loaded.checkpoint is not None else None,
        'weights': loaded.weights, 'dataset': data['dataset'] or 'folder', 'split': data['split'],
        'num_samples': top1_m.count, 'top1': round(top1_m.avg, 4), 'top5': round(top5_m.avg, 4),
        'loss': round(losses_m.avg, 6), 'seconds': round(time.time() - start, 2),
    }


def _validate(argv: Sequence[str]) -> None:
    args = _parser().parse_args(argv)
    results_file = None
    if args.results_file is not None:  # refused before any work, not after it
        results_file = OutputFolder(os.path.dirname(os.path.abspath(args.results_file)),
                                    [os.path.basename(args.results_file)], overwrite=args.overwrite,
                                    command='validate.py').check()
    results = evaluate(args)
    print(f"Top-1: {results['top1']:.2f}%  Top-5: {results['top5']:.2f}%  "
          f"({results['model']} on {results['dataset']}/{results['split']}, {results['num_samples']} images)")
    if results_file is not None:
        results_file.write_text(os.path.basename(args.results_file), json.dumps(results, indent=2) + '\n')


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not logging.root.handlers:
        utils.setup_default_logging()
    try:
        return run_command(lambda: _validate(argv), argv, user_errors=(DatasetError,))
    except SystemExit as e:  # argparse: --help, or a bad option (already printed as one line)
        return e.code if isinstance(e.code, int) else 2


if __name__ == '__main__':
    sys.exit(main())
