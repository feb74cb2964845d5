"""Where a ViT's attention goes, in numbers: each block's attention (averaged over images where it depends on them) and
its mean attention distance, against the distance of a uniform row.

A positional block's attention A = softmax((P·Wq)(P·Wk)ᵀ/√d) is the same for every image: it is read from the model
(`get_attention_maps`), no data needed. A standard block's attention depends on the image: it is recorded with timm's
`AttentionExtract` and averaged over images. The mean attention distance (`attention_distance`) is linear in A, so
the distance of the average is the average of the per-image distances. A row that attends uniformly to every token
gives the reference (`uniform_attention_distance`): a block below it attends locally, one near it globally.

Used by convert (the source's average attention it fits, and its report's distances) and by
``python -m timm_posattn.visualize --distance`` (the positional model against its standard twin).
"""
from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.utils import AttentionExtract

from .cli import UsageError

__all__ = [
    'AttentionStatsError', 'AverageAttention', 'unfused_attention', 'record_average_attention', 'attention_distance',
    'uniform_attention_distance', 'positional_blocks', 'grid_and_prefix', 'block_attention', 'attention_distances',
]


class AttentionStatsError(UsageError):
    """The attention cannot be measured (no images for an image-dependent block, non-finite attention); one line."""


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Attention computed explicitly, so that its softmax is a node FX can extract; fused attention restored after.

    `scaled_dot_product_attention` never materializes the attention matrix: traced fused, there is nothing to record.
    """
    fused = [m for m in model.modules() if getattr(m, 'fused_attn', False)]
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in fused:
            m.fused_attn = True


class AverageAttention(NamedTuple):
    """A model's attention over a set of images."""
    average: torch.Tensor  # (blocks, H, N, N) float32: the mean over images
    count: int  # images
    image_kl: torch.Tensor  # (blocks,): mean over images, heads and rows of KL(A(x) || average)


def record_average_attention(model: nn.Module, images: Iterable[torch.Tensor],
                             blocks: Optional[Sequence[int]] = None) -> AverageAttention:
    """The attention of each of ``blocks`` (default: all) and head averaged over images, and how much it varies from
    image to image.

    Read with timm's `AttentionExtract` (an FX graph of the model that also returns each block's softmax), traced
    with fused attention off; the model itself is not changed (it is left in eval mode). Images are moved to the
    model's device; sums are kept in float64. The blocks must compute their attention with a softmax of the input
    (timm's `Attention`): positional blocks are read with `block_attention` instead.

    `image_kl` is the part of the attention no fixed (positional) attention can fit: for any fixed attention B,
    mean_x KL(A(x) || B) = mean_x KL(A(x) || average) + KL(average || B). It comes from the same pass, as
    mean_x sum_j A log A - sum_j average log average.
    """
    blocks = list(range(len(model.blocks))) if blocks is None else list(blocks)
    names = [f'blocks.{i}.attn.softmax' for i in blocks]
    model.eval()
    with unfused_attention(model):
        extractor = AttentionExtract(model, names=names, method='fx')
    device = next(model.parameters()).device
    total = neg_entropy = None
    count = 0
    with torch.no_grad():
        for x in images:
            maps = extractor(x.to(device))
            attn = [maps[name].double() for name in names]
            batch_sum = torch.stack([a.sum(0) for a in attn])
            batch_neg_entropy = torch.stack([torch.xlogy(a, a).sum((0, -1)) for a in attn])
            total = batch_sum if total is None else total + batch_sum
            neg_entropy = batch_neg_entropy if neg_entropy is None else neg_entropy + batch_neg_entropy
            count += x.shape[0]
    if not count:
        raise AttentionStatsError('no images to average the attention over: give at least one image')
    average = total / count
    if not torch.isfinite(average).all():
        bad = sorted({blocks[int(b)] for b in torch.nonzero(~torch.isfinite(average))[:, 0]})
        raise AttentionStatsError(f'the attention is not finite in blocks {bad}: check the images (normalized for '
                                  f'the model?) and the weights')
    image_kl = (neg_entropy / count - torch.xlogy(average, average).sum(-1)).mean((-2, -1))
    return AverageAttention(average.float(), count, image_kl.float().cpu())


def attention_distance(attn: torch.Tensor, grid_size: Tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Mean attention distance in patches: (..., N, N) -> (...).

    For each patch query i, sum_j A_ij · |pos_i - pos_j| over the patch keys j (euclidean, in patches), averaged over
    the patch queries. Class-token rows and columns are left out (they have no position), so the mass a row puts on
    the class token counts for nothing.
    """
    gh, gw = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij'), -1).reshape(-1, 2)
    dist = torch.cdist(coords.double(), coords.double()).to(device=attn.device, dtype=attn.dtype)
    patches = attn[..., num_prefix_tokens:, num_prefix_tokens:]
    return (patches * dist).sum(-1).mean(-1)


def uniform_attention_distance(grid_size: Tuple[int, int], num_prefix_tokens: int = 1) -> float:
    """The mean attention distance of rows that attend equally to every token (prefix tokens included, counted as
    `attention_distance` counts them): the reference of global, position-blind attention."""
    n = num_prefix_tokens + grid_size[0] * grid_size[1]
    uniform = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return float(attention_distance(uniform, grid_size, num_prefix_tokens))


def positional_blocks(model: nn.Module) -> List[int]:
    """The model's blocks whose attention is positional (vit_posattn_* models; none for other ViTs)."""
    return list(getattr(model, 'pos_attn_indices', None) or [])


def grid_and_prefix(model: nn.Module) -> Tuple[Tuple[int, int], int]:
    """(patch grid, prefix tokens) of a timm-style ViT at its own input size."""
    return tuple(int(g) for g in model.patch_embed.grid_size), int(getattr(model, 'num_prefix_tokens', 1))


def block_attention(model: nn.Module, images: Optional[Iterable[torch.Tensor]] = None
                    ) -> Tuple[Dict[int, torch.Tensor], int]:
    """Every block's attention (H, N, N), float32 on the CPU, and the number of images averaged over.

    Positional blocks: read from the model, no image. Other blocks: averaged over ``images`` (batches normalized for
    the model); a model with such blocks and no images is refused.
    """
    depth = len(model.blocks)
    positional = positional_blocks(model)
    standard = [b for b in range(depth) if b not in positional]
    result: Dict[int, torch.Tensor] = {}
    if positional:
        with torch.no_grad():
            maps = model.get_attention_maps().detach().float().cpu()
        if not torch.isfinite(maps).all():
            raise AttentionStatsError('the positional attention holds NaN or inf: the weights that compute it are '
                                      'not finite')
        result.update(zip(positional, maps))
    count = 0
    if standard:
        if images is None:
            raise AttentionStatsError(f'blocks {standard} compute their attention from the image: their attention '
                                      f'is averaged over images, so give a dataset')
        recorded = record_average_attention(model, images, blocks=standard)
        result.update(zip(standard, recorded.average.cpu()))
        count = recorded.count
    return dict(sorted(result.items())), count


def attention_distances(attention: Dict[int, torch.Tensor], grid_size: Tuple[int, int], num_prefix_tokens: int
                        ) -> Dict[int, List[float]]:
    """Per block, each head's mean attention distance in patches."""
    return {b: [float(d) for d in attention_distance(a.double(), grid_size, num_prefix_tokens)]
            for b, a in attention.items()}
