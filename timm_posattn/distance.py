"""How far attention reaches: the mean attention distance of every block and head, for a positional model against
its standard-attention twin, as a figure and a JSON of the numbers (``python -m timm_posattn.visualize --distance``).

A positional block's attention A = softmax((P·Wq)(P·Wk)ᵀ/√d) comes from the positional table alone, so its distance
needs no image. A standard block's attention depends on the image: its distance is that of the attention averaged
over the evaluation images (`attention_stats`, timm's `AttentionExtract`), read through the model's own
preprocessing (`evaluation`). The reference is the distance of a uniform row (attention blind to position): a head
below the line attends locally, one near it globally. The figure also shows the first model's attention maps (one
query patch, every block and head).

    python -m timm_posattn.visualize RUN_POS/model_best.pth.tar --distance --twin RUN_STD/model_best.pth.tar \\
        --dataset torch/fashion_mnist --data-dir /usr/share/datasets/fashion-mnist --out fm_distance.png

writes fm_distance.png and fm_distance.json (refusing to replace them without --overwrite).
"""
import argparse
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .attention_stats import (
    attention_distances, block_attention, grid_and_prefix, positional_blocks, uniform_attention_distance,
)
from .cli import UsageError, device_arg, int_range
from .data import random_subset
from .evaluation import create_eval_loader, open_eval_dataset, resolve_data, resolve_preprocessing, split_name
from .loading import LoadedModel, load_model
from .outputs import OutputFolder
from .plots import pyplot

__all__ = ['DEFINITION', 'add_distance_arguments', 'check_distance_arguments', 'model_distances', 'distance_figure',
           'visualize_distance']

DEFINITION = ('mean over the patch queries of sum_j A_ij * |pos_i - pos_j| over the patch keys (euclidean, in '
              'patches); the class token has no position: the weight a row puts on it counts 0. uniform_row_distance: '
              'the same for rows that weigh every token equally.')
# visualize options that only the distance report reads (dest: flag), and their defaults
_OPTIONS = {'twin': '--twin', 'twin_pretrained': '--twin-pretrained', 'dataset': '--dataset', 'data_dir': '--data-dir',
            'split': '--split', 'num_images': '--num-images', 'seed': '--seed', 'batch_size': '--batch-size',
            'workers': '--workers', 'device': '--device'}
_DEFAULTS = {'twin_pretrained': False, 'seed': 0, 'batch_size': 256, 'workers': 2}


def add_distance_arguments(parser: argparse.ArgumentParser) -> None:
    """visualize's ``--distance`` options (data options for the blocks whose attention depends on the image)."""
    group = parser.add_argument_group(
        'Attention distance (--distance): per block and head, positional model vs standard twin, and JSON')
    group.add_argument('--distance', action='store_true',
                       help='plot the mean attention distance of every block and head (and --twin\'s) against a '
                            'uniform row\'s, with the model\'s attention maps; also writes the numbers as JSON next '
                            'to --out (default --out: distance.png)')
    group.add_argument('--twin', default=None, metavar='SOURCE',
                       help='the model to compare with: its standard-attention twin (pos_attn_blocks=none) or a timm '
                            'ViT, as a train.py checkpoint, model name, hf-hub:ORG/NAME or local-dir:PATH')
    group.add_argument('--twin-pretrained', action='store_true', help="load the published weights of --twin's name")
    group.add_argument('--dataset', default=None, metavar='NAME',
                       help="images that standard blocks' attention is averaged over, as in train.py (default: the "
                            "checkpoint's)")
    group.add_argument('--data-dir', default=None, metavar='DIR', help="dataset location (default: the checkpoint's)")
    group.add_argument('--split', default=None, metavar='NAME',
                       help="split (default: the checkpoint's --val-split, else validation: Fashion-MNIST's test set)")
    group.add_argument('--num-images', type=int_range(1), default=None, metavar='N',
                       help='average over N images drawn at random from the split (default: all of them)')
    group.add_argument('--seed', type=int_range(0), default=None, help='seed of the --num-images draw (default: 0)')
    group.add_argument('-b', '--batch-size', type=int_range(1), default=None, metavar='N',
                       help='batch size (default: 256)')
    group.add_argument('-j', '--workers', type=int_range(0), default=None, metavar='N',
                       help='data loading workers (default: 2)')
    group.add_argument('--device', type=device_arg, default=None,
                       help='device (default: cuda if available, else cpu)')


def check_distance_arguments(args: argparse.Namespace) -> None:
    """Options of the distance report are refused without --distance, and the plot's --img-size with it; then the
    defaults are filled in."""
    given = [flag for dest, flag in _OPTIONS.items() if getattr(args, dest) not in (None, False)]
    if not args.distance and given:
        raise UsageError(f'{", ".join(given)} appl{"ies" if len(given) == 1 else "y"} only to --distance (the '
                         f'attention-distance report)')
    if args.distance and args.img_size is not None:
        raise UsageError('--img-size applies to the attention plot; --distance measures at the model\'s own size')
    if args.distance and args.query is not None and len(args.query) > 1:
        raise UsageError(f'--distance shows the maps of one query patch, got {len(args.query)}')
    if args.twin_pretrained and not args.twin:
        raise UsageError('--twin-pretrained loads the published weights of --twin: give --twin')
    for dest, default in _DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)


def _check_vit(loaded: LoadedModel, role: str) -> None:
    model = loaded.model
    if not hasattr(model, 'blocks') or not hasattr(getattr(model, 'patch_embed', None), 'grid_size'):
        raise UsageError(f'{role}: expected a ViT (vit_posattn_* or timm VisionTransformer), got '
                         f'{type(model).__name__}')


def _images(loaded: LoadedModel, data: Dict[str, Any], args: argparse.Namespace, device: torch.device):
    """The batches a standard block's attention is averaged over, prepared as the model was trained; the dataset is
    opened (or refused, one line) before anything is computed."""
    data_config = resolve_preprocessing(loaded, data['dataset'], {})
    dataset = open_eval_dataset(data['dataset'], data['root'], data['split'], data_config,
                                num_samples=data['num_samples'], data_seed=data['data_seed'])
    dataset = random_subset(dataset, args.num_images, args.seed)
    loader = create_eval_loader(dataset, data_config, batch_size=args.batch_size, workers=args.workers,
                                device=device)
    return (x for x, _ in loader)


def model_distances(loaded: LoadedModel, images=None, role: str = 'model', source: Optional[str] = None
                    ) -> Tuple[Dict[str, Any], Dict[int, torch.Tensor]]:
    """The JSON entry of one model (per block: each head's distance and their mean; the uniform row's distance) and
    its attention per block (positional: from P; standard: averaged over ``images``)."""
    model = loaded.model.eval()
    attention, count = block_attention(model, images)
    grid, prefix = grid_and_prefix(model)
    heads = attention_distances(attention, grid, prefix)
    positional = positional_blocks(model)
    blocks = [dict(block=b, attention='positional' if b in positional else 'standard (image average)',
                   heads=[round(d, 6) for d in heads[b]], mean=round(sum(heads[b]) / len(heads[b]), 6))
              for b in sorted(heads)]
    entry = dict(role=role, source=source, weights=loaded.weights, model=type(model).__name__,
                 positional_blocks=positional, grid=list(grid), prefix_tokens=prefix,
                 uniform_row_distance=round(uniform_attention_distance(grid, prefix), 6), images=count, blocks=blocks)
    return entry, attention


def _label(entry: Dict[str, Any]) -> str:
    kind = ('positional' if len(entry['positional_blocks']) == len(entry['blocks'])
            else 'standard' if not entry['positional_blocks'] else 'mixed')
    images = f", averaged over {entry['images']} images" if entry['images'] else ''
    return f"{entry['role']} ({kind} attention{images})"


def distance_figure(entries: Sequence[Dict[str, Any]], attention: Dict[int, torch.Tensor], query: int,
                    blocks: Optional[Sequence[int]] = None, title: str = '') -> Any:
    """A matplotlib figure: on top, per block, each head's mean attention distance of every entry (dots, the block
    mean as a line) and the uniform row's distance (dashed); below, the first entry's attention maps of the query
    patch, one row per block (``blocks``, default all) and one column per head."""
    from matplotlib.patches import Rectangle
    plt = pyplot()

    first = entries[0]
    grid, prefix = tuple(first['grid']), first['prefix_tokens']
    blocks = list(attention) if blocks is None else list(blocks)
    num_heads = max(a.shape[0] for a in attention.values())
    fig = plt.figure(figsize=(max(7.0, 0.95 * num_heads + 1.6), 3.4 + 1.0 * len(blocks)))
    grid_spec = fig.add_gridspec(1 + len(blocks), num_heads, height_ratios=[3.0] + [1.0] * len(blocks))
    ax = fig.add_subplot(grid_spec[0, :])
    colours = ('tab:blue', 'tab:orange', 'tab:green')
    offsets = [0.0] if len(entries) == 1 else [-0.12 + 0.24 * i / (len(entries) - 1) for i in range(len(entries))]
    uniform_drawn: List[float] = []
    for entry, colour, offset in zip(entries, colours, offsets):
        xs = [b['block'] for b in entry['blocks']]
        for b in entry['blocks']:
            ax.scatter([b['block'] + offset] * len(b['heads']), b['heads'], s=14, color=colour, alpha=0.7,
                       linewidths=0)
        ax.plot([x + offset for x in xs], [b['mean'] for b in entry['blocks']], color=colour, lw=1.2,
                label=_label(entry))
        uniform = entry['uniform_row_distance']
        if uniform not in uniform_drawn:  # one line per patch grid (the same for a model and its twin)
            ax.axhline(uniform, color='grey' if not uniform_drawn else colour, ls='--', lw=1,
                       label=f"uniform row ({entry['grid'][0]}x{entry['grid'][1]} patches): {uniform:.2f}")
            uniform_drawn.append(uniform)
    ax.set_xlabel('block')
    ax.set_ylabel('mean attention distance (patches)')
    ax.set_xticks(sorted({b['block'] for e in entries for b in e['blocks']}))
    highest = max([e['uniform_row_distance'] for e in entries] + [d for e in entries for b in e['blocks']
                                                                      for d in b['heads']])
    ax.set_ylim(0, 1.15 * highest)
    ax.legend(fontsize=7, loc='lower right')
    ax.set_title(title or 'each dot: one head; line: the mean of the heads', fontsize=9)
    qr, qc = divmod(query, grid[1])
    for r, block in enumerate(blocks):
        maps = attention[block]
        for h in range(num_heads):
            panel = fig.add_subplot(grid_spec[1 + r, h])
            panel.set_xticks([])
            panel.set_yticks([])
            if h >= maps.shape[0]:
                panel.axis('off')
                continue
            row = maps[h, prefix + query, prefix:].reshape(grid)
            panel.imshow(row.numpy(), cmap='viridis', vmin=0)
            panel.add_patch(Rectangle((qc - 0.5, qr - 0.5), 1, 1, fill=False, edgecolor='red', lw=1))
            if r == 0:
                panel.set_title(f'head {h}', fontsize=7)
            if h == 0:
                kind = 'pos' if block in first['positional_blocks'] else 'std avg'
                panel.set_ylabel(f'block {block}\n{kind}', fontsize=7)
    fig.suptitle(f"Mean attention distance per block and head\nbelow: the {first['role']}'s attention of patch "
                 f"({qr},{qc}) (red square), one colour scale per map", fontsize=9)
    fig.tight_layout()
    return fig


def _output_names(out: str) -> Tuple[str, str, str]:
    """(folder, PNG name, JSON name): the JSON beside the PNG, with its stem."""
    out = os.path.abspath(out)
    stem = os.path.splitext(os.path.basename(out))[0]
    return os.path.dirname(out), os.path.basename(out), f'{stem}.json'


def visualize_distance(args: argparse.Namespace) -> List[str]:
    """The --distance command: refuse what cannot work before any work, measure, write the PNG and JSON atomically;
    returns the paths written."""
    from .visualize import resolve_query_patches  # visualize imports this module: its helper is read at run time
    folder_path, png, json_name = _output_names(args.out)
    folder = OutputFolder(folder_path, [png, json_name], overwrite=args.overwrite,
                          command='visualize --distance').check()
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    models = [('model', args.model, load_model(args.model, checkpoint=args.checkpoint, use_ema=args.use_ema,
                                               pretrained=args.pretrained or None, **args.model_kwargs))]
    if args.twin:
        models.append(('twin', args.twin, load_model(args.twin, pretrained=args.twin_pretrained or None)))
    for role, _, loaded in models:
        _check_vit(loaded, role)
        if not loaded.trained:
            print(f'note: {role}: {loaded.weights}: the attention at initialization')
    first = models[0][2].model
    grid, _ = grid_and_prefix(first)
    query = resolve_query_patches(args.query, grid)[0]
    missing = [b for b in args.blocks or [] if b >= len(first.blocks)]
    if missing:
        raise UsageError(f'--blocks {missing}: the model has blocks 0..{len(first.blocks) - 1}')
    needs_images = [(role, loaded) for role, _, loaded in models
                    if len(positional_blocks(loaded.model)) < len(loaded.model.blocks)]
    if not needs_images and any(v is not None for v in (args.dataset, args.data_dir, args.split, args.num_images)):
        raise UsageError('every block here is positional (its attention needs no image): --dataset, --data-dir, '
                         '--split and --num-images would not be used')
    data = None
    images = {}
    if needs_images:  # the data of the first model that was trained on some (its checkpoint), else the options
        ckpt = next((loaded.checkpoint for _, loaded in needs_images if loaded.checkpoint is not None),
                    next((loaded.checkpoint for _, _, loaded in models if loaded.checkpoint is not None), None))
        data = resolve_data(ckpt, dataset=args.dataset, data_dir=args.data_dir, split=args.split)
        for role, loaded in needs_images:
            loaded.model.to(device)
            images[role] = _images(loaded, data, args, device)
    entries, attention = [], None
    for role, source, loaded in models:
        print(f'Measuring {role}: {loaded.weights}', flush=True)
        entry, block_maps = model_distances(loaded, images.get(role), role=role, source=str(source))
        entries.append(entry)
        attention = attention if attention is not None else block_maps
    report = dict(definition=DEFINITION, query_patch=list(divmod(query, grid[1])), models=entries)
    if data is not None:
        report.update(dataset=data['dataset'], split=split_name(data['dataset'], data['split']),
                      num_images=args.num_images)
    plt = pyplot()
    fig = distance_figure(entries, attention, query, args.blocks)
    try:
        paths = [folder.write(png, lambda f: fig.savefig(f, format='png', dpi=110))]
    finally:
        plt.close(fig)
    paths.append(folder.write_text(json_name, json.dumps(report, indent=2) + '\n'))
    for entry in entries:
        means = ', '.join(f"{b['mean']:.2f}" for b in entry['blocks'])
        print(f"{entry['role']}: mean distance per block {means} (uniform row {entry['uniform_row_distance']:.2f})")
    return paths
