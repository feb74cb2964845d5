"""Render a model's positional attention to PNG: per block and head, for chosen query patches, on the patch grid.

Positional attention depends only on the positions, so no image is needed: the maps are read from
``model.get_attention_maps()`` (any positional attention layer, 'qk', 'tied' or 'logits', reparameterized or not).
The model is loaded through `timm_posattn.loading`: a train.py checkpoint alone is enough (architecture and model
kwargs come from it; its EMA weights when it has them), and published folders have their sha256 checked.

    python -m timm_posattn.visualize output/train/.../last.pth.tar          # arch and kwargs from the checkpoint
    python -m timm_posattn.visualize vit_posattn_tiny_patch4_32 --checkpoint weights.safetensors
    python -m timm_posattn.visualize hf-hub:timm-posattn/vit_posattn_small_patch4_32.cifar10 --out attn.png
    python -m timm_posattn.visualize local-dir:/path/to/exported_model --query 0 27 63 --blocks 0 6

With ``--distance`` it plots instead the mean attention distance of every block and head against a uniform row's,
for the model and a ``--twin`` (its standard twin, averaged over a dataset's images), and writes the numbers as JSON
(`timm_posattn.distance`).
"""
import argparse
import os
import sys
from typing import IO, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple

import timm_posattn  # noqa: F401  (registers the vit_posattn_* models with timm)
from timm_posattn.cli import ArgumentParser, ParseKwargs, UsageError, int_range, run_command
from timm_posattn.distance import add_distance_arguments, check_distance_arguments, visualize_distance
from timm_posattn.files import atomic_write
from timm_posattn.loading import add_ema_arguments, load_model
from timm_posattn.outputs import OutputFolder
from timm_posattn.plots import pyplot
from timm_posattn.published import NonFiniteWeightsError

__all__ = ['save_attention_plot', 'resolve_query_patches', 'main']

QueryPatch = Union[int, Tuple[int, int]]


def resolve_query_patches(query_patches: Optional[Sequence[QueryPatch]], grid: Tuple[int, int]) -> list:
    """Patch indices (row-major on the grid) from ints or (row, col) pairs; default: the centre patch."""
    gh, gw = grid
    if not query_patches:
        return [(gh // 2) * gw + gw // 2]
    indices = []
    for q in query_patches:
        if isinstance(q, (tuple, list)):
            if len(q) != 2 or not (0 <= q[0] < gh and 0 <= q[1] < gw):
                raise UsageError(f'expected a (row, col) query patch inside the {gh}x{gw} grid, got {q}')
            indices.append(int(q[0]) * gw + int(q[1]))
        else:
            if not 0 <= int(q) < gh * gw:
                raise UsageError(f'expected a query patch index in [0, {gh * gw}), got {q}')
            indices.append(int(q))
    return indices


def _resolve_blocks(model: nn.Module, blocks: Optional[Sequence[int]]) -> list:
    """Positions in the attention-map stack of the requested model block indices (default: all positional)."""
    pos_blocks = list(getattr(model, 'pos_attn_indices', []))
    if not pos_blocks:
        raise UsageError('this model has no positional-attention blocks (pos_attn_blocks=none): nothing to plot')
    if blocks is None:
        return list(range(len(pos_blocks)))
    missing = [b for b in blocks if b not in pos_blocks]
    if missing:
        raise UsageError(f'blocks {missing} are not positional-attention blocks; expected some of {pos_blocks}')
    return [pos_blocks.index(b) for b in blocks]


def save_attention_plot(
        model: Union[nn.Module, str],
        path: str,
        query_patches: Optional[Sequence[QueryPatch]] = None,
        blocks: Optional[Sequence[int]] = None,
        img_size: Optional[Union[int, Tuple[int, int]]] = None,
        write: Callable[[str, Callable[[IO[bytes]], None]], str] = atomic_write,
) -> str:
    """Save a grid of attention maps to ``path`` (PNG, through ``write(path, write_fn)``: atomically by default, or
    the caller's claimed folder) and return the path.

    One row per (block, query patch), one column per head; each panel is the query's attention over the patch grid
    (the query is outlined in red; the panel title gives the row's largest patch weight and the mass on the class
    token, since every panel has its own colour scale). ``blocks`` are model block indices (default: every
    positional block), ``query_patches`` ints or (row, col) pairs (default: centre).
    """
    from matplotlib.patches import Rectangle
    plt = pyplot()

    if isinstance(model, str):
        model = load_model(model).model
    if not hasattr(model, 'get_attention_maps'):
        raise UsageError(f'expected a model with positional attention (get_attention_maps(), the vit_posattn_* '
                         f'models), got {type(model).__name__}')
    stack_positions = _resolve_blocks(model, blocks)
    grid = _plot_grid(model, img_size)
    maps = model.get_attention_maps(img_size).detach().float().cpu()
    pos_blocks = list(model.pos_attn_indices)
    for position, block_maps in enumerate(maps):
        if not torch.isfinite(block_maps).all():
            raise NonFiniteWeightsError(f'the positional attention of block {pos_blocks[position]} holds NaN or inf: '
                                        f'the weights that compute it are not finite')
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    num_patches = maps.shape[-1] - prefix
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f'attention maps cover {num_patches} patches, but the patch grid is {grid}')
    queries = resolve_query_patches(query_patches, grid)
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
        return write(path, lambda f: fig.savefig(f, format='png', dpi=110))
    finally:
        plt.close(fig)


MAX_MAPS_BYTES = 2 ** 31  # the (blocks, heads, N, N) maps of a plot: beyond this, an image size is refused


def _plot_grid(model: nn.Module, img_size: Optional[Union[int, Tuple[int, int]]]) -> Tuple[int, int]:
    """The patch grid the maps are plotted on; an image size the patches do not tile, or whose maps would not fit
    in memory, is refused (one line) before anything is computed."""
    if img_size is None:
        return tuple(model.patch_embed.grid_size)
    size, patch = to_2tuple(img_size), to_2tuple(model.patch_embed.patch_size)
    if any(s < p or s % p for s, p in zip(size, patch)):
        raise UsageError(f'img_size {img_size}: expected a multiple of the patch size {patch[0]}x{patch[1]} (the '
                         f'model refuses sizes its patches do not tile)')
    grid = (size[0] // patch[0], size[1] // patch[1])
    tokens = grid[0] * grid[1] + int(getattr(model, 'num_prefix_tokens', 1))
    blocks, heads = len(getattr(model, 'pos_attn_indices', [])), model.blocks[0].attn.num_heads
    need = blocks * heads * tokens ** 2 * 4
    if need > MAX_MAPS_BYTES:
        raise UsageError(f'img_size {img_size} gives {tokens - 1} patches: the attention maps of {blocks} blocks x '
                         f'{heads} heads would take {need / 2 ** 30:,.0f} GiB; choose a smaller size')
    return grid


def _parse_query(value: str) -> QueryPatch:
    try:
        if ',' in value:
            r, c = value.split(',', 1)
            return int(r), int(c)
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a patch index or row,col, got {value!r}') from None


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog='python -m timm_posattn.visualize',
                            description='Plot the positional attention of a vit_posattn_* model (no image).')
    parser.add_argument('model', help='train.py checkpoint, timm model name, hf-hub:ORG/NAME or local-dir:PATH')
    parser.add_argument('--checkpoint', default=None, help='weights for a model name (safetensors or checkpoint)')
    parser.add_argument('--pretrained', action='store_true', help='load the published weights of a model name')
    add_ema_arguments(parser)
    parser.add_argument('--out', default=None,
                        help='output PNG (default: attention.png; with --distance: distance.png, and its .json)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --out file')
    parser.add_argument('--query', nargs='+', type=_parse_query, default=None,
                        help='query patches: indices (row-major) or row,col pairs (default: the centre patch)')
    parser.add_argument('--blocks', nargs='+', type=int_range(0), default=None,
                        help='block indices (default: all positional)')
    parser.add_argument('--img-size', type=int_range(1), default=None, help='plot the maps for another input size')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help="model kwargs over the checkpoint's, e.g. pos_attn_blocks=3")
    add_distance_arguments(parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Plot (or, with --distance, report the attention distance); returns the paths written."""
    args = _parser().parse_args(argv)
    check_distance_arguments(args)
    if args.distance:
        args.out = args.out or 'distance.png'
        paths = visualize_distance(args)
        for path in paths:
            print(f'wrote {path}')
        return list(paths)
    out = os.path.abspath(args.out or 'attention.png')
    folder = OutputFolder(os.path.dirname(out), [os.path.basename(out)], overwrite=args.overwrite,
                          command='visualize').check()  # before loading anything
    loaded = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained or None,
                        use_ema=args.use_ema, **args.model_kwargs)
    if not loaded.trained:
        print(f'note: {loaded.weights} (no --checkpoint or --pretrained): the plot shows the attention at '
              f'initialization')
    print(f'Plotting {loaded.weights}')
    path = save_attention_plot(loaded.model, out, query_patches=args.query, blocks=args.blocks,
                               img_size=args.img_size, write=lambda p, fn: folder.write(os.path.basename(p), fn))
    print(f'wrote {path}')
    return [path]


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
