"""Model cards for published checkpoints: a template per model family, filled with measured numbers only.

Numbers come only from the checkpoint's own ``summary.csv`` row (accuracy) and from ``publish.measure_model`` (params,
GMACs, throughput); anything else is written as "not measured" and left out of the card's YAML metadata.
"""
import csv
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml



# The templates live in model_cards/ at the top of the repository; the wheel ships them as timm_posattn/model_cards/.
CARD_DIRS = (Path(__file__).resolve().parent / 'model_cards', Path(__file__).resolve().parents[1] / 'model_cards')
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
    for directory in CARD_DIRS:
        if (directory / name).is_file():
            return (directory / name).read_text(encoding='utf-8')
    raise FileNotFoundError(f"Model card template {name} not found in {' or '.join(map(str, CARD_DIRS))}; "
                            f"reinstall timm_posattn or pass --card-template.")


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
