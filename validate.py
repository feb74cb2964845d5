#!/usr/bin/env python3
"""Evaluate a model on a dataset split and print top-1/top-5.

The model is a train.py checkpoint (its architecture, classes and model kwargs are read from the checkpoint), a
timm model name (``--pretrained`` for its weights), or a ``hf-hub:org/repo`` / ``local-dir:/path`` model. Arguments
keep the names of timm's validate.py.

    python validate.py --checkpoint output/train/EXP/model_best.pth.tar
    python validate.py --model vit_posattn_small_patch4_32 --checkpoint best.pth.tar \
        --dataset torch/cifar10 --data-dir /data/cifar10
    python validate.py --model hf-hub:ORG/REPO --pretrained --dataset torch/cifar10 --data-dir /data/cifar10
    python validate.py --model local-dir:/path/to/export --pretrained --dataset torch/cifar10 --data-dir /data/cifar10
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
from timm.models import create_model, load_checkpoint

import timm_posattn  # noqa: F401  registers the vit_posattn_* models with timm
from timm_posattn.data import DatasetError, create_dataset, is_structured
from timm_posattn.structured import STRUCTURED_MEAN, STRUCTURED_STD

_logger = logging.getLogger('validate')

parser = argparse.ArgumentParser(description='Evaluate a model on a dataset split (top-1/top-5)')
parser.add_argument('--data-dir', metavar='DIR', default=None, help='path to dataset (root dir)')
parser.add_argument('--dataset', metavar='NAME', default='',
                    help='dataset name as in train.py (default: the checkpoint\'s, else structured without --data-dir)')
parser.add_argument('--split', metavar='NAME', default='validation', help='dataset split (default: validation)')
parser.add_argument('--num-samples', default=None, type=int, metavar='N',
                    help='samples of the structured (or an iterable) dataset')
parser.add_argument('--data-seed', default=None, type=int, metavar='S',
                    help='seed of the structured dataset (default: the checkpoint\'s, else 0)')
parser.add_argument('--dataset-download', action='store_true', default=False,
                    help='allow download of torch/ datasets into --data-dir')
parser.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='path to class to idx mapping file')
parser.add_argument('--model', '-m', metavar='NAME', default='',
                    help='timm model name, hf-hub:org/repo or local-dir:/path (default: the checkpoint\'s arch)')
parser.add_argument('--pretrained', action='store_true', default=False, help='use the model\'s pretrained weights')
parser.add_argument('--checkpoint', default='', type=str, metavar='PATH', help='checkpoint to evaluate')
parser.add_argument('--use-ema', action='store_true', default=False, help='use the checkpoint\'s EMA weights')
parser.add_argument('--num-classes', type=int, default=None, help='number of classes (default: checkpoint/model)')
parser.add_argument('--model-kwargs', nargs='*', default=None, action=utils.ParseKwargs,
                    help='model kwargs, e.g. pos_attn_layers=none (default: the checkpoint\'s)')
parser.add_argument('--img-size', default=None, type=int, metavar='N', help='input image size')
parser.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N', help='input dims (d h w)')
parser.add_argument('--crop-pct', default=None, type=float, metavar='N', help='input image center crop pct')
parser.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override dataset mean')
parser.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override dataset std')
parser.add_argument('--interpolation', default='', type=str, metavar='NAME', help='image resize interpolation type')
parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N', help='mini-batch size (default: 256)')
parser.add_argument('-j', '--workers', default=2, type=int, metavar='N', help='data loading workers (default: 2)')
parser.add_argument('--device', default=None, type=str, help='device (default: cuda if available, else cpu)')
parser.add_argument('--amp', action='store_true', default=False, help='use AMP mixed precision')
parser.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'), help='AMP dtype')
parser.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
parser.add_argument('--results-file', default='', type=str, metavar='FILENAME', help='write results as JSON here')


def checkpoint_args(path: str) -> Dict[str, Any]:
    """The training arguments stored in a train.py checkpoint (empty for plain state dicts)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    saved = checkpoint.get('args', {}) if isinstance(checkpoint, dict) else {}
    return vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved)


def resolve_args(args: argparse.Namespace) -> None:
    """Fill what the command line leaves out from the checkpoint's training arguments."""
    saved = {}
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f"checkpoint '{args.checkpoint}' not found")
        saved = checkpoint_args(args.checkpoint)
    if not args.model:
        if not saved.get('model'):
            raise ValueError('give --model (a timm model name, hf-hub:... or local-dir:...) or a train.py --checkpoint')
        args.model = saved['model']
    same_arch = saved.get('model') == args.model
    if args.model_kwargs is None:
        args.model_kwargs = saved.get('model_kwargs', {}) if same_arch else {}
    if args.num_classes is None and same_arch:
        args.num_classes = saved.get('num_classes')
    if not args.dataset and not args.data_dir:
        args.dataset = saved.get('dataset') or 'structured'
        args.data_dir = saved.get('data_dir')
    if args.data_seed is None:
        args.data_seed = saved.get('data_seed', 0)
    if is_structured(args.dataset):
        args.mean = args.mean or list(STRUCTURED_MEAN)
        args.std = args.std or list(STRUCTURED_STD)
        args.crop_pct = args.crop_pct or 1.0
    for key in ('mean', 'std', 'crop_pct', 'img_size', 'input_size'):
        if getattr(args, key) is None and same_arch and saved.get(key) is not None:
            setattr(args, key, saved[key])
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    """Top-1/top-5 and loss of ``args.model`` on ``args.dataset``/``args.split``."""
    resolve_args(args)
    device = torch.device(args.device)
    model_args = dict(pretrained=args.pretrained, num_classes=args.num_classes)
    model = create_model(args.model, **{k: v for k, v in model_args.items() if v is not None}, **args.model_kwargs)
    if args.checkpoint:
        load_weights(model, args.checkpoint, use_ema=args.use_ema)
    model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model)

    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, download=args.dataset_download,
                             num_samples=args.num_samples, data_seed=args.data_seed, class_map=args.class_map)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], num_workers=args.workers, use_prefetcher=True, device=device)

    amp_autocast = torch.autocast(device_type=device.type, dtype=getattr(torch, args.amp_dtype)) if args.amp \
        else torch.autocast(device_type=device.type, enabled=False)
    loss_fn = nn.CrossEntropyLoss()
    losses_m, top1_m, top5_m = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    num_classes = getattr(model, 'num_classes', 5)
    start = time.time()
    with torch.inference_mode(), amp_autocast:
        for input, target in loader:
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            output = model(input)
            if target.max() >= output.shape[-1]:
                raise ValueError(f'dataset has label {int(target.max())} but the model has {output.shape[-1]} classes: '
                                 f'set --num-classes')
            acc1, acc5 = utils.accuracy(output, target, topk=(1, min(5, num_classes)))
            losses_m.update(loss_fn(output.float(), target).item(), input.shape[0])
            top1_m.update(acc1.item(), input.shape[0])
            top5_m.update(acc5.item(), input.shape[0])
    return {
        'model': args.model, 'checkpoint': args.checkpoint or None, 'dataset': args.dataset or 'folder',
        'split': args.split, 'num_samples': top1_m.count, 'top1': round(top1_m.avg, 4),
        'top5': round(top5_m.avg, 4), 'loss': round(losses_m.avg, 6), 'seconds': round(time.time() - start, 2),
    }


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> None:
    """Load ``state_dict`` (or ``state_dict_ema`` with --use-ema) with weights_only=True via timm's loader."""
    load_checkpoint(model, path, use_ema=use_ema)


def main(argv: Optional[Sequence[str]] = None) -> int:
    utils.setup_default_logging()
    args = parser.parse_args(argv)
    try:
        results = evaluate(args)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except RuntimeError as e:
        if 'Unknown model' in str(e) or 'Error(s) in loading state_dict' in str(e):
            print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
            return 2
        raise
    print(f"Top-1: {results['top1']:.2f}%  Top-5: {results['top5']:.2f}%  "
          f"({results['model']} on {results['dataset']}/{results['split']}, {results['num_samples']} images)")
    if args.results_file:
        tmp = args.results_file + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.results_file)
    return 0


if __name__ == '__main__':
    sys.exit(main())
