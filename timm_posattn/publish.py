"""Publish a train.py checkpoint as a Hugging Face Hub model folder (and optionally upload it).

    python -m timm_posattn.publish --checkpoint output/train/.../model_best.pth.tar \\
        --model vit_posattn_small_patch4_32 --out hub/vit_posattn_small_patch4_32.cifar10 \\
        --results output/train/.../summary.csv [--repo-id timm-posattn/vit_posattn_small_patch4_32.cifar10]

The folder is timm's own format (``timm.models.save_for_hf``: model.safetensors + config.json) plus a model
card (README.md) rendered from ``model_cards/`` with numbers measured on this checkpoint only. It is written
next to ``--out`` under a temporary name, loaded back with ``timm.create_model('local-dir:...')`` and compared
with the source model's logits; only a verified folder is moved into place and, with ``--repo-id``, uploaded.
"""
import argparse
import csv
import inspect
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import timm
import yaml
from timm.models import save_for_hf, split_model_name_tag
from timm.models import clean_state_dict

from . import hub

_logger = logging.getLogger('timm_posattn.publish')

# train.py arguments that shape the model (passed to timm.create_model) and the preprocessing (config.json)
_MODEL_ARG_KEYS = ('num_classes', 'in_chans', 'img_size')
_DATA_ARG_KEYS = ('input_size', 'img_size', 'in_chans', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_CFG_DATA_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation')
_HUB_FILES = ('config.json', hub.WEIGHTS_NAME, 'pytorch_model.bin')


class VerificationError(RuntimeError):
    """The written folder does not reproduce the source model; nothing is published."""


class RefusedOverwrite(FileExistsError):
    """The destination already holds a model and --force was not given."""


def load_train_checkpoint(path: str, use_ema: bool = True) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Weights and metadata of a train.py checkpoint (EMA weights preferred when present).

    Returns:
        (state_dict, info) where info holds arch, epoch, args (dict), metric and which weights were taken.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(
            f'Could not load {path} with torch.load(weights_only=True): {e}. Expected a train.py checkpoint '
            f"(a dict with 'state_dict', 'arch', 'epoch', 'args' as plain dict).") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f'{path}: expected a checkpoint dict, got {type(ckpt).__name__}.')
    if 'state_dict' not in ckpt and 'state_dict_ema' not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            ckpt = {'state_dict': ckpt}  # a bare state dict, as timm's clean_checkpoint.py writes
        else:
            raise ValueError(f"{path}: no 'state_dict' in checkpoint (keys: {sorted(ckpt)[:10]}).")
    weights = 'state_dict_ema' if use_ema and ckpt.get('state_dict_ema') else 'state_dict'
    args = ckpt.get('args') or {}
    if not isinstance(args, dict):
        raise ValueError(f"{path}: 'args' must be a plain dict (got {type(args).__name__}).")
    info = dict(arch=ckpt.get('arch'), epoch=ckpt.get('epoch'), args=args, metric=ckpt.get('metric'),
                weights=weights, has_ema=bool(ckpt.get('state_dict_ema')), checkpoint=os.path.basename(path))
    return clean_state_dict(ckpt[weights]), info


def build_source_model(model_name: str, state_dict: Dict[str, torch.Tensor], args: Dict[str, Any]) -> torch.nn.Module:
    """Rebuild the trained model from its train.py arguments and load the weights strictly."""
    kwargs = {k: args[k] for k in _MODEL_ARG_KEYS if args.get(k) is not None}
    if args.get('input_size'):
        kwargs['in_chans'] = args['input_size'][0]
        kwargs['img_size'] = tuple(args['input_size'][1:])
    if args.get('gp'):
        kwargs['global_pool'] = args['gp']
    kwargs.update(args.get('model_kwargs') or {})
    if 'num_classes' not in kwargs and 'head.weight' in state_dict:
        kwargs['num_classes'] = state_dict['head.weight'].shape[0]
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f'Checkpoint weights do not fit {model_name} built with {kwargs}: missing {missing[:5]}, '
            f'unexpected {unexpected[:5]}. Is --model the architecture the checkpoint was trained with?')
    return model.eval()


def data_config_from_args(args: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing train.py used (mean/std/crop/interpolation), for config.json's pretrained_cfg."""
    return {k: args[k] for k in _DATA_ARG_KEYS if args.get(k) not in (None, '')}


def measure_model(model: torch.nn.Module, input_size: Sequence[int], device: str = 'cpu', batch_size: int = 64,
                  min_seconds: float = 1.0, benchmark: bool = True) -> Dict[str, Any]:
    """Params, GMACs (torch.utils.flop_counter, MACs = FLOPs / 2) and inference img/s on this machine.

    vit_posattn models cache their input-independent positional attention in eval mode without grad, so a
    batch's cost per image (``gmacs``) excludes computing it; ``gmacs_uncached`` is one image with the attention
    computed (as in training). Models without such a cache report the same number twice.
    """
    from torch.utils.flop_counter import FlopCounterMode
    stats: Dict[str, Any] = dict(params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    model.eval()
    x = torch.randn(1, *input_size)
    with FlopCounterMode(display=False) as counter:
        model(x)  # grad enabled: no cache, attention computed from the positional encodings
    stats['gmacs_uncached'] = counter.get_total_flops() / 2 / 1e9
    with torch.no_grad():
        model(x)  # fills the cache (if the model has one) outside the counter
        with FlopCounterMode(display=False) as counter:
            model(x)
    stats['gmacs'] = counter.get_total_flops() / 2 / 1e9
    if not benchmark:
        return stats
    bench_model = model.to(device)
    x = torch.randn(batch_size, *input_size, device=device)
    with torch.no_grad():
        bench_model(x)  # warm-up
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        iters, start = 0, time.perf_counter()
        while True:
            bench_model(x)
            iters += 1
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and iters >= 3:
                break
    model.to('cpu')
    stats['img_per_sec'] = iters * batch_size / elapsed
    stats['bench_device'] = _describe_device(device)
    stats['bench_batch_size'] = batch_size
    return stats


def _describe_device(device: str) -> str:
    if device.startswith('cuda'):
        return f'{torch.cuda.get_device_name(device)} (fp32, torch {torch.__version__})'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return f'CPU {cpu}, {torch.get_num_threads()} threads (fp32, torch {torch.__version__})'


def export_folder(model: torch.nn.Module, folder: Path, data_config: Dict[str, Any],
                  model_config: Dict[str, Any]) -> None:
    """Write timm's Hub format (model.safetensors + config.json) into ``folder``.

    The preprocessing also goes in as pretrained_cfg overrides, so timm versions whose save_for_hf has no
    ``data_config`` argument still record it.
    """
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items() if k in _CFG_DATA_KEYS}
    model_config = dict(model_config, pretrained_cfg={**overrides, **model_config.get('pretrained_cfg', {})})
    extra = {'data_config': data_config} if 'data_config' in inspect.signature(save_for_hf).parameters else {}
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True, **extra)


def verify_folder(folder: Path, source: torch.nn.Module, atol: float = 1e-5, seed: int = 0) -> float:
    """Load the folder back like a user would and compare logits with the source model on a fixed batch."""
    loaded = hub.load_model(f'local-dir:{folder}').eval()
    input_size = loaded.pretrained_cfg['input_size']
    if loaded.num_classes != source.num_classes:
        raise VerificationError(f'Loaded model has {loaded.num_classes} classes, source has {source.num_classes}.')
    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        diff = (loaded(x) - source(x)).abs().max().item()
    if not diff <= atol:
        raise VerificationError(f'Logits of the folder loaded back differ from the source model by {diff:.3g} '
                                f'(> {atol:g}); nothing was published.')
    return diff


def _matching_label_names(model: torch.nn.Module) -> Optional[Sequence[str]]:
    """Label names of the model's own pretrained cfg, when they fit its classifier."""
    names = model.pretrained_cfg.get('label_names')
    return names if names and len(names) == model.num_classes else None


def _make_shareable(folder: Path) -> None:
    """mkdtemp and safetensors create private files; give the published folder the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Atomically put the verified folder at ``out``; an existing non-empty folder needs ``force``."""
    if out.exists() and not out.is_dir():
        raise RefusedOverwrite(f'{out} exists and is not a folder.')
    if _is_nonempty_dir(out):
        if not force:
            raise RefusedOverwrite(f'{out} is not empty; pass --force to replace it.')
        old = out.with_name(f'.{out.name}.old-{os.getpid()}')
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)


def _hf_api(token: Optional[str] = None):
    from huggingface_hub import HfApi
    return HfApi(token=token, library_name='timm_posattn')


def check_upload_allowed(repo_id: str, revision: Optional[str] = None, force: bool = False, api=None) -> bool:
    """Refuse (RefusedOverwrite) when the repo's branch already holds a model and ``force`` is off.

    Returns whether the branch exists.
    """
    from huggingface_hub.utils import RevisionNotFoundError
    api = api or _hf_api()
    branch = revision or 'main'
    if not api.repo_exists(repo_id):
        return False
    try:
        existing = set(api.list_repo_files(repo_id, revision=branch))
    except RevisionNotFoundError:
        return False
    clash = sorted(existing.intersection(_HUB_FILES))
    if clash and not force:
        raise RefusedOverwrite(
            f'{repo_id}@{branch} already holds {clash}; pass --force to overwrite it, or --revision NEW_BRANCH.')
    return True


def upload_folder(folder: Path, repo_id: str, revision: Optional[str] = None, force: bool = False,
                  private: bool = False, commit_message: Optional[str] = None, token: Optional[str] = None):
    """Upload a verified folder; refuses when the repo (branch) already holds a model and ``force`` is off.

    The token comes from ``token``, else huggingface_hub's usual sources (HF_TOKEN, ``hf auth login``).
    """
    api = _hf_api(token)
    branch = revision or 'main'
    branch_exists = check_upload_allowed(repo_id, revision, force, api)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch != 'main' and not branch_exists:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=branch,
                             commit_message=commit_message or f'Publish {repo_id} with timm_posattn.publish')


# ---------------------------------------------------------------------------------------------------------------
# Model card: numbers come only from this checkpoint's summary.csv row and from measure_model()

CARDS_DIR = Path(__file__).resolve().parents[1] / 'model_cards'
_CARD_FAMILIES = ((re.compile(r'_patch\d+_32$'), 'vit_posattn_patch4_32.md'),
                  (re.compile(r'.*'), 'vit_posattn_patch16_224.md'))
NOT_MEASURED = 'not measured'
# local paths of the training machine, and values train.py sets at run time (not arguments of train.py)
_UNPUBLISHED_ARGS = {'data_dir', 'data', 'output', 'resume', 'initial_checkpoint', 'log_wandb', 'experiment',
                     'config', 'distributed', 'world_size', 'rank', 'local_rank', 'prefetcher'}

CIFAR10_LABELS = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
CIFAR100_LABELS = tuple(
    'apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle '
    'caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant '
    'flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man '
    'maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree '
    'plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper '
    'snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor '
    'train trout tulip turtle wardrobe whale willow_tree wolf woman worm'.split())

# dataset key -> card facts; hub_id is the Hugging Face dataset id for the card metadata (None: not on the Hub)
DATASETS: Dict[str, Dict[str, Any]] = {
    'cifar10': dict(title='CIFAR-10', hub_id='cifar10', label_names=CIFAR10_LABELS),
    'cifar100': dict(title='CIFAR-100', hub_id='cifar100', label_names=CIFAR100_LABELS),
    'svhn': dict(title='SVHN', hub_id='svhn', label_names=tuple(str(i) for i in range(10))),
    'imagenet': dict(title='ImageNet-1k', hub_id='imagenet-1k', label_names=None),
    'structured': dict(title='Synthetic spatially structured dataset (timm_posattn.structured)', hub_id=None,
                       phrase="the paper's synthetic spatially structured dataset (`timm_posattn.structured`)",
                       label_names=('-1', '+1'), synthetic=True),
}
_DATASET_ALIASES = {'imagenet1k': 'imagenet', 'imagenet-1k': 'imagenet', 'in1k': 'imagenet'}


def dataset_info(name: Optional[str], num_classes: int) -> Dict[str, Any]:
    """Card facts for train.py's ``--dataset`` (``torch/cifar10``, ``structured``, ...); unknown names kept as given."""
    key = (name or '').split('/')[-1].lower()
    key = _DATASET_ALIASES.get(key, key)
    info = dict(DATASETS.get(key) or dict(title=name or 'unknown dataset', hub_id=None, label_names=None))
    info['key'] = key or None
    info.setdefault('phrase', info['title'])
    if key == 'imagenet' and num_classes == 1000:
        from timm.data import ImageNetInfo
        info['label_names'] = tuple(ImageNetInfo().label_names())
    if info['label_names'] is not None and len(info['label_names']) != num_classes:
        info['label_names'] = None  # a subset / relabelled run: better no names than wrong names
    return info


def read_summary(path: str) -> List[Dict[str, float]]:
    """Rows of a train.py ``summary.csv`` (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr) as numbers."""
    with open(path, newline='') as f:
        rows = list(csv.DictReader(f))
    if not rows or 'epoch' not in rows[0] or 'eval_top1' not in rows[0]:
        raise ValueError(f'{path}: expected a train.py summary.csv with at least epoch and eval_top1 columns.')
    parsed = []
    for row in rows:
        parsed.append({k: float(v) for k, v in row.items() if k and v not in (None, '')})
    return parsed


def select_result(rows: List[Dict[str, float]], epoch: Optional[int],
                  like: Optional[Tuple[Optional[Dict[str, Any]], List[Dict[str, float]]]] = None
                  ) -> Optional[Dict[str, Any]]:
    """The summary row measured on the published checkpoint (its epoch), or for a twin run the row picked the
    same way (final epoch or best eval_top1) as the published one. None when there is no such row."""
    if like is not None:
        reference, _ = like
        if reference is None:
            return None
        row = rows[-1] if reference['selection'] == 'final' else max(rows, key=lambda r: r['eval_top1'])
        return dict(row, selection=reference['selection'])
    if epoch is None:
        return None
    matches = [r for r in rows if int(r['epoch']) == int(epoch)]
    if not matches:
        return None
    row = matches[-1]
    if row is rows[-1]:
        selection = 'final'
    elif row['eval_top1'] >= max(r['eval_top1'] for r in rows):
        selection = 'best'
    else:
        selection = f'epoch {int(epoch)}'
    return dict(row, selection=selection)


def _check_result_matches_checkpoint(result: Dict[str, Any], info: Dict[str, Any], results: str) -> None:
    """The checkpoint stores the metric train.py ranked it by; a summary.csv of another run will not match it."""
    metric_name = f"eval_{info['args'].get('eval_metric', 'top1')}"
    if info['metric'] is not None and metric_name in result and abs(result[metric_name] - info['metric']) > 1e-4:
        raise ValueError(
            f"{results}: {metric_name}={result[metric_name]} at epoch {info['epoch']}, but the checkpoint recorded "
            f"{info['metric']}: this summary.csv is not from the run that wrote the checkpoint.")


def find_card_template(architecture: str, override: Optional[str] = None) -> str:
    """Template text for the model family (small-image ``*_patch4_32`` or ImageNet ``*_patch16_224``)."""
    if override:
        return Path(override).read_text(encoding='utf-8')
    name = next(file for pattern, file in _CARD_FAMILIES if pattern.search(architecture))
    path = CARDS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f'Model card template {path} not found; run publish from a timm_posattn checkout '
                                f'or pass --card-template.')
    return path.read_text(encoding='utf-8')


def describe_architecture(model: torch.nn.Module) -> Dict[str, Any]:
    """Architecture facts read off the built model (not from names), for the card."""
    blocks = getattr(model, 'blocks', [])
    first_attn = getattr(blocks[0], 'attn', None) if len(blocks) else None
    mlp_fc1 = getattr(getattr(blocks[0], 'mlp', None), 'fc1', None) if len(blocks) else None
    facts = dict(
        depth=len(blocks),
        embed_dim=getattr(model, 'embed_dim', None),
        num_heads=getattr(first_attn, 'num_heads', None),
        mlp_hidden=getattr(mlp_fc1, 'out_features', None),
        patch_size=tuple(getattr(model.patch_embed, 'patch_size', ())) if hasattr(model, 'patch_embed') else None,
        num_classes=model.num_classes,
    )
    pos_attn = getattr(model, 'pos_attn_indices', None)
    facts['positional_blocks'] = list(pos_attn) if pos_attn is not None else None
    return facts


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return NOT_MEASURED if value is None else f'{value:.{digits}f}'


def _front_matter(model_name: str, repo_id: Optional[str], dataset: Dict[str, Any], result: Optional[Dict[str, Any]],
                  num_classes: int, card_license: str) -> str:
    meta: Dict[str, Any] = dict(
        library_name='timm', license=card_license, pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'timm_posattn', 'positional-attention', 'vision-transformer'])
    if dataset.get('synthetic'):
        meta['tags'].append('synthetic-data')
    if dataset.get('hub_id'):
        meta['datasets'] = [dataset['hub_id']]
    meta['metrics'] = ['accuracy']
    if result is not None:
        metrics = [dict(type='accuracy', name='Top-1 accuracy (%)', value=round(result['eval_top1'], 4))]
        if 'eval_top5' in result and num_classes > 5:
            metrics.append(dict(type='top_5_accuracy', name='Top-5 accuracy (%)', value=round(result['eval_top5'], 4)))
        meta['model-index'] = [dict(name=(repo_id or model_name).split('/')[-1], results=[dict(
            task=dict(type='image-classification', name='Image Classification'),
            dataset=dict(name=dataset['title'], type=dataset.get('hub_id') or dataset.get('key') or 'unknown'),
            metrics=metrics)])]
    return '---\n' + yaml.safe_dump(meta, sort_keys=False) + '---'


def _results_table(result: Optional[Dict[str, Any]], stats: Dict[str, Any], input_size: Sequence[int],
                   eval_split: str, num_classes: int) -> str:
    if result is not None:
        source = f"train.py evaluation on the `{eval_split}` split, {result['selection']} epoch " \
                 f"{int(result['epoch'])} (summary.csv row of this checkpoint)"
    else:
        source = 'no summary.csv row for this checkpoint was supplied'
    top1 = _fmt(result.get('eval_top1') if result else None)
    top5 = _fmt(result.get('eval_top5') if result else None)
    top5_how = source
    if num_classes <= 5:
        top5, top5_how = 'n/a', f'{num_classes} classes: top-5 is always 100%'
    shape = 'x'.join(str(s) for s in input_size)
    if 'img_per_sec' in stats:
        speed = _fmt(stats['img_per_sec'], 1)
        speed_how = f"{stats['bench_device']}, batch {stats['bench_batch_size']}, inference"
    else:
        speed, speed_how = NOT_MEASURED, 'benchmark skipped'
    return '\n'.join([
        '| Metric | Value | Measured how |', '|---|---|---|',
        f'| Top-1 accuracy (%) | {top1} | {source} |',
        f'| Top-5 accuracy (%) | {top5} | {top5_how} |',
        f"| Params (M) | {_fmt(stats['params_m'])} | counted on the published weights |",
        f"| GMACs | {_fmt(stats['gmacs'], 3)} | torch.utils.flop_counter at 1x{shape} (FLOPs / 2), inference |",
        f"| GMACs, attention computed | {_fmt(stats['gmacs_uncached'], 3)} | same, positional attention not cached "
        f"(training forward; inference computes it once, not per image) |",
        f'| Throughput (img/s) | {speed} | {speed_how} |',
    ])


def _comparison(result: Optional[Dict[str, Any]], twin: Optional[Dict[str, Any]], num_classes: int,
                standard: bool = False) -> str:
    if standard:
        return ('This model is itself the standard-attention twin; see the card of the positional-attention model '
                'trained with the same recipe.')
    if twin is None or result is None:
        return (f'{NOT_MEASURED.capitalize()}: no standard-attention twin (`pos_attn_layers=none`) trained with '
                f'the same recipe was supplied when this card was written.')
    rows = ['| Model | Top-1 (%) | Top-5 (%) | Epoch |', '|---|---|---|---|']
    for label, r in (('this model (positional attention)', result), ('standard-attention twin', twin)):
        top5 = _fmt(r.get('eval_top5')) if num_classes > 5 else 'n/a'
        rows.append(f"| {label} | {_fmt(r.get('eval_top1'))} | {top5} | {int(r['epoch'])} |")
    return ('Same train.py recipe with `--model-kwargs pos_attn_layers=none` (ordinary attention in every block), '
            f"{twin['selection']} epoch of each run as logged in its summary.csv:\n\n" + '\n'.join(rows))


def _training_args(args: Dict[str, Any]) -> str:
    if not args:
        return f'Training arguments: {NOT_MEASURED} (the checkpoint holds no args).'
    shown = {k: v for k, v in args.items() if k not in _UNPUBLISHED_ARGS and v is not None}
    recipe = ''
    if args.get('config'):
        recipe = f"Recipe file: `{args['config']}` (`python train.py -c {args['config']} --data-dir DATA`).\n\n"
    return (recipe + 'Arguments of the train.py run, as stored in the checkpoint (unset ones and local paths '
            'left out). Saved as `args.yaml`, `python train.py -c args.yaml --data-dir DATA` repeats the run:'
            '\n\n```yaml\n' + yaml.safe_dump(shown, sort_keys=True, default_flow_style=None) + '```')


def render_model_card(template: str, model_name: str, config: Dict[str, Any], info: Dict[str, Any],
                      stats: Dict[str, Any], result: Optional[Dict[str, Any]], twin: Optional[Dict[str, Any]],
                      dataset: Dict[str, Any], architecture: Dict[str, Any], repo_id: Optional[str] = None,
                      card_license: str = 'apache-2.0') -> str:
    """Fill a ``model_cards/*.md`` template (``string.Template`` ``$names``) with this checkpoint's facts."""
    from string import Template
    cfg = config['pretrained_cfg']
    args = info['args']
    load_name = f'hf-hub:{repo_id}' if repo_id else 'local-dir:PATH/TO/THIS/FOLDER'
    synthetic_note = ''
    if dataset.get('synthetic'):
        synthetic_note = ('> **Trained on synthetic data.** The training set is the spatially structured dataset of '
                          'Jelassi et al. (2022) generated by `timm_posattn.structured`, not natural images. The '
                          'weights demonstrate the paper\'s mechanism and are not useful as an image classifier.\n')
    weights = 'the EMA weights' if info['weights'] == 'state_dict_ema' else 'the (non-EMA) model weights'
    pos_blocks = architecture.get('positional_blocks')
    if pos_blocks is None:
        attention_summary = 'attention (an architecture without positional attention)'
    elif not pos_blocks:
        attention_summary = ('**standard attention** in every block: the standard-attention twin '
                             '(`pos_attn_layers=none`) of the positional-attention models')
    elif len(pos_blocks) == architecture['depth']:
        attention_summary = '**positional attention** in every block'
    else:
        attention_summary = f'**positional attention** in blocks {pos_blocks} and standard attention in the others'
    values = dict(
        front_matter=_front_matter(model_name, repo_id, dataset, result, config['num_classes'], card_license),
        model_name=model_name,
        architecture=config['architecture'],
        dataset=dataset['phrase'],
        synthetic_note=synthetic_note,
        attention_summary=attention_summary,
        load_name=load_name,
        num_classes=config['num_classes'],
        input_size='x'.join(str(s) for s in cfg['input_size']),
        mean=tuple(round(m, 4) for m in cfg['mean']), std=tuple(round(s, 4) for s in cfg['std']),
        crop_pct=cfg.get('crop_pct'), interpolation=cfg.get('interpolation'),
        depth=architecture.get('depth'), embed_dim=architecture.get('embed_dim'),
        num_heads=architecture.get('num_heads'), mlp_hidden=architecture.get('mlp_hidden'),
        patch_size='x'.join(str(p) for p in architecture.get('patch_size') or ()) or NOT_MEASURED,
        positional_blocks=(f'{len(pos_blocks)} of {architecture["depth"]} (blocks {pos_blocks})'
                           if pos_blocks is not None else 'none (architecture without positional attention)'),
        model_args=json.dumps(config.get('model_args', {}), sort_keys=True),
        checkpoint=info['checkpoint'], epoch=info['epoch'] if info['epoch'] is not None else NOT_MEASURED,
        weights=weights,
        training_args=_training_args(args),
        results_table=_results_table(result, stats, cfg['input_size'], args.get('val_split', 'validation'),
                                     config['num_classes']),
        comparison=_comparison(result, twin, config['num_classes'], standard=pos_blocks is not None and not pos_blocks),
    )
    return Template(template).substitute(values)


def release_entry(repo_id: str, commit: Optional[str], weights_sha256: str) -> Dict[str, Any]:
    """The releases.json entry that makes a tag advertise these weights."""
    return dict(status='published', hf_hub_id=repo_id, revision=commit, sha256=weights_sha256)


def publish(checkpoint: str, model_name: str, out: str, repo_id: Optional[str] = None,
            results: Optional[str] = None, twin_results: Optional[str] = None, force: bool = False,
            revision: Optional[str] = None, use_ema: bool = True, card_template: Optional[str] = None,
            benchmark: bool = True, bench_device: str = 'cpu', card_license: str = 'apache-2.0',
            atol: float = 1e-5) -> Dict[str, Any]:
    """Export, document, verify and (with ``repo_id``) upload one checkpoint. Returns a summary dict."""
    out_path = Path(out).resolve()
    if _is_nonempty_dir(out_path) and not force:
        raise RefusedOverwrite(f'{out_path} is not empty; pass --force to replace it.')
    architecture, tag = split_model_name_tag(model_name)
    hub.require_registered(architecture, '--model')
    if repo_id:
        check_upload_allowed(repo_id, revision, force)  # fail before the work, not after it
    state_dict, info = load_train_checkpoint(checkpoint, use_ema=use_ema)
    if info['arch'] and split_model_name_tag(info['arch'])[0] != architecture:
        raise ValueError(f"Checkpoint was trained as {info['arch']!r}, not {architecture!r} (--model).")
    args = info['args']
    source = build_source_model(model_name, state_dict, args)
    data_config = data_config_from_args(args)

    rows = read_summary(results) if results else []
    result = select_result(rows, info['epoch']) if rows else None
    if result is not None:
        _check_result_matches_checkpoint(result, info, results)
        if info['has_ema'] and info['weights'] != 'state_dict_ema':
            _logger.warning('train.py evaluated the EMA weights, not the non-EMA weights published with --no-ema: '
                            'the card reports their accuracy as not measured.')
            result = None
    twin_rows = read_summary(twin_results) if twin_results else []
    twin = select_result(twin_rows, None, like=(result, rows)) if twin_rows else None

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_path.name}.tmp-', dir=out_path.parent))
    try:
        model_config = {hub.PUBLISH_INFO_KEY: dict(
            timm_posattn_version=_package_version(), source_checkpoint=info['checkpoint'], weights=info['weights'],
            epoch=info['epoch'])}
        dataset = dataset_info(args.get('dataset'), source.num_classes)
        if dataset['key'] not in DATASETS and tag:
            dataset = dataset_info(tag, source.num_classes)  # e.g. an ImageNet folder ('' dataset) published as .in1k
        # what the weights are, not what the source model's default tag was
        model_config['pretrained_cfg'] = dict(num_classes=source.num_classes, license=card_license)
        if tag or dataset['key']:
            model_config['pretrained_cfg']['tag'] = tag or dataset['key']
        label_names = dataset.get('label_names') or _matching_label_names(source)
        if label_names:
            model_config['label_names'] = list(label_names)
            model_config['pretrained_cfg']['label_names'] = list(label_names)
        export_folder(source, tmp, data_config, model_config)
        config = json.loads((tmp / 'config.json').read_text())
        weights_file = tmp / hub.WEIGHTS_NAME
        weights_sha256 = hub.sha256_file(weights_file)
        config[hub.PUBLISH_INFO_KEY]['weights_sha256'] = weights_sha256
        (tmp / 'config.json').write_text(json.dumps(config, indent=2))

        diff = verify_folder(tmp, source, atol=atol)
        stats = measure_model(source, config['pretrained_cfg']['input_size'], device=bench_device,
                              benchmark=benchmark)
        card = render_model_card(
            template=find_card_template(architecture, card_template), model_name=model_name, config=config,
            info=info, stats=stats, result=result, twin=twin, dataset=dataset,
            architecture=describe_architecture(source), repo_id=repo_id, card_license=card_license)
        (tmp / 'README.md').write_text(card, encoding='utf-8')
        _make_shareable(tmp)
        _move_into_place(tmp, out_path, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    summary = dict(out=str(out_path), max_logit_diff=diff, weights_sha256=weights_sha256, stats=stats,
                   result=result)
    if repo_id:
        commit = upload_folder(out_path, repo_id, revision=revision, force=force)
        summary['commit'] = getattr(commit, 'oid', None)
        summary['release_entry'] = release_entry(repo_id, summary['commit'], weights_sha256)
    return summary


def _package_version() -> str:
    from . import __version__
    return __version__


def _parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m timm_posattn.publish', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', required=True, help='train.py checkpoint (.pth.tar)')
    parser.add_argument('--model', required=True,
                        help='architecture it was trained as, with the tag to publish, '
                             'e.g. vit_posattn_small_patch4_32.cifar10')
    parser.add_argument('--out', required=True, help='folder to write (refused if not empty, unless --force)')
    parser.add_argument('--repo-id', default=None, help='upload to this Hugging Face repo (ORG/NAME) after verifying')
    parser.add_argument('--revision', default=None, help='branch to upload to (created if missing); default main')
    parser.add_argument('--results', default=None, help="train.py summary.csv of this run (for the card's numbers)")
    parser.add_argument('--twin-results', default=None,
                        help='summary.csv of the standard-attention twin (pos_attn_layers=none), same recipe')
    parser.add_argument('--force', action='store_true', help='replace an existing folder / hub model')
    parser.add_argument('--no-ema', action='store_true', help='publish state_dict even when EMA weights exist')
    parser.add_argument('--card-template', default=None, help='model card template (default: by model family)')
    parser.add_argument('--license', default='apache-2.0')
    parser.add_argument('--no-benchmark', action='store_true', help='skip the img/s measurement')
    parser.add_argument('--bench-device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--atol', type=float, default=1e-5, help='max abs logit difference when verifying')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    args = _parse_args(argv)
    try:
        summary = publish(
            args.checkpoint, args.model, args.out, repo_id=args.repo_id, results=args.results,
            twin_results=args.twin_results, force=args.force, revision=args.revision, use_ema=not args.no_ema,
            card_template=args.card_template, benchmark=not args.no_benchmark, bench_device=args.bench_device,
            card_license=args.license, atol=args.atol)
    except (VerificationError, RefusedOverwrite, hub.WeightsFileError, hub.UnknownArchitectureError,
            FileNotFoundError, ValueError) as e:
        _logger.error(f'publish failed: {e}')
        return 1
    _logger.info(f"Wrote and verified {summary['out']} (max |logit diff| {summary['max_logit_diff']:.2g}, "
                 f"model.safetensors sha256 {summary['weights_sha256']})")
    if 'release_entry' in summary:
        _logger.info('Uploaded. To advertise these weights, add this entry to timm_posattn/releases.json:\n'
                     + json.dumps(summary['release_entry'], indent=2))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
