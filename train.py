#!/usr/bin/env python3
"""Train positional-attention ViTs (or any timm model) with timm's training components.

A focused version of timm's train.py: the same argument names and meanings, built from timm.data, timm.optim,
timm.scheduler, timm.loss and timm.utils, plus what this package needs: the built-in ``structured`` dataset and
SVHN, checkpoints in the `timm_posattn.loading` format (atomic, loadable with ``torch.load(weights_only=True)``), an
experiment folder that is never mixed with another run's files (`timm_posattn.outputs`), a stop on non-finite loss,
and the positional attention plot and patch-association score at the end. A bad option, config, dataset or
checkpoint is one line on stderr and exit code 2 (`timm_posattn.cli`; ``--debug`` shows the traceback).

With no arguments it trains ``vit_posattn_tiny_patch4_32`` on ``structured`` in a few CPU minutes:

    python train.py
    python train.py -c configs/cifar10_posattn.yaml --data-dir /data/cifar10
    torchrun --nproc_per_node=8 train.py -c configs/imagenet_posattn.yaml --data-dir /data/imagenet
"""
import argparse
import importlib
import logging
import math
import os
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from functools import partial
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import yaml

import timm
from timm import utils
from timm.data import create_loader, resolve_data_config, Mixup, FastCollateMixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, BinaryCrossEntropy
from timm.models import parse_model_name, split_model_name_tag
from timm.optim import create_optimizer_v2, get_optimizer_info, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.task import (
    ClassificationTask, DistillationTeacher, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask,
    TrainingTask,
)

import timm_posattn  # noqa: F401  registers the vit_posattn_* models with timm
from timm_posattn.cli import (
    ArgumentParser, ParseKwargs, UsageError, device_arg, float_range, int_range, one_line, run_command,
)
from timm_posattn.data import create_dataset, is_structured
from timm_posattn.dataset_info import get_dataset_info
from timm_posattn.loading import (
    LoadedModel, ModelKwargsError, TrainCheckpoint, load_model, load_weights, parse_source, plain_args,
    read_checkpoint, require_registered, same_kwarg_value, set_preprocessing,
)
from timm_posattn.recipes import read_recipe
from timm_posattn.run_folder import (
    DEFAULT_OUTPUT, AtomicCheckpointSaver, Progress, RunFolder, check_resume_model, check_resume_options,
    check_resume_ranking, discard_abandoned_run, read_resume_checkpoint, reconcile_best, resolve_run_folder,
    restore_training_state, saved_epoch,
)

_logger = logging.getLogger('train')

DEFAULT_MODEL = 'vit_posattn_tiny_patch4_32'
LR_MAX = float(torch.finfo(torch.float32).max)  # optimizers keep the learning rate as a float32 tensor or scalar
# the structured demo run (no --model, structured data): see resolve_defaults
STRUCTURED_DEMO_MODEL_KWARGS = {'depth': 1, 'global_pool': 'avg', 'pos_attn_layer': 'tied'}
STRUCTURED_DEMO_EPOCHS = 30
STRUCTURED_DEMO_LR_BASE = 3e-3
INTERPOLATIONS = ('bicubic', 'bilinear', 'box', 'hamming', 'lanczos', 'nearest')  # timm.data.transforms' names
SCHEDULERS = ('cosine', 'tanh', 'step', 'constant', 'multistep', 'plateau', 'poly', 'wsd', 'rsqrt', 'none')
# knowledge distillation through timm.task: --kd-distill-type -> task; the defaults are timm's train.py's
KD_TASKS = {'logit': LogitDistillationTask, 'feature': FeatureDistillationTask, 'token': TokenDistillationTask}
KD_TEMPERATURE = 4.0
KD_OPTIONS = ('kd_distill_type', 'kd_token_distill_type', 'distill_loss_weight', 'task_loss_weight', 'kd_temperature')
# the loss parts a task returns besides 'loss', as summary.csv names them (TokenDistillationTask says 'distill_loss')
LOSS_PARTS = {'task_loss': 'task_loss', 'kd_loss': 'kd_loss', 'distill_loss': 'kd_loss'}


# The first parser reads only --config; the YAML's keys become defaults of the main parser (as in timm's train.py).
config_parser = ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML file whose keys are train.py arguments (dashes as underscores)')

parser = ArgumentParser(description='Train positional-attention ViTs with timm')
parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                    help='YAML file whose keys are train.py arguments (dashes as underscores); its values are '
                         'checked like the command line\'s, which overrides them')

group = parser.add_argument_group('Dataset parameters')
group.add_argument('--data-dir', metavar='DIR', default=None, help='path to dataset (root dir)')
group.add_argument('--dataset', metavar='NAME', default='',
                   help='"structured", "torch/cifar10", "torch/cifar100", "torch/svhn", "hfds/<name>", "wds/<name>", '
                        'or empty for an image folder/tar (default: structured when --data-dir is not given either)')
group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
group.add_argument('--val-split', metavar='NAME', default='validation',
                   help='dataset validation split, empty to skip evaluation (default: validation)')
group.add_argument('--train-num-samples', default=None, type=int_range(1), metavar='N',
                   help='samples in the train split: size of the structured dataset, or of iterable datasets')
group.add_argument('--val-num-samples', default=None, type=int_range(1), metavar='N',
                   help='samples in the validation split (structured or iterable datasets; --val-split "" skips '
                        'evaluation)')
group.add_argument('--data-seed', default=0, type=int_range(0), metavar='S',
                   help='seed that generates the structured dataset (its hidden partition) (default: 0)')
group.add_argument('--dataset-download', action='store_true', default=False,
                   help='allow download of torch/ datasets (CIFAR, SVHN) into --data-dir')
group.add_argument('--class-map', default='', type=str, metavar='FILENAME',
                   help='path to class to idx mapping file (default: "")')
group.add_argument('--input-img-mode', default=None, type=str, help='dataset image conversion mode for input images')
group.add_argument('--input-key', default=None, type=str, help='dataset key for input images (hfds/wds)')
group.add_argument('--target-key', default=None, type=str, help='dataset key for target labels (hfds/wds)')

group = parser.add_argument_group('Model parameters')
group.add_argument('--model', default=DEFAULT_MODEL, type=str, metavar='MODEL',
                   help=f'name of model to train (default: "{DEFAULT_MODEL}")')
group.add_argument('--pretrained', action='store_true', default=False,
                   help='start with pretrained version of specified network (if avail)')
group.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='start from these weights (a train.py/timm checkpoint or weights file; another resolution '
                        'or a standard ViT is adapted, logged)')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='continue a run from its checkpoint (model, optimizer, schedule, EMA, AMP scaler) in the '
                        'checkpoint\'s folder; --experiment/--output naming a new folder forks the run there')
group.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='prevent resume of optimizer state when resuming model')
group.add_argument('--num-classes', type=int_range(1), default=None, metavar='N',
                   help='number of label classes (default: the dataset\'s, else the model\'s)')
group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (model default if None)')
group.add_argument('--img-size', type=int_range(1), default=None, metavar='N',
                   help='image size of the data and the model (default: model default)')
group.add_argument('--in-chans', type=int_range(1), default=None, metavar='N', help='image input channels (default: 3)')
group.add_argument('--input-size', default=None, nargs=3, type=int_range(1), metavar='N',
                   help='input all image dimensions (d h w, e.g. --input-size 3 32 32), uses model default if empty')
group.add_argument('--crop-pct', default=None, type=float_range(0, 1, low_open=True), metavar='N',
                   help='input image center crop percent (for validation only; 1.0 for structured)')
group.add_argument('--mean', type=float_range(0, 1), nargs='+', default=None, metavar='MEAN',
                   help='override dataset mean')
group.add_argument('--std', type=float_range(0, low_open=True), nargs='+', default=None, metavar='STD',
                   help='override dataset std')
group.add_argument('--interpolation', default='', type=str, choices=('',) + INTERPOLATIONS, metavar='NAME',
                   help=f'image resize interpolation type (overrides model): {", ".join(INTERPOLATIONS)}')
group.add_argument('-b', '--batch-size', type=int_range(1), default=64, metavar='N',
                   help='input batch size per process (default: 64)')
group.add_argument('-vb', '--validation-batch-size', type=int_range(1), default=None, metavar='N',
                   help='validation batch size override (default: None)')
group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
group.add_argument('--grad-accum-steps', type=int_range(1), default=1, metavar='N',
                   help='the number of steps to accumulate gradients (default: 1)')
group.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help='enable gradient checkpointing through model blocks')
group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                   help='extra model kwargs, e.g. --model-kwargs pos_attn_blocks=none depth=2')
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='enable torch.compile with the given backend (default: inductor)')

group = parser.add_argument_group('Device parameters')
group.add_argument('--device', default=None, type=device_arg,
                   help='device to use (default: cuda if available, else cpu)')
group.add_argument('--amp', action='store_true', default=False, help='use AMP for mixed precision training')
group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                   help='lower precision AMP dtype (default: float16)')
group.add_argument('--no-ddp-bb', action='store_true', default=False,
                   help='force broadcast buffers for native DDP to off')
group.add_argument('--local_rank', '--local-rank', default=0, type=int_range(0), help=argparse.SUPPRESS)
group.add_argument('--device-modules', default=None, type=str, nargs='+',
                   help='python imports for device backend modules (or model registries)')

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER',
                   help='optimizer, a name of timm.optim.list_optimizers() (default: "adamw")')
group.add_argument('--opt-eps', default=None, type=float_range(0, low_open=True), metavar='EPSILON',
                   help='optimizer epsilon')
group.add_argument('--opt-betas', default=None, type=float_range(0, 1, high_open=True), nargs='+', metavar='BETA',
                   help='optimizer betas')
group.add_argument('--momentum', type=float_range(0, 1, high_open=True), default=0.9, metavar='M',
                   help='optimizer momentum (default: 0.9)')
group.add_argument('--weight-decay', type=float_range(0), default=0.05, help='weight decay (default: 0.05)')
group.add_argument('--clip-grad', type=float_range(0, low_open=True), default=None, metavar='NORM',
                   help='clip gradient norm (default: None, no clipping)')
group.add_argument('--clip-mode', type=str, default='norm', choices=('norm', 'value', 'agc'),
                   help='gradient clipping mode: "norm", "value" or "agc"')
group.add_argument('--layer-decay', type=float_range(0, low_open=True), default=None,
                   help='layer-wise learning rate decay (default: None)')
group.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)

group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', choices=SCHEDULERS, metavar='SCHEDULER',
                   help=f'LR scheduler: {", ".join(SCHEDULERS)} (default: "cosine")')
group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=True,
                   help='step the LR schedule every update, so short runs warm up and decay smoothly '
                        '(default: on; --no-sched-on-updates steps at epoch ends as timm does)')
group.add_argument('--lr', type=float_range(0, LR_MAX, low_open=True), default=None, metavar='LR',
                   help='learning rate, used as given (default: derived from --lr-base)')
group.add_argument('--lr-base', type=float_range(0, LR_MAX, low_open=True), default=None, metavar='LR',
                   help='base learning rate when --lr is not given: lr = lr_base * global_batch_size / lr_base_size '
                        '(default: 3e-3 for the structured demo model, else 1e-3)')
group.add_argument('--lr-base-size', type=int_range(1), default=64, metavar='DIV',
                   help='base learning rate batch size (divisor, default: 64)')
group.add_argument('--lr-base-scale', type=str, default='', choices=('', 'linear', 'sqrt'), metavar='SCALE',
                   help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
group.add_argument('--lr-noise', type=float_range(0), nargs='+', default=None, metavar='pct, pct',
                   help='learning rate noise on/off epoch percentages')
group.add_argument('--lr-cycle-limit', type=int_range(1), default=1, metavar='N',
                   help='learning rate cycle limit, cycles enabled if > 1')
group.add_argument('--warmup-lr', type=float_range(0, LR_MAX), default=1e-5, metavar='LR',
                   help='warmup learning rate (default: 1e-5)')
group.add_argument('--min-lr', type=float_range(0, LR_MAX), default=1e-5, metavar='LR',
                   help='lower lr bound for cyclic schedulers that hit 0 (default: 1e-5)')
group.add_argument('--epochs', type=int_range(1), default=None, metavar='N',
                   help='number of epochs to train (default: 30 for the structured demo model, else 2)')
group.add_argument('--start-epoch', default=None, type=int_range(0), metavar='N',
                   help='manual epoch number (useful on restarts)')
group.add_argument('--decay-milestones', default=[90, 180, 270], type=int_range(0), nargs='+', metavar='MILESTONES',
                   help='list of decay epoch indices for multistep lr')
group.add_argument('--decay-epochs', type=float_range(0, low_open=True), default=90, metavar='N',
                   help='epoch interval to decay LR')
group.add_argument('--warmup-epochs', type=int_range(0), default=1, metavar='N',
                   help='epochs to warmup LR, if scheduler supports (default: 1)')
group.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='exclude warmup period from decay schedule')
group.add_argument('--cooldown-epochs', type=int_range(0), default=0, metavar='N',
                   help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
group.add_argument('--patience-epochs', type=int_range(0), default=10, metavar='N',
                   help='patience epochs for Plateau LR scheduler (default: 10)')
group.add_argument('--decay-rate', '--dr', type=float_range(0, low_open=True), default=0.1, metavar='RATE',
                   help='LR decay rate (default: 0.1)')

group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--no-aug', action='store_const', const=True, default=None,
                   help='disable all training augmentation (default: on for structured, whose labels depend on '
                        'exact patch positions; off otherwise)')
group.add_argument('--train-crop-mode', type=str, default=None, choices=('rrc', 'rkrc', 'rkrr'),
                   help='crop-mode in train ("rrc", "rkrc", "rkrr")')
group.add_argument('--scale', type=float_range(0, 1, low_open=True), nargs=2, default=[0.08, 1.0], metavar='PCT',
                   help='random resize scale, min max (default: 0.08 1.0)')
group.add_argument('--ratio', type=float_range(0, low_open=True), nargs=2, default=[3. / 4., 4. / 3.],
                   metavar='RATIO', help='random resize aspect ratio, min max (default: 0.75 1.33)')
group.add_argument('--hflip', type=float_range(0, 1), default=0.5, help='horizontal flip training aug probability')
group.add_argument('--vflip', type=float_range(0, 1), default=0., help='vertical flip training aug probability')
group.add_argument('--color-jitter', type=float_range(0), default=0.4, metavar='PCT',
                   help='color jitter factor (default: 0.4)')
group.add_argument('--aa', type=str, default=None, metavar='NAME',
                   help='AutoAugment/RandAugment policy, e.g. "rand-m9-mstd0.5-inc1" (default: None)')
group.add_argument('--aug-repeats', type=int_range(0), default=0,
                   help='number of augmentation repetitions (distributed training only) (default: 0)')
group.add_argument('--reprob', type=float_range(0, 1), default=0., metavar='PCT',
                   help='random erase prob (default: 0.)')
group.add_argument('--remode', type=str, default='pixel', choices=('const', 'rand', 'pixel'),
                   help='random erase mode (default: "pixel")')
group.add_argument('--recount', type=int_range(1), default=1, help='random erase count (default: 1)')
group.add_argument('--mixup', type=float_range(0), default=0.0,
                   help='mixup alpha, mixup enabled if > 0. (default: 0.)')
group.add_argument('--cutmix', type=float_range(0), default=0.0,
                   help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
group.add_argument('--cutmix-minmax', type=float_range(0, 1, low_open=True), nargs=2, default=None,
                   help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
group.add_argument('--mixup-prob', type=float_range(0, 1), default=1.0,
                   help='probability of performing mixup or cutmix when either/both is enabled')
group.add_argument('--mixup-switch-prob', type=float_range(0, 1), default=0.5,
                   help='probability of switching to cutmix when both mixup and cutmix enabled')
group.add_argument('--mixup-mode', type=str, default='batch', choices=('batch', 'pair', 'elem'),
                   help='how to apply mixup/cutmix params: batch/pair/elem')
group.add_argument('--mixup-off-epoch', default=0, type=int_range(0), metavar='N',
                   help='turn off mixup after this epoch, disabled if 0 (default: 0)')
group.add_argument('--smoothing', type=float_range(0, 1, high_open=True), default=0.1,
                   help='label smoothing (default: 0.1)')
group.add_argument('--bce-loss', action='store_true', default=False, help='enable BCE loss w/ Mixup/CutMix use')
group.add_argument('--train-interpolation', type=str, default='random', choices=('random',) + INTERPOLATIONS,
                   help='training interpolation (random, bilinear, bicubic default: "random")')
group.add_argument('--drop', type=float_range(0, 1, high_open=True), default=0.0, metavar='PCT',
                   help='dropout rate (default: 0.)')
group.add_argument('--drop-path', type=float_range(0, 1, high_open=True), default=None, metavar='PCT',
                   help='drop path rate (default: None)')

group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False,
                   help='enable tracking moving average of model weights (evaluated and saved with checkpoints)')
group.add_argument('--model-ema-decay', type=float_range(0, 1), default=0.9998,
                   help='decay factor for model weights moving average (default: 0.9998)')
group.add_argument('--model-ema-warmup', action='store_true', help='enable warmup for model EMA decay')

group = parser.add_argument_group('Knowledge distillation parameters (timm.task)')
group.add_argument('--kd-model-name', default=None, type=str, metavar='MODEL',
                   help='teacher for knowledge distillation: a timm model name (with its pretrained weights), '
                        'hf-hub:ORG/REPO, local-dir:DIR, or a train.py checkpoint (its EMA weights when it has them); '
                        'it must predict the student\'s classes')
group.add_argument('--kd-distill-type', default=None, type=str, choices=tuple(KD_TASKS),
                   help='"logit": KL divergence of the softened class probabilities; "feature": MSE of the pooled '
                        'pre-logits features (a trained projection when the widths differ); "token": the student\'s '
                        'distillation head (DeiT distilled models) learns the teacher (default: logit)')
group.add_argument('--kd-token-distill-type', default=None, type=str, choices=('soft', 'hard'),
                   help='token distillation: "soft" KL with temperature, "hard" cross-entropy with the teacher\'s '
                        'argmax (default: soft)')
group.add_argument('--distill-loss-weight', default=None, type=float_range(0),
                   help='weight of the distillation loss: loss = task_weight * task_loss + distill_weight * kd_loss '
                        '(default: 1; with only --task-loss-weight given: 1 - task weight)')
group.add_argument('--task-loss-weight', default=None, type=float_range(0),
                   help='weight of the classification loss (default: 1)')
group.add_argument('--kd-temperature', default=None, type=float_range(0, low_open=True),
                   help=f'softmax temperature of logit and soft token distillation (default: {KD_TEMPERATURE:g})')

group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int_range(0, 2 ** 31 - 1), default=42, metavar='S', help='random seed (default: 42)')
group.add_argument('--worker-seeding', type=str, default='all', choices=('all', 'part'),
                   help='worker seed mode (default: all)')
group.add_argument('--log-interval', type=int_range(1), default=50, metavar='N',
                   help='how many batches to wait before logging training status')
group.add_argument('--checkpoint-hist', type=int_range(1), default=3, metavar='N',
                   help='number of epoch checkpoints to keep besides last and best (default: 3)')
group.add_argument('-j', '--workers', type=int_range(0), default=2, metavar='N',
                   help='how many data loading processes to use (default: 2)')
group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in DataLoader')
group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
group.add_argument('--output', default='', type=str, metavar='PATH',
                   help=f'path to output folder (default: {DEFAULT_OUTPUT}; with --resume: the checkpoint\'s)')
group.add_argument('--experiment', default='', type=str, metavar='NAME',
                   help='name of train experiment, name of sub-folder for output (default: date-model-size; with '
                        '--resume: the checkpoint\'s folder)')
group.add_argument('--overwrite', action='store_true', default=False,
                   help='start a new run in a folder that holds a previous run: its train.py files (checkpoints, '
                        'args.yaml, summary.csv, attention.png) are removed first; other files are never touched')
group.add_argument('--eval-metric', default=None, type=str, choices=('top1', 'top5', 'loss'), metavar='EVAL_METRIC',
                   help='metric that ranks checkpoints: top1, top5 or loss (default: top1; the train loss with '
                        '--val-split "")')
group.add_argument('--no-attention-plot', action='store_true', default=False,
                   help='do not save the positional attention plot at the end')


EXIT_NON_FINITE = 3  # the exit code of a run stopped by a non-finite loss or evaluation


class NonFiniteLossError(RuntimeError):
    """The training loss or an evaluation became NaN or inf; training stops rather than writing a broken model."""

    def __str__(self) -> str:
        return f'training stopped, {super().__str__()}'


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line, with the ``-c`` YAML's keys (checked like options) as defaults."""
    args_config, _ = config_parser.parse_known_args(argv)
    cfg = read_recipe(args_config.config, parser) if args_config.config else {}
    # values already on the namespace win over argparse defaults; the command line still overrides them
    args = parser.parse_args(argv, namespace=argparse.Namespace(**cfg))
    if args.lr is not None and args.lr_base is not None:
        # --lr and --lr-base are two ways to give one value: the command line's wins over the recipe's, but two
        # from the same place contradict each other
        typed = [k for k in ('lr', 'lr_base') if getattr(parser.parse_args(argv), k) is not None]
        if len(typed) != 1:
            where = 'on the command line' if typed else f"in config file '{args_config.config}'"
            raise UsageError(f'--lr and --lr-base both given {where}: --lr is used as given, --lr-base is scaled with '
                             f'the batch size to give lr; pass one of them')
        setattr(args, 'lr_base' if typed == ['lr'] else 'lr', None)
    return args


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on the dataset (the built-in demo run needs none of them set)."""
    if not args.dataset and not args.data_dir:
        args.dataset = 'structured'
    structured = is_structured(args.dataset)
    if args.no_aug is None:
        args.no_aug = structured
    demo = structured and args.model == DEFAULT_MODEL
    if demo:
        # one tied positional block with average pooling, so that every patch token aggregates its attention row
        # and passes it through the MLP before pooling: the setting that learns the hidden sets within CPU minutes
        # (the runs that chose it: docs/paper_experiments.md). Model kwargs given on the command line take
        # precedence.
        defaults = dict(STRUCTURED_DEMO_MODEL_KWARGS)
        if args.gp is not None:
            defaults.pop('global_pool')
        args.model_kwargs = {**defaults, **(args.model_kwargs or {})}
    if args.epochs is None:
        args.epochs = STRUCTURED_DEMO_EPOCHS if demo else 2
    if args.lr is None and args.lr_base is None:
        args.lr_base = STRUCTURED_DEMO_LR_BASE if demo else 1e-3
    resolve_dataset_preprocessing(args)
    if args.eval_metric is None:
        args.eval_metric = 'top1' if args.val_split else 'loss'
    if args.kd_model_name:  # timm's defaults, each only where it is used (a value given where it is not is refused)
        args.kd_distill_type = args.kd_distill_type or 'logit'
        if args.kd_distill_type == 'token' and args.kd_token_distill_type is None:
            args.kd_token_distill_type = 'soft'
        if args.kd_temperature is None and uses_temperature(args):
            args.kd_temperature = KD_TEMPERATURE
    args.prefetcher = not args.no_prefetcher
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'


def resolve_dataset_preprocessing(args: argparse.Namespace) -> None:
    """The normalization (mean, std), crop_pct and interpolation of a run on a dataset of the table, where not given.

    A model trained from scratch takes the dataset's own (`timm_posattn.dataset_info`): the model's pretrained cfg
    would give ImageNet's three-channel mean to Fashion-MNIST's grey images. Pretrained or --initial-checkpoint
    weights keep the cfg's, as timm does: they were trained with it. The structured images always take theirs: it is
    how their pixels encode the patch values.
    """
    info = get_dataset_info(args.dataset)
    if info is None or (not info.synthetic and (args.pretrained or args.initial_checkpoint)):
        return
    args.mean = list(info.mean) if args.mean is None else args.mean
    args.std = list(info.std) if args.std is None else args.std
    args.crop_pct = info.crop_pct if args.crop_pct is None else args.crop_pct
    args.interpolation = args.interpolation or info.interpolation


def check_normalization(data_config: Dict[str, Any], in_chans: int) -> None:
    """A mean/std taken from the model's pretrained cfg must fit the input channels (given ones are checked with
    the arguments): one line, not a shape error in the first batch."""
    for key in ('mean', 'std'):
        values = data_config[key]
        if len(values) not in (1, in_chans):
            raise UsageError(f"the model's pretrained cfg normalizes {len(values)} channels ({key} "
                             f"{tuple(round(v, 4) for v in values)}) but the input has {in_chans}: give --mean and "
                             f"--std with 1 value or one per channel")


def input_channels(args: argparse.Namespace) -> int:
    return args.input_size[0] if args.input_size else args.in_chans or 3


def uses_temperature(args: argparse.Namespace) -> bool:
    """Logit and soft token distillation compare softened probabilities; feature and hard token distillation do
    not."""
    return args.kd_distill_type == 'logit' or (args.kd_distill_type == 'token' and args.kd_token_distill_type == 'soft')


def check_distillation_args(args: argparse.Namespace) -> None:
    """Each --kd-* option given has an effect, and the weighted loss trains something."""
    if not args.kd_model_name:
        given = [f'--{key.replace("_", "-")}' for key in KD_OPTIONS if getattr(args, key) is not None]
        if given:
            raise UsageError(f'{", ".join(given)} would have no effect: there is no teacher (--kd-model-name)')
        return
    kind = args.kd_distill_type
    if args.kd_token_distill_type is not None and kind != 'token':
        raise UsageError(f'--kd-token-distill-type applies to --kd-distill-type token, not {kind}')
    if args.kd_temperature is not None and not uses_temperature(args):
        why = 'feature distillation compares features, not probabilities' if kind == 'feature' \
            else 'hard token distillation uses the teacher\'s top class'
        raise UsageError(f'--kd-temperature {args.kd_temperature:g} would have no effect: {why}')
    if args.distill_loss_weight is None and args.task_loss_weight is not None and args.task_loss_weight > 1:
        raise UsageError(f'--task-loss-weight {args.task_loss_weight:g} alone weights the distillation loss with '
                         f'1 - {args.task_loss_weight:g} < 0 (timm\'s complementary weighting); give a task weight '
                         f'in [0, 1], or --distill-loss-weight as well')
    if args.distill_loss_weight == 0 and args.task_loss_weight == 0:
        raise UsageError('--distill-loss-weight 0 and --task-loss-weight 0: the loss would be zero and nothing would '
                         'be trained')


def check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check option by option; runs before anything is built, so a refused run costs nothing."""
    if args.start_epoch is not None and args.start_epoch >= args.epochs:
        raise UsageError(f'--start-epoch {args.start_epoch} leaves nothing to train with --epochs {args.epochs}')
    if args.val_num_samples is not None and not args.val_split:
        raise UsageError(f'--val-num-samples {args.val_num_samples} with --val-split "": there is no evaluation')
    if args.eval_metric != 'loss' and not args.val_split:
        raise UsageError(f'--eval-metric {args.eval_metric} needs evaluation, but --val-split is empty; rank by the '
                         f'train loss (--eval-metric loss) or give a validation split')
    if args.pretrained and args.initial_checkpoint:
        raise UsageError('--pretrained and --initial-checkpoint both give the starting weights: pass one of them')
    if args.resume and (args.initial_checkpoint or args.pretrained):
        given = '--initial-checkpoint' if args.initial_checkpoint else '--pretrained'
        raise UsageError(f'{given} gives the starting weights of a new run, and --resume continues a run with its '
                         f'own weights: pass one of them')
    if args.input_size and (args.img_size is not None or args.in_chans not in (None, args.input_size[0])):
        raise UsageError('--input-size gives channels and size: do not add --img-size or another --in-chans')
    in_chans = input_channels(args)
    if is_structured(args.dataset) and in_chans != 3:
        raise UsageError(f'the structured images are RGB: expected 3 input channels, got {in_chans}')
    for option in ('mean', 'std'):
        values = getattr(args, option)
        if values is not None and len(values) not in (1, in_chans):
            raise UsageError(f'--{option} has {len(values)} values: expected 1 or one per input channel ({in_chans})')
    if args.no_aug:
        chosen = (('--aa', args.aa), ('--reprob', args.reprob), ('--train-crop-mode', args.train_crop_mode))
        given = [flag for flag, on in chosen if on]
        if given:
            why = ', the default for structured, whose labels depend on exact patch positions' \
                if is_structured(args.dataset) else ''
            raise UsageError(f'{", ".join(given)} would have no effect: training augmentation is off (--no-aug{why})')
    if args.sched == 'plateau' and args.sched_on_updates:
        raise UsageError('--sched plateau steps once per epoch (on the eval metric): add --no-sched-on-updates')
    if args.torchcompile and args.torchcompile not in torch.compiler.list_backends(exclude_tags=()):
        raise UsageError(f'--torchcompile {args.torchcompile}: unknown backend, expected one of '
                         f'{", ".join(torch.compiler.list_backends())}')
    kind, name = parse_model_name(args.model)
    if kind is None:
        require_registered(split_model_name_tag(name)[0], '--model')
    try:
        get_optimizer_info(args.opt.lower().split('_')[-1])  # timm's names: 'adamw', 'lookahead_adamw', ...
    except ValueError:
        raise UsageError(f'--opt {args.opt}: unknown optimizer, expected a name of timm.optim.list_optimizers()'
                         ) from None
    if args.aug_repeats and not utils.is_distributed_env():
        raise UsageError(f'--aug-repeats {args.aug_repeats} needs distributed training (torchrun): timm repeats '
                         f'augmentations only through its distributed sampler')
    check_distillation_args(args)


def import_device_modules(args: argparse.Namespace) -> None:
    for module in args.device_modules or []:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UsageError(f'--device-modules {module}: {e}') from None


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def is_finite_everywhere(loss: torch.Tensor, args: argparse.Namespace) -> bool:
    """True when the loss is finite on every process (all ranks must agree to stop together)."""
    finite = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if args.distributed:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def check_finite_metrics(metrics: Dict[str, float], epoch: int, what: str) -> None:
    """A non-finite evaluation is never ranked, saved or reported as a top-1: the run stops."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        shown = ', '.join(f'{k} {v}' for k, v in bad.items())
        raise NonFiniteLossError(f'the {what} of epoch {epoch} is not finite ({shown}): the model\'s outputs '
                                 f'overflowed; nothing of this epoch was saved; try a lower --lr or --clip-grad')


def train_one_epoch(
        epoch: int,
        task: TrainingTask,
        loader,
        optimizer: torch.optim.Optimizer,
        args: argparse.Namespace,
        device: torch.device,
        lr_scheduler=None,
        amp_autocast=suppress,
        loss_scaler=None,
        mixup_fn=None,
) -> Dict[str, float]:
    """One pass over the loader with gradient accumulation, clipping, AMP and EMA, as in timm's train.py: the timm
    task (classification or distillation) computes the loss. Returns the mean train loss and the task's loss parts
    (task_loss, kd_loss when distilling)."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    task.train()  # the student; a distillation task keeps its teacher in eval mode
    meters = OrderedDict(loss=utils.AverageMeter())  # 'loss' and the task's loss parts
    update_time_m = utils.AverageMeter()
    accum_steps = args.grad_accum_steps
    num_batches = len(loader)
    last_accum_steps = num_batches % accum_steps
    updates_per_epoch = (num_batches + accum_steps - 1) // accum_steps
    num_updates = epoch * updates_per_epoch
    last_batch_idx_to_accum = num_batches - last_accum_steps
    update_sample_count = 0
    update_start_time = time.time()
    optimizer.zero_grad()

    for batch_idx, (input, target) in enumerate(loader):
        last_batch = batch_idx == num_batches - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        update_idx = batch_idx // accum_steps
        if batch_idx >= last_batch_idx_to_accum:
            accum_steps = last_accum_steps
        if not args.prefetcher:
            input, target = input.to(device), target.to(device)
            if mixup_fn is not None:
                input, target = mixup_fn(input, target)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)

        sync_context = task.no_sync if args.distributed and not need_update else suppress
        with sync_context():
            with amp_autocast():
                result = task(input, target)
            loss = result['loss']
            if not is_finite_everywhere(loss, args):
                parts = ', '.join(f'{LOSS_PARTS[k]} {v.item()}' for k, v in result.items() if k in LOSS_PARTS)
                raise NonFiniteLossError(
                    f'loss is {loss.item()}{f" ({parts})" if parts else ""} at epoch {epoch}, step {batch_idx} of '
                    f'{num_batches} (update {num_updates + 1}); try a lower --lr, --clip-grad, or no --amp')
            scaled_loss = loss / accum_steps if accum_steps > 1 else loss
            clip_parameters = None
            if args.clip_grad is not None:
                clip_parameters = task.get_clip_parameters(exclude_head='agc' in args.clip_mode)
            if loss_scaler is not None:
                loss_scaler(scaled_loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=clip_parameters, need_update=need_update)
            else:
                scaled_loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(clip_parameters, value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()

        meters['loss'].update(loss.item(), input.shape[0])
        for key, value in result.items():
            if key in LOSS_PARTS:
                meters.setdefault(LOSS_PARTS[key], utils.AverageMeter()).update(value.item(), input.shape[0])
        update_sample_count += input.shape[0] * args.world_size
        if not need_update:
            continue

        num_updates += 1
        optimizer.zero_grad()
        task.update_ema(step=num_updates)
        now = time.time()
        update_time_m.update(now - update_start_time)
        update_start_time = now

        if utils.is_primary(args) and (update_idx % args.log_interval == 0 or last_batch):
            lrs = [group['lr'] for group in optimizer.param_groups]
            parts = ''.join(f'  {"KD" if name == "kd_loss" else "Task"}: {m.val:#.3g} ({m.avg:#.3g})'
                            for name, m in meters.items() if name != 'loss')
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                f'Loss: {meters["loss"].val:#.3g} ({meters["loss"].avg:#.3g}){parts}  '
                f'Throughput: {update_sample_count / max(update_time_m.val, 1e-9):>7.1f} img/s  '
                f'LR: {sum(lrs) / len(lrs):.3e}')
        update_sample_count = 0
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=meters['loss'].avg)

    metrics = OrderedDict((name, m.avg) for name, m in meters.items())
    if args.distributed:
        reduced = utils.reduce_tensor(torch.tensor(list(metrics.values()), device=device), args.world_size)
        metrics = OrderedDict(zip(metrics, reduced.tolist()))
    return metrics


def validate(
        model: nn.Module,
        loader,
        loss_fn: nn.Module,
        args: argparse.Namespace,
        device: torch.device,
        amp_autocast=suppress,
        log_suffix: str = '',
) -> Dict[str, float]:
    """Loss, top-1 and top-5 over the loader, averaged over all processes."""
    losses_m, top1_m, top5_m = utils.AverageMeter(), utils.AverageMeter(), utils.AverageMeter()
    model.eval()
    topk = (1, min(5, getattr(args, 'num_classes', None) or 5))
    with torch.inference_mode():
        for input, target in loader:
            if not args.prefetcher:
                input, target = input.to(device), target.to(device)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                output = model(input)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                loss = loss_fn(output, target)
            acc1, acc5 = utils.accuracy(output, target, topk=topk)
            if args.distributed:
                loss = utils.reduce_tensor(loss.data, args.world_size)
                acc1 = utils.reduce_tensor(acc1, args.world_size)
                acc5 = utils.reduce_tensor(acc5, args.world_size)
            batch_size = output.shape[0]
            losses_m.update(loss.item(), batch_size)
            top1_m.update(acc1.item(), batch_size)
            top5_m.update(acc5.item(), batch_size)
    if utils.is_primary(args):
        _logger.info(f'Eval{log_suffix}: Loss {losses_m.avg:.4f}  Acc@1 {top1_m.avg:.3f}  Acc@5 {top5_m.avg:.3f}')
    return OrderedDict([('loss', losses_m.avg), ('top1', top1_m.avg), ('top5', top5_m.avg)])


def report_attention(model: nn.Module, dataset, run: RunFolder, args: argparse.Namespace) -> Optional[Dict]:
    """Print the patch-association score (structured data) and save the positional attention plot."""
    if not hasattr(model, 'get_attention_maps') or not getattr(model, 'pos_attn_indices', None):
        _logger.info('Model has no positional-attention blocks: no attention plot or association score.')
        return None
    assoc = None
    partition = getattr(dataset, 'partition', None)
    if partition is not None:
        from timm_posattn.association import model_association
        assoc = model_association(model, partition)
        details = ', '.join(f'{k} {v:.3f}' for k, v in assoc.items()
                            if k != 'association' and isinstance(v, float))
        print(f"Patch association: {assoc['association']:.3f} ({details})", flush=True)
    if not args.no_attention_plot:
        try:
            from timm_posattn.visualize import save_attention_plot
        except ImportError:
            _logger.warning('timm_posattn.visualize is not available: no attention plot saved.')
            return assoc
        path = save_attention_plot(model, run.file('attention.png'),  # listed in the manifest, written atomically
                                   write=lambda path, fn: run.claim.write(os.path.basename(path), fn))
        print(f'Attention plot: {path}', flush=True)
    return assoc


# --------------------------------------------------------------------------------------------------------------------
# Data, model, loss


def create_datasets(args: argparse.Namespace):
    """Train and (optional) eval datasets; raises DatasetError with one readable line when they cannot be opened."""
    in_chans = input_channels(args)
    common = dict(
        root=args.data_dir, download=args.dataset_download, data_seed=args.data_seed, class_map=args.class_map,
        input_img_mode=args.input_img_mode or ('RGB' if in_chans == 3 else 'L'),
        input_key=args.input_key, target_key=args.target_key, batch_size=args.batch_size,
    )
    dataset_train = create_dataset(args.dataset, split=args.train_split, is_training=True, seed=args.seed,
                                   num_samples=args.train_num_samples, **common)
    dataset_eval = None
    if args.val_split:
        dataset_eval = create_dataset(args.dataset, split=args.val_split, is_training=False,
                                      num_samples=args.val_num_samples, **common)
    return dataset_train, dataset_eval


def check_train_batches(args: argparse.Namespace, dataset) -> None:
    """timm's train loader keeps only full batches: with fewer samples than one (global) batch no step would run."""
    try:
        num_samples = len(dataset)
    except TypeError:  # iterable datasets
        return
    global_batch = args.batch_size * args.world_size
    if num_samples < global_batch:
        processes = f' x {args.world_size} processes' if args.world_size > 1 else ''
        raise UsageError(
            f'the train split has {num_samples} samples, fewer than one batch (-b {args.batch_size}{processes}): '
            f'the train loader keeps only full batches, so no training step would run; lower -b or use more samples')


def infer_num_classes(args: argparse.Namespace, dataset) -> Optional[int]:
    """Classes of the data (class folders, torchvision ``classes``), else of the dataset table, so --num-classes is
    optional."""
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(dataset, 'classes', None)
    if classes:
        return len(classes)
    info = get_dataset_info(args.dataset)
    return info.num_classes if info is not None else None


def create_loaders(args: argparse.Namespace, dataset_train, dataset_eval, data_config: Dict[str, Any],
                   device: torch.device):
    """timm loaders with its augmentation pipeline and mixup/cutmix (collate-time with the prefetcher)."""
    mixup_fn, collate_fn = None, None
    mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
    if mixup_active:
        mixup_args = dict(
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
            prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
            label_smoothing=args.smoothing, num_classes=args.num_classes)
        if args.prefetcher:
            collate_fn = FastCollateMixup(**mixup_args)
        else:
            mixup_fn = Mixup(**mixup_args)

    common_loader = dict(
        input_size=data_config['input_size'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=args.distributed, pin_memory=args.pin_mem,
        use_prefetcher=args.prefetcher, device=device,
    )
    train_interpolation = data_config['interpolation'] if args.no_aug or not args.train_interpolation \
        else args.train_interpolation
    try:
        loader_train = create_loader(
            dataset_train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, train_crop_mode=args.train_crop_mode,
            scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
            auto_augment=args.aa, num_aug_repeats=args.aug_repeats, interpolation=train_interpolation,
            collate_fn=collate_fn, worker_seeding=args.worker_seeding, **common_loader)
    except (AssertionError, KeyError, ValueError) as e:  # timm parses --aa and the crop options here
        raise UsageError(f'the training augmentation cannot be built from these options (--aa {args.aa!r}, '
                         f'--scale, --ratio, --color-jitter ...): {one_line(e)}'
                         ) from None
    loader_eval = None
    if dataset_eval is not None:
        loader_eval = create_loader(
            dataset_eval, batch_size=args.validation_batch_size or args.batch_size, is_training=False,
            interpolation=data_config['interpolation'], crop_pct=data_config['crop_pct'], **common_loader)
    return loader_train, loader_eval, mixup_fn, mixup_active


def create_train_loss(args: argparse.Namespace, mixup_active: bool) -> nn.Module:
    if mixup_active:  # mixup's targets are already smoothed soft targets
        return BinaryCrossEntropy(target_threshold=None) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return BinaryCrossEntropy(smoothing=args.smoothing) if args.bce_loss \
            else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


# create_model kwargs that options set, and the option that sets each (for messages)
_OPTION_OF_KWARG = {'in_chans': '--in-chans', 'num_classes': '--num-classes', 'drop_rate': '--drop',
                    'drop_path_rate': '--drop-path', 'global_pool': '--gp', 'img_size': '--img-size/--input-size'}


def _given(args: argparse.Namespace, key: str, value: Any) -> str:
    """How the user gave a create_model kwarg, for messages."""
    if key in (args.model_kwargs or {}) or key not in _OPTION_OF_KWARG:
        return f'--model-kwargs {key}={value!r}'
    return f'{_OPTION_OF_KWARG[key]} {value!r}'


def model_create_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The `create_model` kwargs of this run: those options set, and --model-kwargs (one value for each)."""
    img_size = args.input_size[1:] if args.input_size else args.img_size  # the model is built for the data's size
    kwargs = dict(
        in_chans=input_channels(args), num_classes=args.num_classes,
        drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
        img_size=tuple(img_size) if isinstance(img_size, list) else img_size,
    )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    for key, value in (args.model_kwargs or {}).items():
        if key in kwargs and not same_kwarg_value(kwargs[key], value):
            raise UsageError(f'--model-kwargs {key}={value!r} contradicts {_OPTION_OF_KWARG[key]} {kwargs[key]!r}: '
                             f'give it once')
        kwargs[key] = value
    return kwargs


def create_student(args: argparse.Namespace, initial: Optional[TrainCheckpoint] = None) -> nn.Module:
    """The model through `timm_posattn.loading` (pretrained weights verified), with --initial-checkpoint's weights
    (adapted to another resolution or a standard ViT's attention where needed, logged)."""
    kwargs = model_create_kwargs(args)
    try:
        model = load_model(args.model, pretrained=args.pretrained, **kwargs).model
    except ModelKwargsError as e:  # named as the user gave them: --gp, --num-classes, --model-kwargs ...
        given = ', '.join(_given(args, k, kwargs[k]) for k in e.refused)
        raise UsageError(f'{args.model} refuses {given}: {e.reason}') from None
    if initial is not None:
        which = load_weights(model, initial, adapt=True)
        _logger.info(f"Initialized from --initial-checkpoint '{initial.path}' ({which})")
    if args.num_classes is None:
        args.num_classes = model.num_classes
    return model


def load_teacher(args: argparse.Namespace) -> LoadedModel:
    """The --kd-model-name teacher through `timm_posattn.loading`, before anything else is built: a name with its
    pretrained weights, hf-hub:, local-dir:, or a train.py checkpoint (checksums and finite weights checked)."""
    kind, name = parse_source(args.kd_model_name)
    if kind is None:
        require_registered(split_model_name_tag(name)[0], '--kd-model-name')
        if not timm.list_pretrained(name if split_model_name_tag(name)[1] else f'{name}.*'):
            raise UsageError(f'--kd-model-name {name}: timm has no pretrained weights for this model, and a teacher '
                             f'needs trained weights: give a train.py checkpoint, hf-hub:ORG/REPO or local-dir:DIR')
    return load_model(args.kd_model_name, pretrained=True if kind is None else None)


def check_teacher_classes(args: argparse.Namespace, teacher: nn.Module) -> None:
    """Distillation compares the teacher's and the student's outputs class by class: the classes must be the same."""
    classes = getattr(teacher, 'num_classes', None)
    if classes != args.num_classes:
        raise UsageError(f'--kd-model-name {args.kd_model_name} predicts {classes} classes, the student '
                         f'{args.num_classes}: distillation needs a teacher of the same classes (fine-tune it on '
                         f'this data first)')


def create_teacher(args: argparse.Namespace, loaded: LoadedModel, data_config: Dict[str, Any],
                   device: torch.device) -> DistillationTeacher:
    """The loaded teacher in timm's `DistillationTeacher`, which renormalizes the student's inputs to the teacher's
    mean/std. A teacher that does not take the student's inputs is refused before any training."""
    source, input_size = args.kd_model_name, data_config['input_size']
    teacher = loaded.model.to(device).eval().requires_grad_(False)
    try:
        with torch.no_grad():
            teacher(torch.zeros(1, *input_size, device=device))
    except (AssertionError, RuntimeError, ValueError) as e:
        raise UsageError(f'--kd-model-name {source} does not take the student\'s {"x".join(map(str, input_size))} '
                         f'inputs: {one_line(e)[:200]}') from None
    wrapped = DistillationTeacher(teacher, device=device)  # takes the teacher's mean/std from its pretrained cfg

    def norm(values) -> str:
        return '/'.join(f'{v:.4g}' for v in values)
    ours = f'mean {norm(data_config["mean"])}, std {norm(data_config["std"])}'
    its = f'mean {norm(wrapped.mean_kd.flatten().tolist())}, std {norm(wrapped.std_kd.flatten().tolist())}'
    _logger.info(f'Distillation teacher: {loaded.weights}; ' + (f'inputs as the student\'s ({ours})' if ours == its
                 else f'inputs renormalized from the student\'s {ours} to its {its}'))
    return wrapped


def create_task(args: argparse.Namespace, model: nn.Module, criterion: nn.Module, device: torch.device,
                teacher: Optional[DistillationTeacher] = None) -> TrainingTask:
    """The timm training task, as timm's train.py builds it: classification, or --kd-distill-type distillation from
    ``teacher`` (the student's normalization is read from its pretrained cfg: see `set_preprocessing`)."""
    verbose = utils.is_primary(args)
    if teacher is None:
        return ClassificationTask(model, criterion=criterion, device=device, verbose=verbose)
    weights = dict(distill_loss_weight=args.distill_loss_weight, task_loss_weight=args.task_loss_weight)
    kind = args.kd_distill_type
    try:
        if kind == 'logit':
            return LogitDistillationTask(model, teacher, criterion=criterion, temperature=args.kd_temperature,
                                         device=device, verbose=verbose, **weights)
        if kind == 'feature':
            return FeatureDistillationTask(model, teacher, criterion=criterion, device=device, verbose=verbose,
                                           **weights)
        return TokenDistillationTask(model, teacher, criterion=criterion, distill_type=args.kd_token_distill_type,
                                     temperature=args.kd_temperature or 1.0, device=device, verbose=verbose,
                                     **weights)
    except ValueError as e:  # a student without a distillation head (token), features of unknown width (feature)
        raise UsageError(f'--kd-distill-type {kind} does not apply to {args.model}: {one_line(e)}'
                         ) from None


class TeacherOnStudentInputs(nn.Module):
    """The teacher as distillation sees it: the student's batches, renormalized to the teacher's mean/std."""

    def __init__(self, teacher: DistillationTeacher, student_mean: torch.Tensor, student_std: torch.Tensor) -> None:
        super().__init__()
        self.teacher = teacher
        self.student_mean, self.student_std = student_mean, student_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.teacher.normalize_input(x, self.student_mean, self.student_std))


def create_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    try:
        return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f'--opt {args.opt} cannot be created with these settings (--opt-kwargs {args.opt_kwargs}, '
                         f'--momentum, --opt-betas, --opt-eps, --layer-decay): {one_line(e)}') from None


# --------------------------------------------------------------------------------------------------------------------
# The command


def main(argv: Optional[Sequence[str]] = None, progress: Optional[Progress] = None) -> Dict[str, Any]:
    """Train and evaluate; returns the final eval metrics and the output folder."""
    progress = progress if progress is not None else Progress()
    if not logging.root.handlers:
        utils.setup_default_logging()
    args = parse_args(argv)
    import_device_modules(args)
    resolve_defaults(args)
    check_args(args)
    resume = read_resume_checkpoint(args) if args.resume else None
    initial = read_checkpoint(args.initial_checkpoint) if args.initial_checkpoint else None
    teacher_source = load_teacher(args) if args.kd_model_name else None
    # every rank checks the folder so all stop together; rank 0 claims it for the run's lifetime
    run = resolve_run_folder(args, resume)
    if run.continuing:
        check_resume_ranking(resume, args)
        check_resume_options(resume, args, ('kd_model_name',) + KD_OPTIONS)
    progress.output_dir = run.path
    progress.resumed_from = resume.path if resume is not None else None

    device = utils.init_distributed_device(args)
    if not utils.is_primary(args):
        logging.getLogger().setLevel(logging.WARNING)  # only rank 0 logs progress
    if args.distributed:
        _logger.info(f'Distributed training: {args.world_size} processes, device {args.device}.')
    if utils.is_primary(args):
        run.acquire()  # a second run into this folder is refused from here on; the claim ends with the process
    try:
        return train_and_evaluate(args, run, device, resume, initial, teacher_source, progress)
    finally:
        run.release()


def train_and_evaluate(args: argparse.Namespace, run: RunFolder, device: torch.device,
                       resume: Optional[TrainCheckpoint], initial: Optional[TrainCheckpoint],
                       teacher_source: Optional[LoadedModel], progress: Progress) -> Dict[str, Any]:
    """Build data, model, task and optimizer, then train and evaluate epoch by epoch into the claimed run folder."""
    output_dir, continuing = run.path, run.continuing
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    utils.random_seed(args.seed, args.rank)

    dataset_train, dataset_eval = create_datasets(args)
    check_train_batches(args, dataset_train)
    data_classes = infer_num_classes(args, dataset_train)
    if args.num_classes is None:
        args.num_classes = data_classes
    elif data_classes is not None and args.num_classes < data_classes:
        raise UsageError(f'--num-classes {args.num_classes} is fewer than the {data_classes} classes of the data: '
                         f'their labels would be out of range')
    if resume is not None:
        check_resume_model(resume, args)
    model = create_student(args, initial)
    if teacher_source is not None:
        check_teacher_classes(args, teacher_source.model)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if utils.is_primary(args):
        _logger.info(f'Model {args.model} created, param count: {sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))
    check_normalization(data_config, input_channels(args))
    # timm takes the size from the model's pretrained cfg, channels included: the loader must give --in-chans
    data_config['input_size'] = (input_channels(args), *data_config['input_size'][1:])
    set_preprocessing(model, data_config)  # what the student is trained on (a distillation task reads its mean/std)

    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = create_teacher(args, teacher_source, data_config, device) if teacher_source is not None else None

    amp_autocast, loss_scaler = suppress, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = utils.NativeScaler()

    loader_train, loader_eval, mixup_fn, mixup_active = create_loaders(
        args, dataset_train, dataset_eval, data_config, device)

    if args.lr is None:  # an --lr given is used as given
        global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
        if not args.lr <= LR_MAX:
            raise UsageError(f'--lr-base {args.lr_base:g} scaled to the global batch size gives a learning rate of '
                             f'{args.lr:g}, beyond float32 ({LR_MAX:.3g}); lower --lr-base')
        if utils.is_primary(args):
            _logger.info(f'Learning rate ({args.lr:g}) from --lr-base {args.lr_base:g} and global batch size '
                         f'{global_batch_size} ({args.lr_base_scale} scaling).')
    if args.sched != 'none' and args.min_lr > args.lr:
        raise UsageError(f'--min-lr {args.min_lr:g} is above the learning rate {args.lr:g}: the schedule would rise '
                         f'instead of decay; lower --min-lr')

    # one loop for plain and distilled training: the timm task owns the forward and the loss (timm's train.py)
    task = create_task(args, model, create_train_loss(args, mixup_active).to(device), device, teacher)
    validate_loss_fn = nn.CrossEntropyLoss().to(device)
    optimizer = create_optimizer(args, task.get_trainable_module())

    resume_epoch = None
    if resume is not None:
        resume_epoch = restore_training_state(
            resume, task, optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler, log_info=utils.is_primary(args))

    if args.model_ema:  # created after moving to device and before DDP, as in timm
        task.setup_ema(decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if resume is not None:
            weights, which = resume.weights()  # the EMA weights when the run kept them
            task.load_checkpoint_state(weights, resume.raw.get(which.replace('state_dict', 'task_state')), ema=True)
            if which != 'state_dict_ema':
                _logger.info('The resumed checkpoint has no EMA weights: the EMA restarts from its weights.')

    if args.torchcompile:  # before DDP, so that DDP stays out of the compiled graph (timm's order)
        task.compile(backend=args.torchcompile)
        if task.has_ema():
            task.compile_ema(backend=args.torchcompile)
    if args.distributed:  # the student (and a feature projection); the teacher stays unwrapped
        task.prepare_distributed(device_ids=[device] if device.type == 'cuda' else None,
                                 broadcast_buffers=not args.no_ddp_bb)

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    try:
        lr_scheduler, num_epochs = create_scheduler_v2(
            optimizer, **scheduler_kwargs(args, decreasing_metric=args.eval_metric == 'loss'),
            updates_per_epoch=updates_per_epoch)
    except (AssertionError, ValueError) as e:
        raise UsageError(f'--sched {args.sched} cannot be built with these settings: {one_line(e)}'
                         ) from None
    if lr_scheduler is not None and 0 < num_epochs <= args.warmup_epochs:
        _logger.warning(f'--warmup-epochs {args.warmup_epochs} covers all {num_epochs} epochs: the learning rate '
                        'only rises, from --warmup-lr, and never reaches --lr (--warmup-epochs 0 for a run this short)')
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver, summary_path = None, None
    if run.claim is not None:  # rank 0: the folder becomes this run's (an earlier run's files go only now)
        run.begin()
        if continuing:
            discard_abandoned_run(run, start_epoch, keep=resume.path)
            utils.trim_summary(run.file('summary.csv'), start_epoch)
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, amp_scaler=loss_scaler, task=task,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=args.eval_metric == 'loss',
            max_history=args.checkpoint_hist, claim=run.claim)
        if continuing:
            if resume.raw.get('saver'):
                saver.load_state_dict(resume.raw['saver'])
            reconcile_best(run, saver, resume)
        run.claim.write_text('args.yaml', yaml.safe_dump(plain_args(args), default_flow_style=False))
        # a new run starts its own summary; a continued one keeps its rows before start_epoch (trimmed above)
        summary_path = run.claim.record('summary.csv') if continuing else run.claim.write_text('summary.csv', '')
    if continuing and os.path.isfile(run.file('last.pth.tar')):
        progress.saved_epoch = saved_epoch(run.file('last.pth.tar'))
    if utils.is_primary(args):
        _logger.info(f'Training epochs {start_epoch}..{num_epochs - 1}, {updates_per_epoch} updates per epoch; '
                     f'output in {output_dir}')

    teacher_metrics = None
    if teacher is not None:  # once, so that the student's numbers can be read against it
        if loader_eval is not None:
            teacher_metrics = validate(TeacherOnStudentInputs(teacher, task.student_mean, task.student_std),
                                       loader_eval, validate_loss_fn, args, device, amp_autocast,
                                       log_suffix=f' (teacher {args.kd_model_name})')
        else:
            _logger.info('No validation split (--val-split ""): the teacher\'s top-1 is not measured.')

    eval_metrics = None
    for epoch in range(start_epoch, num_epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch, task, loader_train, optimizer, args, device,
            lr_scheduler=lr_scheduler, amp_autocast=amp_autocast, loss_scaler=loss_scaler, mixup_fn=mixup_fn)

        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = validate(task.get_eval_model(), loader_eval, validate_loss_fn, args, device, amp_autocast)
            check_finite_metrics(eval_metrics, epoch, 'evaluation')
            if task.has_ema():
                eval_metrics = validate(task.get_eval_model(ema=True), loader_eval, validate_loss_fn, args, device,
                                        amp_autocast, log_suffix=' (EMA)')
                check_finite_metrics(eval_metrics, epoch, 'evaluation (EMA weights)')
        if summary_path:
            lrs = [group['lr'] for group in optimizer.param_groups]
            utils.update_summary(epoch, train_metrics, eval_metrics, filename=summary_path, lr=sum(lrs) / len(lrs))
        latest_metric = (eval_metrics or train_metrics)[args.eval_metric]
        if saver is not None:
            saver.save_checkpoint(epoch, metric=latest_metric)
        progress.saved_epoch = epoch
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)

    if args.distributed:
        torch.distributed.destroy_process_group()
    result = {'output_dir': output_dir, 'eval': eval_metrics, 'teacher_eval': teacher_metrics, 'association': None}
    if utils.is_primary(args):
        if eval_metrics is not None:
            print(f"Final top-1: {eval_metrics['top1']:.2f}%  top-5: {eval_metrics['top5']:.2f}%  "
                  f"({args.dataset or 'folder'}/{args.val_split})", flush=True)
        if saver is not None and saver.best_metric is not None:
            print(f'Best {args.eval_metric}: {saver.best_metric:.4f} (epoch {saver.best_epoch})', flush=True)
        final_model = utils.unwrap_model(task.get_eval_model(ema=task.has_ema()))
        result['association'] = report_attention(final_model, dataset_train, run, args)
    return result


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: errors the user can fix are one line on stderr and exit code 2 (`timm_posattn.cli`), a
    non-finite loss exit code 3, Ctrl-C 130 with what was saved."""
    progress = Progress()
    try:
        return run_command(lambda: main(argv, progress), argv, on_interrupt=progress.describe,
                           exit_codes={NonFiniteLossError: EXIT_NON_FINITE})
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    sys.exit(run())
