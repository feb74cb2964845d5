"""Model cards for published checkpoints: a template per model family, filled with measured numbers only.

Numbers come only from the checkpoint's own ``summary.csv`` row (accuracy), from publish's evaluation of the published
folder (``--dataset``: accuracy of exactly the published weights, `timm_posattn.evaluation`) and from
``publish.measure_model`` (params, GMACs, throughput); anything else is written as "not measured" and left out of
the card's metadata. The metadata (front matter) is built with ``huggingface_hub.ModelCardData`` / ``EvalResult``;
dataset facts come from `timm_posattn.dataset_info`; the positional attention layer is read off the built model.
"""
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import yaml

from .cli import UsageError
from .dataset_info import get_dataset_info
from .layers import get_pos_attn_layer, list_pos_attn_layers
from .loading import TrainCheckpoint
from .published import WEIGHTS_NAME

__all__ = [
    'CARD_DIRS', 'CARD_FAMILIES', 'NOT_MEASURED', 'CardDataset', 'card_dataset', 'read_summary', 'select_result',
    'check_result_matches_checkpoint', 'find_card_template', 'describe_architecture', 'front_matter',
    'render_model_card',
]

# The templates live in model_cards/ at the top of the repository; the wheel ships them as timm_posattn/model_cards/.
CARD_DIRS = (Path(__file__).resolve().parent / 'model_cards', Path(__file__).resolve().parents[1] / 'model_cards')
CARD_FAMILIES = ((re.compile(r'_patch\d+_32$'), 'vit_posattn_patch4_32.md'),
                 (re.compile(r'.*'), 'vit_posattn_patch16_224.md'))
NOT_MEASURED = 'not measured'
# local paths of the training machine, and values train.py sets at run time (not arguments of train.py)
_UNPUBLISHED_ARGS = {'data_dir', 'data', 'output', 'resume', 'initial_checkpoint', 'log_wandb', 'experiment',
                     'config', 'distributed', 'world_size', 'rank', 'local_rank', 'prefetcher'}


@dataclass(frozen=True)
class CardDataset:
    """What a card says about the training data (from `timm_posattn.dataset_info`; unknown names kept as given)."""
    key: Optional[str]
    title: str
    phrase: str  # how the card's sentences name it
    hub_id: Optional[str] = None
    label_names: Optional[Tuple[str, ...]] = None
    synthetic: bool = False


def card_dataset(name: Optional[str], num_classes: int, tag: Optional[str] = None) -> CardDataset:
    """Card facts for train.py's ``--dataset`` (``torch/cifar10``, ``structured``, ...), else for the published tag
    (an ImageNet folder, ``--dataset ''``, published as ``.in1k``). Label names only when they fit the head."""
    info = get_dataset_info(name) or get_dataset_info(tag)
    if info is None:
        title = name or 'unknown dataset'
        return CardDataset(key=None, title=title, phrase=title)
    labels = info.label_names
    if info.key == 'imagenet' and num_classes == 1000:
        from timm.data import ImageNetInfo
        labels = tuple(ImageNetInfo().label_names())
    if labels is not None and len(labels) != num_classes:
        labels = None  # a subset / relabelled run: better no names than wrong names
    return CardDataset(key=info.key, title=info.title, phrase=info.phrase or info.title, hub_id=info.hub_id,
                       label_names=labels, synthetic=info.synthetic)


def read_summary(path: str) -> List[Dict[str, float]]:
    """Rows of a train.py ``summary.csv`` (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr) as numbers."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UsageError(f"could not read results file '{path}': {e.strerror or e}") from None
    if not rows or 'epoch' not in rows[0] or 'eval_top1' not in rows[0]:
        raise UsageError(f'{path}: expected a train.py summary.csv with at least epoch and eval_top1 columns')
    try:
        return [{k: float(v) for k, v in row.items() if k and v not in (None, '')} for row in rows]
    except ValueError as e:
        raise UsageError(f'{path}: expected numbers in a train.py summary.csv ({e})') from None


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


def check_result_matches_checkpoint(result: Dict[str, Any], checkpoint: TrainCheckpoint, results: str) -> None:
    """The checkpoint stores the metric train.py ranked it by; a summary.csv of another run will not match it."""
    metric_name = f"eval_{checkpoint.args.get('eval_metric', 'top1')}"
    if checkpoint.metric is not None and metric_name in result and abs(result[metric_name] - checkpoint.metric) > 1e-4:
        raise UsageError(
            f'{results}: {metric_name}={result[metric_name]} at epoch {checkpoint.epoch}, but the checkpoint recorded '
            f'{checkpoint.metric}: this summary.csv is not from the run that wrote the checkpoint')


# the ``$names`` a card template may use: what `render_model_card` fills in
CARD_FIELDS = frozenset((
    'front_matter', 'model_name', 'architecture', 'dataset', 'synthetic_note', 'load_name', 'num_classes',
    'input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'depth', 'embed_dim', 'num_heads', 'mlp_hidden',
    'patch_size', 'model_args', 'checkpoint', 'epoch', 'weights', 'training_args', 'results_table', 'comparison',
    'attention_summary', 'pos_attn_layer_sentence', 'pos_attn_layer', 'positional_blocks',
))


def check_card_template(template: str, origin: str) -> str:
    """Refuse (one line, before any work) a template that `string.Template` cannot fill: a ``$`` that starts no
    name (write ``$$`` for a dollar sign) or a name no card has."""
    from string import Template
    unknown = []
    for match in Template.pattern.finditer(template):
        name = match.group('named') or match.group('braced')
        if match.group('invalid') is not None:
            line = template.count('\n', 0, match.start()) + 1
            raise UsageError(f"{origin}: a '$' on line {line} starts no field name (write $$ for a dollar sign)")
        if name is not None and name not in CARD_FIELDS:
            unknown.append(name)
    if unknown:
        raise UsageError(f"{origin}: unknown field(s) {', '.join('$' + n for n in sorted(set(unknown)))}; a card "
                         f"template may use {', '.join('$' + n for n in sorted(CARD_FIELDS))}")
    return template


def find_card_template(architecture: str, override: Optional[str] = None) -> str:
    """Template text for the model family (small-image ``*_patch4_32`` or ImageNet ``*_patch16_224``), checked."""
    if override:
        try:
            text = Path(override).read_text(encoding='utf-8')
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"could not read --card-template '{override}': "
                             f"{getattr(e, 'strerror', None) or e}") from None
        return check_card_template(text, f"--card-template '{override}'")
    name = next(file for pattern, file in CARD_FAMILIES if pattern.search(architecture))
    for directory in CARD_DIRS:
        if (directory / name).is_file():
            return (directory / name).read_text(encoding='utf-8')
    raise UsageError(f"model card template {name} not found in {' or '.join(map(str, CARD_DIRS))}; reinstall "
                     f"timm_posattn or pass --card-template")


def _pos_attn_layer(model: torch.nn.Module) -> Optional[Dict[str, str]]:
    """Name, class and formula of the positional attention layer of the model's positional blocks (None: none)."""
    pos_map = next((blk.attn.pos_map for blk in getattr(model, 'blocks', [])
                    if hasattr(getattr(blk, 'attn', None), 'pos_map')), None)
    if pos_map is None:
        return None
    cls = type(pos_map)
    names = [name for name in list_pos_attn_layers() if get_pos_attn_layer(name) is cls]
    formula = (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip('.')
    if isinstance(getattr(pos_map, 'norm', None), torch.nn.Identity):
        formula += ' (here without the LayerNorm of P: pos_attn_norm=False)'
    return dict(name=names[0] if names else cls.__name__, cls=cls.__name__, formula=formula)


def describe_architecture(model: torch.nn.Module) -> Dict[str, Any]:
    """Architecture facts read off the built model (not from names), for the card."""
    blocks = getattr(model, 'blocks', [])
    first_attn = getattr(blocks[0], 'attn', None) if len(blocks) else None
    mlp_fc1 = getattr(getattr(blocks[0], 'mlp', None), 'fc1', None) if len(blocks) else None
    pos_attn = getattr(model, 'pos_attn_indices', None)
    return dict(
        depth=len(blocks),
        embed_dim=getattr(model, 'embed_dim', None),
        num_heads=getattr(first_attn, 'num_heads', None),
        mlp_hidden=getattr(mlp_fc1, 'out_features', None),
        patch_size=tuple(getattr(model.patch_embed, 'patch_size', ())) if hasattr(model, 'patch_embed') else None,
        num_classes=model.num_classes,
        positional_blocks=list(pos_attn) if pos_attn is not None else None,
        pos_attn_layer=_pos_attn_layer(model),
    )


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return NOT_MEASURED if value is None else f'{value:.{digits}f}'


def front_matter(model_name: str, repo_id: Optional[str], dataset: CardDataset, result: Optional[Dict[str, Any]],
                 num_classes: int, card_license: str, eval_split: str = 'validation',
                 evaluation: Optional[Dict[str, Any]] = None) -> str:
    """The card's YAML metadata (``---`` block), built with huggingface_hub's ModelCardData and EvalResult; the
    accuracy measured on the published weights (``evaluation``) when there is one, else the training log's."""
    from huggingface_hub import EvalResult, ModelCardData
    tags = ['image-classification', 'timm', 'timm_posattn', 'positional-attention', 'vision-transformer']
    if dataset.synthetic:
        tags.append('synthetic-data')
    eval_results = None
    measured = None
    if evaluation is not None:
        evaluated = card_dataset(evaluation['dataset'], num_classes)
        measured = (evaluated, evaluation['split'], evaluation['top1'], evaluation.get('top5'))
    elif result is not None:
        measured = (dataset, eval_split, result['eval_top1'], result.get('eval_top5'))
    if measured is not None:
        on, split, top1, top5 = measured
        common = dict(task_type='image-classification', task_name='Image Classification',
                      dataset_type=on.hub_id or on.key or 'unknown', dataset_name=on.title, dataset_split=split)
        eval_results = [EvalResult(metric_type='accuracy', metric_name='Top-1 accuracy (%)',
                                   metric_value=round(top1, 4), **common)]
        if top5 is not None and num_classes > 5:
            eval_results.append(EvalResult(metric_type='top_5_accuracy', metric_name='Top-5 accuracy (%)',
                                           metric_value=round(top5, 4), **common))
    data = ModelCardData(
        library_name='timm', license=card_license, pipeline_tag='image-classification', tags=tags,
        datasets=[dataset.hub_id] if dataset.hub_id else None, metrics=['accuracy'],
        model_name=(repo_id or model_name).split('/')[-1] if eval_results else None, eval_results=eval_results)
    return f'---\n{data.to_yaml()}\n---'


def _accuracy_rows(label: str, top1: Optional[float], top5: Optional[float], how: str, num_classes: int
                   ) -> List[str]:
    top5_text, top5_how = _fmt(top5), how
    if num_classes <= 5:
        top5_text, top5_how = 'n/a', f'{num_classes} classes: top-5 is always 100%'
    return [f'| Top-1 accuracy (%){label} | {_fmt(top1)} | {how} |',
            f'| Top-5 accuracy (%){label} | {top5_text} | {top5_how} |']


def _results_table(result: Optional[Dict[str, Any]], stats: Dict[str, Any], input_size: Sequence[int],
                   eval_split: str, num_classes: int, evaluation: Optional[Dict[str, Any]] = None) -> str:
    if result is not None:
        source = f"train.py evaluation on the `{eval_split}` split, {result['selection']} epoch " \
                 f"{int(result['epoch'])} (summary.csv row of this checkpoint)"
    else:
        source = 'no summary.csv row for this checkpoint was supplied'
    accuracy = _accuracy_rows('', result.get('eval_top1') if result else None,
                              result.get('eval_top5') if result else None, source, num_classes)
    if evaluation is not None:  # measured on the published files themselves: first; the training log's after it
        how = (f"the published weights (this folder's {WEIGHTS_NAME}), evaluated by publish with validate.py's code "
               f"(timm_posattn.evaluation) on the `{evaluation['split']}` split of "
               f"{card_dataset(evaluation['dataset'], num_classes).title}, {evaluation['num_samples']:,} images, "
               f"preprocessing as in Model details")
        measured = _accuracy_rows('', evaluation['top1'], evaluation.get('top5'), how, num_classes)
        accuracy = measured + (_accuracy_rows(', training log', result.get('eval_top1'), result.get('eval_top5'),
                                              source, num_classes) if result is not None else [])
    shape = 'x'.join(str(s) for s in input_size)
    if 'img_per_sec' in stats:
        speed = _fmt(stats['img_per_sec'], 1)
        speed_how = f"the model as loaded, {stats['bench_device']}, batch {stats['bench_batch_size']}, inference"
    else:
        speed, speed_how = NOT_MEASURED, 'benchmark skipped'
    return '\n'.join([
        '| Metric | Value | Measured how |', '|---|---|---|',
        *accuracy,
        f"| Params (M) | {_fmt(stats['params_m'])} | counted on the published weights |",
        f"| GMACs | {_fmt(stats['gmacs'], 3)} | torch.utils.flop_counter's formulas, fused attention included "
        f"(timm_posattn.flops), one {shape} image (FLOPs / 2), the model "
        f"as loaded: every forward computes the positional attention A from its parameters |",
        f"| GMACs, reparameterized | {_fmt(stats['gmacs_reparameterized'], 3)} | same, after "
        f"`timm.utils.reparameterize_model(model)`: A baked into buffers (inference at {shape} only) |",
        f'| Throughput (img/s) | {speed} | {speed_how} |',
    ])


def _comparison(result: Optional[Dict[str, Any]], twin: Optional[Dict[str, Any]], num_classes: int,
                standard: bool = False) -> str:
    if standard:
        return ('This model is itself the standard-attention twin; see the card of the positional-attention model '
                'trained with the same recipe.')
    if twin is None or result is None:
        return (f'{NOT_MEASURED.capitalize()}: no standard-attention twin (`pos_attn_blocks=none`) trained with '
                f'the same recipe was supplied when this card was written.')
    rows = ['| Model | Top-1 (%) | Top-5 (%) | Epoch |', '|---|---|---|---|']
    for label, r in (('this model (positional attention)', result), ('standard-attention twin', twin)):
        top5 = _fmt(r.get('eval_top5')) if num_classes > 5 else 'n/a'
        rows.append(f"| {label} | {_fmt(r.get('eval_top1'))} | {top5} | {int(r['epoch'])} |")
    return ('Same train.py recipe with `--model-kwargs pos_attn_blocks=none` (ordinary attention in every block), '
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


def _attention_texts(architecture: Dict[str, Any]) -> Dict[str, str]:
    """The card's sentences about which blocks are positional and which positional attention layer they use."""
    pos_blocks = architecture.get('positional_blocks')
    layer = architecture.get('pos_attn_layer')
    if pos_blocks is None:
        summary = 'attention (an architecture without positional attention)'
    elif not pos_blocks:
        summary = ('**standard attention** in every block: the standard-attention twin (`pos_attn_blocks=none`) of '
                   'the positional-attention models')
    elif len(pos_blocks) == architecture['depth']:
        summary = '**positional attention** in every block'
    else:
        summary = f'**positional attention** in blocks {pos_blocks} and standard attention in the others'
    if layer is None:
        layer_sentence = 'This model has no positional-attention blocks, so it uses no positional attention layer.'
        layer_name = 'none'
    else:
        layer_sentence = (f"This model's positional blocks use the `'{layer['name']}'` positional attention layer "
                          f"(`pos_attn_layer='{layer['name']}'`, `{layer['cls']}`): `{layer['formula']}`.")
        layer_name = f"`'{layer['name']}'` (`{layer['cls']}`)"
    positional = (f'{len(pos_blocks)} of {architecture["depth"]} (blocks {pos_blocks})' if pos_blocks is not None
                  else 'none (architecture without positional attention)')
    return dict(attention_summary=summary, pos_attn_layer_sentence=layer_sentence, pos_attn_layer=layer_name,
                positional_blocks=positional)


def render_model_card(template: str, model_name: str, config: Dict[str, Any], checkpoint: TrainCheckpoint,
                      weights: str, stats: Dict[str, Any], result: Optional[Dict[str, Any]],
                      twin: Optional[Dict[str, Any]], dataset: CardDataset, architecture: Dict[str, Any],
                      repo_id: Optional[str] = None, card_license: str = 'apache-2.0',
                      evaluation: Optional[Dict[str, Any]] = None) -> str:
    """Fill a ``model_cards/*.md`` template (``string.Template`` ``$names``) with this checkpoint's facts.

    ``weights``: which weights of the checkpoint are published ('state_dict_ema' or 'state_dict'). ``evaluation``:
    publish's measurement of the published folder (dataset, split, num_samples, top1, top5), reported first.
    """
    from string import Template
    cfg = config['pretrained_cfg']
    args = checkpoint.args
    eval_split = args.get('val_split') or 'validation'
    info = get_dataset_info(args.get('dataset'))  # the split read: Fashion-MNIST's and SVHN's validation is test
    eval_split = (info.split(eval_split) if info is not None else None) or eval_split
    load_name = f'hf-hub:{repo_id}' if repo_id else 'local-dir:PATH/TO/THIS/FOLDER'
    synthetic_note = ''
    if dataset.synthetic:
        synthetic_note = ('> **Trained on synthetic data.** The training set is the spatially structured dataset of '
                          'Jelassi et al. (2022) generated by `timm_posattn.structured`, not natural images. The '
                          'weights demonstrate the paper\'s mechanism and are not useful as an image classifier.\n')
    pos_blocks = architecture.get('positional_blocks')
    values = dict(
        front_matter=front_matter(model_name, repo_id, dataset, result, config['num_classes'], card_license,
                                  eval_split, evaluation),
        model_name=model_name,
        architecture=config['architecture'],
        dataset=dataset.phrase,
        synthetic_note=synthetic_note,
        load_name=load_name,
        num_classes=config['num_classes'],
        input_size='x'.join(str(s) for s in cfg['input_size']),
        mean=tuple(round(m, 4) for m in cfg['mean']), std=tuple(round(s, 4) for s in cfg['std']),
        crop_pct=cfg.get('crop_pct'), interpolation=cfg.get('interpolation'),
        depth=architecture.get('depth'), embed_dim=architecture.get('embed_dim'),
        num_heads=architecture.get('num_heads'), mlp_hidden=architecture.get('mlp_hidden'),
        patch_size='x'.join(str(p) for p in architecture.get('patch_size') or ()) or NOT_MEASURED,
        model_args=json.dumps(config.get('model_args', {}), sort_keys=True),
        checkpoint=Path(checkpoint.path).name,
        epoch=checkpoint.epoch if checkpoint.epoch is not None else NOT_MEASURED,
        weights='the EMA weights' if weights == 'state_dict_ema' else 'the (non-EMA) model weights',
        training_args=_training_args(args),
        results_table=_results_table(result, stats, cfg['input_size'], eval_split, config['num_classes'],
                                     evaluation),
        comparison=_comparison(result, twin, config['num_classes'], standard=pos_blocks is not None and not pos_blocks),
        **_attention_texts(architecture),
    )
    assert set(values) == CARD_FIELDS, sorted(set(values) ^ CARD_FIELDS)  # one list of fields (check_card_template)
    return Template(template).substitute(values)
