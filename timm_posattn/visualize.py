"""Render a model's positional attention to PNG: per block and head, for chosen query patches, on the patch grid.

Positional attention depends only on the positional encodings, so no image is needed: the maps are read from
``model.get_attention_maps()``.

    python -m timm_posattn.visualize vit_posattn_tiny_patch4_32 --checkpoint output/train/.../model_best.pth.tar
    python -m timm_posattn.visualize output/train/.../last.pth.tar          # arch read from the train.py checkpoint
    python -m timm_posattn.visualize hf-hub:timm-posattn/vit_posattn_small_patch4_32.cifar10 --out attn.png
    python -m timm_posattn.visualize local-dir:/path/to/exported_model --query 0 27 63 --blocks 0 6
"""
import argparse
import os
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import timm
from timm.models import load_state_dict
from timm.utils import ParseKwargs

import timm_posattn  # noqa: F401  (registers the vit_posattn_* models with timm)
from timm_posattn.files import atomic_write

__all__ = ['load_model', 'save_attention_plot', 'resolve_query_patches', 'main']

QueryPatch = Union[int, Tuple[int, int]]


def _checkpoint_arch(path: str) -> Optional[str]:
    """The ``arch`` a train.py checkpoint records (None for safetensors or plain state dicts)."""
    if path.endswith('.safetensors'):
        return None
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    return checkpoint.get('arch') if isinstance(checkpoint, dict) else None


def _head_classes(state_dict) -> Optional[int]:
    weight = state_dict.get('head.weight')
    return int(weight.shape[0]) if weight is not None else None


def load_model(model: str, checkpoint: Optional[str] = None, pretrained: bool = False, **model_kwargs) -> nn.Module:
    """A model from a timm name (optionally with a checkpoint file), a train.py checkpoint path, or a
    ``hf-hub:``/``local-dir:`` location. Checkpoints load with safetensors or ``torch.load(weights_only=True)``;
    the number of classes is taken from the checkpoint's head so any trained head fits."""
    if checkpoint is None and os.path.isfile(model):
        checkpoint, arch = model, _checkpoint_arch(model)
        if arch is None:
            raise ValueError(f'{model} does not record its architecture (safetensors or plain weights): pass the model '
                             f'name and the file as --checkpoint, e.g. vit_posattn_tiny_patch4_32 --checkpoint {model}')
        model = arch
    if model.startswith(('hf-hub:', 'local-dir:')):
        if checkpoint is not None:
            raise ValueError(f'{model} brings its own weights: do not pass a checkpoint as well')
        net = timm.create_model(model, pretrained=True, **model_kwargs)
    elif checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f'checkpoint file not found: {checkpoint}')
        state_dict = load_state_dict(checkpoint, use_ema=True, weights_only=True)
        num_classes = _head_classes(state_dict)
        if num_classes is not None:
            model_kwargs.setdefault('num_classes', num_classes)
        net = timm.create_model(model, pretrained=False, **model_kwargs)
        net.load_state_dict(state_dict, strict=True)
    else:
        net = timm.create_model(model, pretrained=pretrained, **model_kwargs)
    return net.eval()


def resolve_query_patches(query_patches: Optional[Sequence[QueryPatch]], grid: Tuple[int, int]) -> list:
    """Patch indices (row-major on the grid) from ints or (row, col) pairs; default: the centre patch."""
    gh, gw = grid
    if not query_patches:
        return [(gh // 2) * gw + gw // 2]
    indices = []
    for q in query_patches:
        if isinstance(q, (tuple, list)):
            if len(q) != 2 or not (0 <= q[0] < gh and 0 <= q[1] < gw):
                raise ValueError(f'expected a (row, col) query patch inside the {gh}x{gw} grid, got {q}')
            indices.append(int(q[0]) * gw + int(q[1]))
        else:
            if not 0 <= int(q) < gh * gw:
                raise ValueError(f'expected a query patch index in [0, {gh * gw}), got {q}')
            indices.append(int(q))
    return indices


def _resolve_blocks(model: nn.Module, blocks: Optional[Sequence[int]]) -> list:
    """Positions in the attention-map stack of the requested model block indices (default: all positional)."""
    pos_blocks = list(getattr(model, 'pos_attn_indices', []))
    if not pos_blocks:
        raise ValueError('this model has no positional-attention blocks (pos_attn_layers=none): nothing to plot')
    if blocks is None:
        return list(range(len(pos_blocks)))
    missing = [b for b in blocks if b not in pos_blocks]
    if missing:
        raise ValueError(f'blocks {missing} are not positional-attention blocks; expected some of {pos_blocks}')
    return [pos_blocks.index(b) for b in blocks]


def save_attention_plot(
        model: Union[nn.Module, str],
        path: str,
        query_patches: Optional[Sequence[QueryPatch]] = None,
        blocks: Optional[Sequence[int]] = None,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
) -> str:
    """Save a grid of attention maps to ``path`` (PNG) and return the path.

    One row per (block, query patch), one column per head; each panel is the query's attention over the patch grid
    (the query is outlined in red; the panel title gives the row's largest patch weight and the mass on the class
    token, since every panel has its own colour scale). ``blocks`` are model block indices (default: every
    positional block), ``query_patches`` ints or (row, col) pairs (default: centre).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if isinstance(model, str):
        model = load_model(model)
    if not hasattr(model, 'get_attention_maps'):
        raise TypeError(f'expected a vit_posattn_* model with get_attention_maps(), got {type(model).__name__}')
    stack_positions = _resolve_blocks(model, blocks)
    maps = model.get_attention_maps(img_size).detach().float().cpu()
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    num_patches = maps.shape[-1] - prefix
    grid = tuple(model.patch_embed.dynamic_feat_size(
        (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))) if img_size is not None \
        else tuple(model.patch_embed.grid_size)
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f'attention maps cover {num_patches} patches, but the patch grid is {grid}')
    queries = resolve_query_patches(query_patches, grid)
    pos_blocks = list(model.pos_attn_indices)
    num_heads = maps.shape[1]
    rows = [(p, q) for p in stack_positions for q in queries]
    fig, axes = plt.subplots(len(rows), num_heads, figsize=(1.25 * num_heads + 1.2, 1.35 * len(rows) + 0.6),
                             squeeze=False)
    for r, (p, q) in enumerate(rows):
        for h in range(num_heads):
            ax = axes[r, h]
            row = maps[p, h, prefix + q]
            ax.imshow(row[prefix:].reshape(grid).numpy(), cmap='viridis', vmin=0)
            qr, qc = divmod(q, grid[1])
            ax.add_patch(Rectangle((qc - 0.5, qr - 0.5), 1, 1, fill=False, edgecolor='red', lw=1.2))
            # each panel has its own colour scale: the max tells a peaked head from a near-uniform one (1/N)
            title = f'h{h} max {float(row[prefix:].max()):.2f}'
            if prefix:
                title += f' cls {float(row[:prefix].sum()):.2f}'
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if h == 0:
                ax.set_ylabel(f'block {pos_blocks[p]}\nquery {q}\n({qr},{qc})', fontsize=7)
    fig.suptitle(f'{type(model).__name__} positional attention on the {grid[0]}x{grid[1]} patch grid '
                 f'(red: query patch; each map is one attention row)', fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110))
    finally:
        plt.close(fig)


def _parse_query(value: str) -> QueryPatch:
    if ',' in value:
        r, c = value.split(',', 1)
        return int(r), int(c)
    return int(value)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(prog='python -m timm_posattn.visualize',
                                     description='Plot the positional attention of a vit_posattn_* model (no image).')
    parser.add_argument('model', help='timm model name, train.py checkpoint path, hf-hub:ORG/NAME or local-dir:PATH')
    parser.add_argument('--checkpoint', default=None, help='weights file (safetensors or train.py checkpoint)')
    parser.add_argument('--pretrained', action='store_true', help='load the published weights of a model name')
    parser.add_argument('--out', default='attention.png', help='output PNG (default: attention.png)')
    parser.add_argument('--query', nargs='+', type=_parse_query, default=None,
                        help='query patches: indices (row-major) or row,col pairs (default: the centre patch)')
    parser.add_argument('--blocks', nargs='+', type=int, default=None, help='block indices (default: all positional)')
    parser.add_argument('--img-size', type=int, default=None, help='plot the maps for another input size')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='e.g. pos_attn_layers=3')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        parser.error(f'{args.out} already exists; pass --overwrite to replace it')
    model = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained, **args.model_kwargs)
    if not (args.checkpoint or args.pretrained or os.path.isfile(args.model)
            or args.model.startswith(('hf-hub:', 'local-dir:'))):
        print(f'note: {args.model} has freshly initialised weights (no --checkpoint or --pretrained): '
              f'the plot shows the attention at initialisation')
    path = save_attention_plot(model, args.out, query_patches=args.query, blocks=args.blocks, img_size=args.img_size)
    print(f'wrote {path}')
    return path


if __name__ == '__main__':
    main()
