#!/usr/bin/env python3
"""Evaluate a model on a dataset split and print top-1/top-5.

The model is a train.py checkpoint (its architecture, model kwargs, classes, preprocessing and evaluation data are
read from the checkpoint; its EMA weights when it has them, as the run ranked them), a timm model name
(``--pretrained`` for its weights, ``--checkpoint`` for others), or a ``hf-hub:org/repo`` / ``local-dir:/path``
model whose recorded sha256 is checked. Everything is loaded through `timm_posattn.loading`, and measured by
`timm_posattn.evaluation` (the evaluation publish uses for its model cards). Arguments keep the names of timm's
validate.py.

    python validate.py --checkpoint output/train/EXP/model_best.pth.tar
    python validate.py --model vit_posattn_small_patch4_32 --checkpoint best.pth.tar \
        --dataset torch/cifar10 --data-dir /data/cifar10
    python validate.py --model hf-hub:ORG/REPO --dataset torch/cifar10 --data-dir /data/cifar10
    python validate.py --model local-dir:/path/to/export --dataset structured
    python validate.py --checkpoint RUN/model_best.pth.tar --data-dir /usr/share/datasets/fashion-mnist
"""
import argparse
import json
import logging
import os
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from timm import utils

import timm_posattn  # noqa: F401  registers the vit_posattn_* models with timm
from timm_posattn.cli import (
    ArgumentParser, ParseKwargs, UsageError, device_arg, float_range, int_range, run_command,
)
from timm_posattn.data import DatasetError
from timm_posattn.evaluation import (
    DATA_KEYS, evaluate_dataset, open_eval_dataset, resolve_data, resolve_preprocessing,
)
from timm_posattn.loading import LoadedModel, add_ema_arguments, load_model
from timm_posattn.outputs import OutputFolder

_logger = logging.getLogger('validate')


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
                       help="dataset name as in train.py (default: the checkpoint's, or the dataset a published "
                            "model's tag names; structured without any of them or --data-dir; '' for an image folder)")
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
    group.add_argument('--mean', type=float_range(), nargs='+', default=None, metavar='MEAN',
                       help='dataset mean: 1 value or one per input channel')
    group.add_argument('--std', type=float_range(0, low_open=True), nargs='+', default=None, metavar='STD',
                       help='dataset std (> 0): 1 value or one per input channel')
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


def load_eval_model(args: argparse.Namespace) -> LoadedModel:
    """The model named by --model / --checkpoint, through timm_posattn.loading (sha256 and finiteness checked)."""
    overrides = dict(args.model_kwargs or {})
    if args.num_classes is not None:
        overrides['num_classes'] = args.num_classes
    if args.checkpoint is None and not args.model:
        raise UsageError('give --checkpoint (a train.py checkpoint) or --model (a timm model name, hf-hub:ORG/REPO, '
                         'local-dir:PATH or a checkpoint file)')
    loaded = load_model(args.model or None, checkpoint=args.checkpoint, pretrained=args.pretrained or None,
                        use_ema=args.use_ema, **overrides)
    if not loaded.trained:
        _logger.warning(f'{loaded.weights}: no --checkpoint or --pretrained, the accuracy is that of an untrained '
                        f'model')
    return loaded


def evaluate(args: argparse.Namespace) -> Dict[str, Any]:
    """Top-1/top-5 and loss of the model on the dataset split; refuses non-finite weights and outputs."""
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    loaded = load_eval_model(args)
    model = loaded.model.to(device).eval()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    data = resolve_data(loaded.checkpoint, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                        tag=loaded.model.pretrained_cfg.get('tag') if loaded.published else None,
                        num_samples=args.num_samples, data_seed=args.data_seed)
    data_config = resolve_preprocessing(loaded, data['dataset'], {k: getattr(args, k, None) for k in DATA_KEYS})
    dataset = open_eval_dataset(data['dataset'], data['root'], data['split'], data_config,
                                download=args.dataset_download, num_samples=data['num_samples'],
                                data_seed=data['data_seed'], class_map=args.class_map)
    print(f'Evaluating {loaded.weights}', flush=True)
    results = evaluate_dataset(model, dataset, data_config, batch_size=args.batch_size, workers=args.workers,
                               device=device, amp_dtype=getattr(torch, args.amp_dtype) if args.amp else None,
                               channels_last=args.channels_last)
    return {
        'model': getattr(loaded.checkpoint, 'arch', None) or args.model,
        'checkpoint': loaded.checkpoint.path if loaded.checkpoint is not None else None,
        'weights': loaded.weights, 'dataset': data['dataset'] or 'folder', 'split': data['split'], **results,
    }


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Evaluate and print top-1/top-5 (and write --results-file); returns the results."""
    if not logging.root.handlers:
        utils.setup_default_logging()
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
    return results


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    return run_command(lambda: main(argv), argv, user_errors=(DatasetError,))


if __name__ == '__main__':
    sys.exit(run())
