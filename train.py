#!/usr/bin/env python3
"""Train positional-attention ViTs (or any timm model) with timm's training components.

A focused version of timm's train.py: the same argument names and meanings, built from timm.data, timm.optim,
timm.scheduler, timm.loss and timm.utils, plus what this package needs: the built-in ``structured`` dataset and
SVHN, atomic checkpoints that load with ``torch.load(weights_only=True)``, a guard against reusing an experiment
folder, a stop on non-finite loss, and the positional attention plot and patch-association score at the end.

With no arguments it trains ``vit_posattn_tiny_patch4_32`` on ``structured`` in a few CPU minutes:

    python train.py
    python train.py -c configs/cifar10_posattn.yaml --data-dir /data/cifar10
    torchrun --nproc_per_node=8 train.py -c configs/imagenet_posattn.yaml --data-dir /data/imagenet
"""
import argparse
import importlib
import logging
import os
import sys
import time
from collections import OrderedDict
from contextlib import suppress
from datetime import datetime
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel as NativeDDP

from timm import utils
from timm.data import create_loader, resolve_data_config, Mixup, FastCollateMixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy, BinaryCrossEntropy
from timm.models import create_model, safe_model_name
from timm.models import clean_state_dict
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

import timm_posattn  # noqa: F401  registers the vit_posattn_* models with timm
from timm_posattn.data import DatasetError, create_dataset, is_structured
from timm_posattn.files import atomic_write
from timm_posattn.structured import STRUCTURED_MEAN, STRUCTURED_STD

_logger = logging.getLogger('train')

DEFAULT_MODEL = 'vit_posattn_tiny_patch4_32'
# the structured demo run (no --model, structured data): see resolve_defaults
STRUCTURED_DEMO_MODEL_KWARGS = {'depth': 1, 'global_pool': 'avg'}
STRUCTURED_DEMO_EPOCHS = 30
STRUCTURED_DEMO_LR_BASE = 3e-3

# The first parser reads only --config; the YAML's keys become defaults of the main parser (as in timm's train.py).
config_parser = argparse.ArgumentParser(description='Training config', add_help=False)
config_parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                           help='YAML file whose keys are train.py arguments (dashes as underscores)')

parser = argparse.ArgumentParser(description='Train positional-attention ViTs with timm')
parser.add_argument('-c', '--config', default='', type=str, metavar='FILE',
                    help='YAML file whose keys are train.py arguments (dashes as underscores)')

group = parser.add_argument_group('Dataset parameters')
group.add_argument('--data-dir', metavar='DIR', default=None, help='path to dataset (root dir)')
group.add_argument('--dataset', metavar='NAME', default='',
                   help='"structured", "torch/cifar10", "torch/cifar100", "torch/svhn", "hfds/<name>", "wds/<name>", '
                        'or empty for an image folder/tar (default: structured when --data-dir is not given either)')
group.add_argument('--train-split', metavar='NAME', default='train', help='dataset train split (default: train)')
group.add_argument('--val-split', metavar='NAME', default='validation',
                   help='dataset validation split, empty to skip evaluation (default: validation)')
group.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='samples in the train split: size of the structured dataset, or of iterable datasets')
group.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                   help='samples in the validation split (structured or iterable datasets)')
group.add_argument('--data-seed', default=0, type=int, metavar='S',
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
                   help='load this checkpoint into model after initialization (default: none)')
group.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='resume model, optimizer, scheduler, EMA and AMP scaler state from a checkpoint; the run '
                        'continues in the checkpoint\'s folder unless --experiment names another')
group.add_argument('--no-resume-opt', action='store_true', default=False,
                   help='prevent resume of optimizer state when resuming model')
group.add_argument('--num-classes', type=int, default=None, metavar='N',
                   help='number of label classes (default: the dataset\'s, else the model\'s)')
group.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (model default if None)')
group.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: model default)')
group.add_argument('--in-chans', type=int, default=None, metavar='N', help='image input channels (default: 3)')
group.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='input all image dimensions (d h w, e.g. --input-size 3 32 32), uses model default if empty')
group.add_argument('--crop-pct', default=None, type=float, metavar='N',
                   help='input image center crop percent (for validation only; 1.0 for structured)')
group.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN', help='override dataset mean')
group.add_argument('--std', type=float, nargs='+', default=None, metavar='STD', help='override dataset std')
group.add_argument('--interpolation', default='', type=str, metavar='NAME',
                   help='image resize interpolation type (overrides model)')
group.add_argument('-b', '--batch-size', type=int, default=64, metavar='N',
                   help='input batch size per process (default: 64)')
group.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N',
                   help='validation batch size override (default: None)')
group.add_argument('--channels-last', action='store_true', default=False, help='use channels_last memory layout')
group.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='the number of steps to accumulate gradients (default: 1)')
group.add_argument('--grad-checkpointing', action='store_true', default=False,
                   help='enable gradient checkpointing through model blocks')
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs,
                   help='extra model kwargs, e.g. --model-kwargs pos_attn_layers=none depth=2')
group.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='enable torch.compile with the given backend (default: inductor)')

group = parser.add_argument_group('Device parameters')
group.add_argument('--device', default=None, type=str, help='device to use (default: cuda if available, else cpu)')
group.add_argument('--amp', action='store_true', default=False, help='use AMP for mixed precision training')
group.add_argument('--amp-dtype', default='float16', type=str, choices=('float16', 'bfloat16'),
                   help='lower precision AMP dtype (default: float16)')
group.add_argument('--no-ddp-bb', action='store_true', default=False,
                   help='force broadcast buffers for native DDP to off')
group.add_argument('--local_rank', '--local-rank', default=0, type=int, help=argparse.SUPPRESS)
group.add_argument('--device-modules', default=None, type=str, nargs='+',
                   help='python imports for device backend modules (or model registries)')

group = parser.add_argument_group('Optimizer parameters')
group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER', help='optimizer (default: "adamw")')
group.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON', help='optimizer epsilon')
group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
group.add_argument('--momentum', type=float, default=0.9, metavar='M', help='optimizer momentum (default: 0.9)')
group.add_argument('--weight-decay', type=float, default=0.05, help='weight decay (default: 0.05)')
group.add_argument('--clip-grad', type=float, default=None, metavar='NORM',
                   help='clip gradient norm (default: None, no clipping)')
group.add_argument('--clip-mode', type=str, default='norm', help='gradient clipping mode: "norm", "value" or "agc"')
group.add_argument('--layer-decay', type=float, default=None, help='layer-wise learning rate decay (default: None)')
group.add_argument('--opt-kwargs', nargs='*', default={}, action=utils.ParseKwargs)

group = parser.add_argument_group('Learning rate schedule parameters')
group.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER', help='LR scheduler (default: "cosine")')
group.add_argument('--sched-on-updates', action=argparse.BooleanOptionalAction, default=True,
                   help='step the LR schedule every update, so short runs warm up and decay smoothly '
                        '(default: on; --no-sched-on-updates steps at epoch ends as timm does)')
group.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate, overrides lr-base if set (default: None)')
group.add_argument('--lr-base', type=float, default=None, metavar='LR',
                   help='base learning rate: lr = lr_base * global_batch_size / lr_base_size '
                        '(default: 3e-3 for the structured demo model, else 1e-3)')
group.add_argument('--lr-base-size', type=int, default=64, metavar='DIV',
                   help='base learning rate batch size (divisor, default: 64)')
group.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE',
                   help='base learning rate vs batch_size scaling ("linear", "sqrt", based on opt if empty)')
group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='learning rate noise on/off epoch percentages')
group.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N',
                   help='learning rate cycle limit, cycles enabled if > 1')
group.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR', help='warmup learning rate (default: 1e-5)')
group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR',
                   help='lower lr bound for cyclic schedulers that hit 0 (default: 1e-5)')
group.add_argument('--epochs', type=int, default=None, metavar='N',
                   help='number of epochs to train (default: 30 for the structured demo model, else 2)')
group.add_argument('--start-epoch', default=None, type=int, metavar='N',
                   help='manual epoch number (useful on restarts)')
group.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES',
                   help='list of decay epoch indices for multistep lr')
group.add_argument('--decay-epochs', type=float, default=90, metavar='N', help='epoch interval to decay LR')
group.add_argument('--warmup-epochs', type=int, default=1, metavar='N',
                   help='epochs to warmup LR, if scheduler supports (default: 1)')
group.add_argument('--warmup-prefix', action='store_true', default=False,
                   help='exclude warmup period from decay schedule')
group.add_argument('--cooldown-epochs', type=int, default=0, metavar='N',
                   help='epochs to cooldown LR at min_lr, after cyclic schedule ends')
group.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                   help='patience epochs for Plateau LR scheduler (default: 10)')
group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help='LR decay rate (default: 0.1)')

group = parser.add_argument_group('Augmentation and regularization parameters')
group.add_argument('--no-aug', action='store_const', const=True, default=None,
                   help='disable all training augmentation (default: on for structured, whose labels depend on '
                        'exact patch positions; off otherwise)')
group.add_argument('--train-crop-mode', type=str, default=None, help='crop-mode in train ("rrc", "rkrc", "rkrr")')
group.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT',
                   help='random resize scale (default: 0.08 1.0)')
group.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO',
                   help='random resize aspect ratio (default: 0.75 1.33)')
group.add_argument('--hflip', type=float, default=0.5, help='horizontal flip training aug probability')
group.add_argument('--vflip', type=float, default=0., help='vertical flip training aug probability')
group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT', help='color jitter factor (default: 0.4)')
group.add_argument('--aa', type=str, default=None, metavar='NAME',
                   help='AutoAugment/RandAugment policy, e.g. "rand-m9-mstd0.5-inc1" (default: None)')
group.add_argument('--aug-repeats', type=float, default=0,
                   help='number of augmentation repetitions (distributed training only) (default: 0)')
group.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob (default: 0.)')
group.add_argument('--remode', type=str, default='pixel', help='random erase mode (default: "pixel")')
group.add_argument('--recount', type=int, default=1, help='random erase count (default: 1)')
group.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0. (default: 0.)')
group.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0. (default: 0.)')
group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                   help='cutmix min/max ratio, overrides alpha and enables cutmix if set (default: None)')
group.add_argument('--mixup-prob', type=float, default=1.0,
                   help='probability of performing mixup or cutmix when either/both is enabled')
group.add_argument('--mixup-switch-prob', type=float, default=0.5,
                   help='probability of switching to cutmix when both mixup and cutmix enabled')
group.add_argument('--mixup-mode', type=str, default='batch', help='how to apply mixup/cutmix params: batch/pair/elem')
group.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N',
                   help='turn off mixup after this epoch, disabled if 0 (default: 0)')
group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: 0.1)')
group.add_argument('--bce-loss', action='store_true', default=False, help='enable BCE loss w/ Mixup/CutMix use')
group.add_argument('--train-interpolation', type=str, default='random',
                   help='training interpolation (random, bilinear, bicubic default: "random")')
group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate (default: 0.)')
group.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path rate (default: None)')

group = parser.add_argument_group('Model exponential moving average parameters')
group.add_argument('--model-ema', action='store_true', default=False,
                   help='enable tracking moving average of model weights (evaluated and saved with checkpoints)')
group.add_argument('--model-ema-decay', type=float, default=0.9998,
                   help='decay factor for model weights moving average (default: 0.9998)')
group.add_argument('--model-ema-warmup', action='store_true', help='enable warmup for model EMA decay')

group = parser.add_argument_group('Miscellaneous parameters')
group.add_argument('--seed', type=int, default=42, metavar='S', help='random seed (default: 42)')
group.add_argument('--worker-seeding', type=str, default='all', help='worker seed mode (default: all)')
group.add_argument('--log-interval', type=int, default=50, metavar='N',
                   help='how many batches to wait before logging training status')
group.add_argument('--checkpoint-hist', type=int, default=3, metavar='N',
                   help='number of epoch checkpoints to keep besides last and best (default: 3)')
group.add_argument('-j', '--workers', type=int, default=2, metavar='N',
                   help='how many data loading processes to use (default: 2)')
group.add_argument('--pin-mem', action='store_true', default=False, help='pin CPU memory in DataLoader')
group.add_argument('--no-prefetcher', action='store_true', default=False, help='disable fast prefetcher')
group.add_argument('--output', default='', type=str, metavar='PATH',
                   help='path to output folder (default: ./output/train)')
group.add_argument('--experiment', default='', type=str, metavar='NAME',
                   help='name of train experiment, name of sub-folder for output (default: date-model-size)')
group.add_argument('--overwrite', action='store_true', default=False,
                   help='allow writing into an existing experiment folder (its files are replaced)')
group.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC',
                   help='best metric (default: "top1")')
group.add_argument('--no-attention-plot', action='store_true', default=False,
                   help='do not save the positional attention plot at the end')


class UsageError(ValueError):
    """Bad input the user can fix (unknown model, existing folder, bad config); printed as one line."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; training stops rather than writing a broken model."""


def parse_args(argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, str]:
    """Parse the command line, with the ``-c`` YAML's keys as defaults; returns args and their YAML text."""
    args_config, remaining = config_parser.parse_known_args(argv)
    cfg = load_config(args_config.config) if args_config.config else {}
    # values already on the namespace win over argparse defaults; the command line still overrides them
    args = parser.parse_args(remaining, namespace=argparse.Namespace(**cfg))
    args.config = args_config.config
    args_text = yaml.safe_dump(plain_args(args), default_flow_style=False)
    return args, args_text


def load_config(path: str) -> Dict[str, Any]:
    """Read a YAML recipe and check that each key is a train.py argument, so a typo cannot silently do nothing."""
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' not found")
    with open(path, encoding='utf-8') as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise UsageError(f"config file '{path}' must be a mapping of train.py arguments, got {type(cfg).__name__}")
    known = {a.dest for a in parser._actions}
    unknown = sorted(k for k in cfg if k.replace('-', '_') not in known)
    if unknown:
        raise UsageError(f"config file '{path}' has keys that are not train.py arguments: {', '.join(unknown)}")
    actions = {a.dest: a for a in parser._actions}
    return {k.replace('-', '_'): _convert(actions[k.replace('-', '_')], v) for k, v in cfg.items()}


def _convert(action: argparse.Action, value: Any) -> Any:
    """Apply the argument's type to YAML strings (YAML reads ``1e-3`` as a string), as argparse would."""
    if action.type is None or action.type is str:
        return value
    if isinstance(value, str):
        return action.type(value)
    if isinstance(value, list):
        return [action.type(v) if isinstance(v, str) else v for v in value]
    return value


def plain_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Arguments as plain Python types, so checkpoints load with ``torch.load(weights_only=True)``."""
    def _plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [_plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): _plain(x) for k, x in v.items()}
        return str(v)
    return {k: _plain(v) for k, v in vars(args).items()}


def atomic_write_text(path: str, text: str) -> None:
    """Write text so that readers never see half a file."""
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


class AtomicCheckpointSaver(utils.CheckpointSaver):
    """timm's CheckpointSaver with crash-safe writes and weights_only-loadable checkpoints.

    timm writes ``last`` via a temp file but unlinks the target first, and falls back to a plain copy for ``best``;
    here every file is complete before ``os.replace`` puts it in place. ``args`` is stored as a plain dict.
    """

    def _save(self, save_path, epoch, metric=None):
        save_state = {
            'epoch': epoch,
            'arch': self.args.model if self.args is not None else type(self.model).__name__.lower(),
            'state_dict': utils.get_state_dict(self.model, self.unwrap_fn),
            'optimizer': self.optimizer.state_dict(),
            'version': 2,  # timm: version < 2 incremented epoch before save
        }
        if self.args is not None:
            save_state['args'] = plain_args(self.args)
        if self.amp_scaler is not None:
            save_state[self.amp_scaler.state_dict_key] = self.amp_scaler.state_dict()
        if self.model_ema is not None:
            save_state['state_dict_ema'] = utils.get_state_dict(self.model_ema, self.unwrap_fn)
        if metric is not None:
            save_state['metric'] = metric
        if hasattr(self, 'state_dict'):  # timm >= 1.0.28 keeps its checkpoint history across resumes
            save_state['saver'] = self.state_dict(epoch, metric)
        atomic_write(save_path, lambda f: torch.save(save_state, f))

    def _replace(self, src, dst):
        os.replace(src, dst)  # atomic on POSIX and Windows; never leaves dst missing

    def _duplicate(self, src, dst):
        tmp = dst + '.partial'
        if os.path.exists(tmp):
            os.unlink(tmp)
        try:
            os.link(src, tmp)
        except (OSError, NotImplementedError):
            import shutil
            shutil.copy2(src, tmp)
        os.replace(tmp, dst)


def load_training_checkpoint(path: str) -> Dict[str, Any]:
    """Load a training checkpoint with ``weights_only=True`` (timm's Namespace args are allowed for its checkpoints)."""
    if not os.path.isfile(path):
        raise UsageError(f"--resume checkpoint '{path}' not found")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise UsageError(f"'{path}' is not a training checkpoint: expected a dict with 'state_dict', 'optimizer', "
                         f"'epoch' (use --initial-checkpoint for plain weights)")
    return checkpoint


def resume_training(checkpoint, model, optimizer=None, loss_scaler=None) -> int:
    """Restore model, optimizer and AMP scaler state; returns the epoch to start at."""
    model.load_state_dict(clean_state_dict(checkpoint['state_dict']))
    if optimizer is not None and 'optimizer' in checkpoint:
        optimizer.load_state_dict(checkpoint['optimizer'])
    if loss_scaler is not None and loss_scaler.state_dict_key in checkpoint:
        loss_scaler.load_state_dict(checkpoint[loss_scaler.state_dict_key])
    epoch = checkpoint.get('epoch', -1)
    return epoch + 1 if checkpoint.get('version', 1) > 1 else epoch


def trim_summary(filename: str, start_epoch: int) -> None:
    """Drop summary rows at or after ``start_epoch`` so a resumed run does not repeat them."""
    if not os.path.exists(filename):
        return
    with open(filename, encoding='utf-8') as f:
        lines = f.read().splitlines()
    if not lines:
        return
    keep = [lines[0]] + [ln for ln in lines[1:] if ln and int(float(ln.split(',')[0])) < start_epoch]
    atomic_write_text(filename, '\n'.join(keep) + '\n' if len(keep) > 1 else '')


def resolve_output_dir(args: argparse.Namespace) -> str:
    """The experiment folder; refuses one that already holds files unless resuming into it or --overwrite.

    Checked before anything is built, so a refused run costs nothing.
    """
    if args.experiment:
        output_dir = os.path.join(args.output or './output/train', args.experiment)
    elif args.resume and not args.output:
        output_dir = os.path.dirname(os.path.abspath(args.resume))  # continue where the checkpoint lives
    else:
        size = args.input_size[-1] if args.input_size else args.img_size
        parts = [datetime.now().strftime('%Y%m%d-%H%M%S'), safe_model_name(args.model)] + ([str(size)] if size else [])
        exp_name = '-'.join(parts)
        output_dir = os.path.join(args.output or './output/train', exp_name)
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not (args.resume or args.overwrite):
        raise UsageError(f"experiment folder '{output_dir}' already exists; pass --resume CHECKPOINT to continue it, "
                         f"--overwrite to replace its files, or choose another --experiment")
    return output_dir


def is_finite_everywhere(loss: torch.Tensor, args: argparse.Namespace) -> bool:
    """True when the loss is finite on every process (all ranks must agree to stop together)."""
    finite = torch.isfinite(loss.detach()).all().to(torch.float32).reshape(1)
    if args.distributed:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite.item())


def train_one_epoch(
        epoch: int,
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: nn.Module,
        args: argparse.Namespace,
        device: torch.device,
        lr_scheduler=None,
        amp_autocast=suppress,
        loss_scaler=None,
        model_ema=None,
        mixup_fn=None,
) -> Dict[str, float]:
    """One pass over the loader with gradient accumulation, clipping, AMP and EMA; returns the mean train loss."""
    if args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        if args.prefetcher and getattr(loader, 'mixup_enabled', False):
            loader.mixup_enabled = False
        elif mixup_fn is not None:
            mixup_fn.mixup_enabled = False

    model.train()
    losses_m = utils.AverageMeter()
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

        sync_context = model.no_sync if args.distributed and not need_update else suppress
        with sync_context():
            with amp_autocast():
                loss = loss_fn(model(input), target)
            if not is_finite_everywhere(loss, args):
                raise NonFiniteLossError(
                    f'loss is {loss.item()} at epoch {epoch}, step {batch_idx} of {num_batches} '
                    f'(update {num_updates + 1}); try a lower --lr, --clip-grad, or no --amp')
            scaled_loss = loss / accum_steps if accum_steps > 1 else loss
            if loss_scaler is not None:
                loss_scaler(scaled_loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                            parameters=model.parameters(), need_update=need_update)
            else:
                scaled_loss.backward()
                if need_update:
                    if args.clip_grad is not None:
                        utils.dispatch_clip_grad(model.parameters(), value=args.clip_grad, mode=args.clip_mode)
                    optimizer.step()

        losses_m.update(loss.item(), input.shape[0])
        update_sample_count += input.shape[0] * args.world_size
        if not need_update:
            continue

        num_updates += 1
        optimizer.zero_grad()
        if model_ema is not None:
            model_ema.update(model, step=num_updates)
        now = time.time()
        update_time_m.update(now - update_start_time)
        update_start_time = now

        if utils.is_primary(args) and (update_idx % args.log_interval == 0 or last_batch):
            lrs = [group['lr'] for group in optimizer.param_groups]
            _logger.info(
                f'Train: {epoch} [{update_idx:>4d}/{updates_per_epoch} '
                f'({100. * (update_idx + 1) / updates_per_epoch:>3.0f}%)]  '
                f'Loss: {losses_m.val:#.3g} ({losses_m.avg:#.3g})  '
                f'Throughput: {update_sample_count / max(update_time_m.val, 1e-9):>7.1f} img/s  '
                f'LR: {sum(lrs) / len(lrs):.3e}')
        update_sample_count = 0
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=losses_m.avg)

    loss_avg = losses_m.avg
    if args.distributed:
        loss_avg = utils.reduce_tensor(torch.tensor([loss_avg], device=device), args.world_size).item()
    return OrderedDict([('loss', loss_avg)])


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


def report_attention(model: nn.Module, dataset, output_dir: str, args: argparse.Namespace) -> Optional[Dict]:
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
        path = save_attention_plot(model, os.path.join(output_dir, 'attention.png'))  # written atomically
        print(f'Attention plot: {path}', flush=True)
    return assoc


def create_datasets(args: argparse.Namespace):
    """Train and (optional) eval datasets; raises DatasetError with one readable line when they cannot be opened."""
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
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


def infer_num_classes(args: argparse.Namespace, dataset) -> Optional[int]:
    """Classes of the dataset (known names, folder classes, torchvision ``classes``), so --num-classes is optional."""
    known = {'structured': 2, 'torch/cifar10': 10, 'torch/cifar100': 100, 'torch/svhn': 10}
    if (args.dataset or '').lower() in known:
        return known[args.dataset.lower()]
    reader = getattr(dataset, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or getattr(dataset, 'class_to_idx', None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(dataset, 'classes', None)
    return len(classes) if classes else None


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
    loader_train = create_loader(
        dataset_train, batch_size=args.batch_size, is_training=True, no_aug=args.no_aug,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, train_crop_mode=args.train_crop_mode,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, num_aug_repeats=args.aug_repeats, interpolation=train_interpolation,
        collate_fn=collate_fn, worker_seeding=args.worker_seeding, **common_loader)
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


def resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on the dataset (the built-in demo run needs none of them set)."""
    if not args.dataset and not args.data_dir:
        args.dataset = 'structured'
    structured = is_structured(args.dataset)
    if args.no_aug is None:
        args.no_aug = structured
    demo = structured and args.model == DEFAULT_MODEL
    if demo:
        # measured (docs/paper_experiments.md): one positional block with average pooling, so that every patch
        # token aggregates its attention row and passes it through the MLP before pooling, learns the hidden sets
        # (own-set association well above chance) within CPU minutes; the 7-block class-token model learns only the
        # count of +-w* patches at this budget. Model kwargs given on the command line take precedence.
        defaults = dict(STRUCTURED_DEMO_MODEL_KWARGS)
        if args.gp is not None:
            defaults.pop('global_pool')
        args.model_kwargs = {**defaults, **(args.model_kwargs or {})}
    if args.epochs is None:
        args.epochs = STRUCTURED_DEMO_EPOCHS if demo else 2
    if args.lr_base is None:
        args.lr_base = STRUCTURED_DEMO_LR_BASE if demo else 1e-3
    if structured:
        args.mean = args.mean or list(STRUCTURED_MEAN)
        args.std = args.std or list(STRUCTURED_STD)
        args.crop_pct = args.crop_pct or 1.0
    args.prefetcher = not args.no_prefetcher
    args.grad_accum_steps = max(1, args.grad_accum_steps)
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'


def build_model(args: argparse.Namespace) -> nn.Module:
    in_chans = args.in_chans or (args.input_size[0] if args.input_size else 3)
    model_args = dict(
        pretrained=args.pretrained, in_chans=in_chans, num_classes=args.num_classes, drop_rate=args.drop,
        drop_path_rate=args.drop_path, global_pool=args.gp, checkpoint_path=args.initial_checkpoint or None,
    )
    model_args = {k: v for k, v in model_args.items() if v is not None}
    try:
        model = create_model(args.model, **model_args, **args.model_kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise UsageError(f"unknown model '{args.model}': see timm.list_models('vit_posattn*')") from e
        raise
    except FileNotFoundError as e:
        raise UsageError(f"--initial-checkpoint '{args.initial_checkpoint}' not found") from e
    if args.num_classes is None:
        args.num_classes = model.num_classes
    return model


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train and evaluate; returns the final eval metrics and the output folder."""
    if not logging.root.handlers:
        utils.setup_default_logging()
    args, _ = parse_args(argv)
    for module in args.device_modules or []:
        importlib.import_module(module)
    resolve_defaults(args)
    # every rank checks the folder so all stop together; only rank 0 writes into it
    output_dir = resolve_output_dir(args)

    device = utils.init_distributed_device(args)
    if not utils.is_primary(args):
        logging.getLogger().setLevel(logging.WARNING)  # only rank 0 logs progress
    if args.distributed:
        _logger.info(f'Distributed training: {args.world_size} processes, device {args.device}.')
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    utils.random_seed(args.seed, args.rank)

    dataset_train, dataset_eval = create_datasets(args)
    if args.num_classes is None:
        args.num_classes = infer_num_classes(args, dataset_train)
    model = build_model(args)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    if utils.is_primary(args):
        _logger.info(f'Model {args.model} created, param count: {sum(p.numel() for p in model.parameters())}')
    data_config = resolve_data_config(vars(args), model=model, verbose=utils.is_primary(args))

    model.to(device=device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    amp_autocast, loss_scaler = suppress, None
    if args.amp:
        amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
        amp_autocast = partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == 'cuda' and amp_dtype == torch.float16:
            loss_scaler = utils.NativeScaler()

    loader_train, loader_eval, mixup_fn, mixup_active = create_loaders(
        args, dataset_train, dataset_eval, data_config, device)

    if not args.lr:
        global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if not args.lr_base_scale:
            args.lr_base_scale = 'sqrt' if any(o in args.opt.lower() for o in ('ada', 'lamb')) else 'linear'
        if args.lr_base_scale == 'sqrt':
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
        if utils.is_primary(args):
            _logger.info(f'Learning rate ({args.lr:g}) from --lr-base {args.lr_base:g} and global batch size '
                         f'{global_batch_size} ({args.lr_base_scale} scaling).')

    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)

    resume_epoch, checkpoint = None, None
    if args.resume:
        checkpoint = load_training_checkpoint(args.resume)
        resume_epoch = resume_training(
            checkpoint, model,
            optimizer=None if args.no_resume_opt else optimizer,
            loss_scaler=None if args.no_resume_opt else loss_scaler)
        if utils.is_primary(args):
            _logger.info(f"Resumed from '{args.resume}' (epoch {checkpoint.get('epoch')}).")

    model_ema = None
    if args.model_ema:  # created after moving to device and before DDP, as in timm
        model_ema = utils.ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
        if checkpoint is not None:
            model_ema.module.load_state_dict(
                clean_state_dict(checkpoint.get('state_dict_ema', checkpoint['state_dict'])))

    train_model = model
    if args.torchcompile:
        train_model = torch.compile(model, backend=args.torchcompile)
    if args.distributed:
        train_model = NativeDDP(train_model, device_ids=[device] if device.type == 'cuda' else None,
                                broadcast_buffers=not args.no_ddp_bb)

    train_loss_fn = create_train_loss(args, mixup_active).to(device)
    validate_loss_fn = nn.CrossEntropyLoss().to(device)

    eval_metric = args.eval_metric if loader_eval is not None else 'loss'
    decreasing_metric = eval_metric == 'loss'
    saver = None
    if utils.is_primary(args):
        os.makedirs(output_dir, exist_ok=True)
        saver = AtomicCheckpointSaver(
            model=model, optimizer=optimizer, args=args, model_ema=model_ema, amp_scaler=loss_scaler,
            checkpoint_dir=output_dir, recovery_dir=output_dir, decreasing=decreasing_metric,
            max_history=args.checkpoint_hist)
        if checkpoint is not None and 'saver' in checkpoint and hasattr(saver, 'load_state_dict') \
                and os.path.dirname(os.path.abspath(args.resume)) == os.path.abspath(output_dir):
            saver.load_state_dict(checkpoint['saver'])
        atomic_write_text(os.path.join(output_dir, 'args.yaml'),
                          yaml.safe_dump(plain_args(args), default_flow_style=False))

    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=decreasing_metric), updates_per_epoch=updates_per_epoch)
    start_epoch = args.start_epoch if args.start_epoch is not None else (resume_epoch or 0)
    if lr_scheduler is not None and start_epoch > 0:
        if args.sched_on_updates:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)
    summary_path = os.path.join(output_dir, 'summary.csv') if utils.is_primary(args) else None
    if summary_path:
        trim_summary(summary_path, start_epoch)
    if utils.is_primary(args):
        _logger.info(f'Training epochs {start_epoch}..{num_epochs - 1}, {updates_per_epoch} updates per epoch; '
                     f'output in {output_dir}')

    eval_metrics = None
    for epoch in range(start_epoch, num_epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_metrics = train_one_epoch(
            epoch, train_model, loader_train, optimizer, train_loss_fn, args, device,
            lr_scheduler=lr_scheduler, amp_autocast=amp_autocast, loss_scaler=loss_scaler,
            model_ema=model_ema, mixup_fn=mixup_fn)

        eval_metrics = None
        if loader_eval is not None:
            eval_metrics = validate(train_model, loader_eval, validate_loss_fn, args, device, amp_autocast)
            if model_ema is not None:
                eval_metrics = validate(model_ema.module, loader_eval, validate_loss_fn, args, device,
                                        amp_autocast, log_suffix=' (EMA)')
        if summary_path:
            lrs = [group['lr'] for group in optimizer.param_groups]
            utils.update_summary(epoch, train_metrics, eval_metrics, filename=summary_path,
                                 lr=sum(lrs) / len(lrs), write_header=epoch == 0 or not os.path.exists(summary_path))
        latest_metric = (eval_metrics or train_metrics)[eval_metric]
        if saver is not None:
            best_metric, best_epoch = saver.save_checkpoint(epoch, metric=latest_metric)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, latest_metric)

    if args.distributed:
        torch.distributed.destroy_process_group()
    result = {'output_dir': output_dir, 'eval': eval_metrics, 'association': None}
    if utils.is_primary(args):
        if eval_metrics is not None:
            print(f"Final top-1: {eval_metrics['top1']:.2f}%  top-5: {eval_metrics['top5']:.2f}%  "
                  f"({args.dataset or 'folder'}/{args.val_split})", flush=True)
        if saver is not None and saver.best_metric is not None:
            print(f'Best {eval_metric}: {saver.best_metric:.4f} (epoch {saver.best_epoch})', flush=True)
        final_model = model_ema.module if model_ema is not None else model
        result['association'] = report_attention(final_model, dataset_train, output_dir, args)
    return result


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: errors the user can fix are one line on stderr and a non-zero exit code."""
    try:
        main(argv)
    except (DatasetError, UsageError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f'error: training stopped, {e}', file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print('interrupted: the last completed epoch is in last.pth.tar', file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(run())
