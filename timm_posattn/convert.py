"""Positional ViTs from pretrained standard ViTs: copy the weights, fit the positional attention to the source's.

A positional ViT's attention depends on positions only: A = pos_map(P), the same for every image. A standard ViT's
attention depends on the image, but averaged over images much of it is positional. `convert_vit` builds the
positional twin of a standard ViT (same width, depth, heads, patch and image size), copies every weight the two share
(patch embedding, positional table P, values, projections, MLPs, norms, head), records the source's attention of every
block and head averaged over calibration images, and fits each positional block's attention to that average.

    python -m timm_posattn.convert --source vit_small_patch16_224.augreg_in21k_ft_in1k --pretrained \\
        --data-dir /data/imagenet --num-images 1000 --out output/convert/vit_small
    python -m timm_posattn.convert --source output/train/std/model_best.pth.tar --dataset structured --out conv/

The command writes `converted.pth.tar` (the train.py checkpoint format, read by `loading.load_model`, validate.py,
publish and train.py `--initial-checkpoint`), `report.json` and `attention.png` (source average vs fitted attention).
See docs/convert.md for the method and measured figures.
"""
import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import timm
from timm.data import create_loader, resolve_data_config
from timm.layers import Attention, Mlp, to_2tuple
from timm.models import VisionTransformer, get_arch_pretrained_cfgs
from timm.models.vision_transformer import Block

from .attention_stats import AverageAttention, attention_distance, record_average_attention
from .cli import ArgumentParser, UsageError, device_arg, float_range, int_range, one_line, run_command
from .layers import LogitsAttentionMap, PositionalBlock, list_pos_attn_layers
from .loading import PREPROCESSING_KEYS, load_model, make_checkpoint, read_checkpoint, write_checkpoint
from .outputs import FolderClaim, OutputFolder
from .plots import pyplot
from .published import check_finite
from .vit_posattn import (
    StandardBlock, VisionTransformerPosAttn, checkpoint_filter_fn, resolve_pos_attn_blocks, vit_arch_kwargs,
)

__all__ = [
    'ConvertError', 'ConversionReport', 'SourceAttention', 'convert_vit', 'load_source', 'twin_kwargs',
    'record_average_attention', 'fit_attention', 'attention_kl', 'attention_distance', 'attention_comparison_figure',
    'checkpoint_args', 'write_conversion', 'main', 'run',
]

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = 'converted.pth.tar'
REPORT_NAME = 'report.json'
PLOT_NAME = 'attention.png'
OUTPUT_FILES = (CHECKPOINT_NAME, REPORT_NAME, PLOT_NAME)  # what the command owns in --out (one set)

Batch = Union[torch.Tensor, Sequence[torch.Tensor]]  # images, or (images, targets, ...)


class ConvertError(UsageError):
    """A source or an option convert cannot work with; the message is one line."""


SourceAttention = AverageAttention  # the source's attention over the calibration images (`attention_stats`)


# --------------------------------------------------------------------------------------------------------------------
# The positional twin of a source


def twin_kwargs(source: nn.Module) -> Dict[str, Any]:
    """`VisionTransformerPosAttn` kwargs that mirror a timm `VisionTransformer` (or our standard twin).

    Raises `ConvertError` naming every feature of the source the positional ViT has no counterpart for.
    """
    if isinstance(source, VisionTransformerPosAttn):
        if source.pos_attn_indices:
            raise ConvertError(f'the source already has positional attention (blocks {source.pos_attn_indices}); '
                               f'convert reads a standard-attention ViT (pos_attn_blocks=none or a timm ViT)')
    elif not isinstance(source, VisionTransformer):
        raise ConvertError(f'cannot convert a {type(source).__name__}: expected a timm VisionTransformer or a '
                           f'vit_posattn_* model with pos_attn_blocks=none')
    blk = source.blocks[0]
    attn = blk.attn
    differs = []
    if getattr(source, 'num_reg_tokens', 0):
        differs.append(f'{source.num_reg_tokens} register tokens')
    if getattr(source, 'no_embed_class', False):
        differs.append('no_embed_class=True (no position for the class token)')
    if getattr(source, 'pos_embed', None) is None:
        differs.append('no absolute position embedding')
    if source.num_prefix_tokens != (1 if source.cls_token is not None else 0):
        differs.append(f'{source.num_prefix_tokens} prefix tokens (e.g. a distillation token)')
    if getattr(source, 'attn_pool', None) is not None:
        differs.append(f"global_pool={source.global_pool!r} (attention pooling)")
    if not isinstance(getattr(source, 'norm_pre', nn.Identity()), nn.Identity):
        differs.append('a pre-norm after the embedding (pre_norm=True)')
    if not isinstance(getattr(source.patch_embed, 'norm', nn.Identity()), nn.Identity):
        differs.append('a norm in the patch embedding')
    if not all(type(b) in (Block, StandardBlock) for b in source.blocks):
        differs.append(f'{type(blk).__name__} blocks (expected the pre-norm timm Block)')
    if type(attn) is not Attention:
        differs.append(f'{type(attn).__name__} attention (expected timm.layers.Attention)')
    else:
        if not isinstance(attn.q_norm, nn.Identity):
            differs.append('qk_norm')
        if not isinstance(attn.norm, nn.Identity):
            differs.append('scale_norm in the attention')
        if getattr(attn, 'gate', None) is not None:
            differs.append('gated attention')
    if type(blk.mlp) is not Mlp:
        differs.append(f'{type(blk.mlp).__name__} MLP (expected timm.layers.Mlp)')
    if differs:
        raise ConvertError(f'cannot mirror {type(source).__name__} as a positional ViT: it has {", ".join(differs)}')
    kwargs = vit_arch_kwargs(source)
    if kwargs['init_values'] is not None:
        kwargs['init_values'] = 1.0  # layer scale present: its values are copied from the source
    else:
        del kwargs['init_values']
    return {k: _compact(v) for k, v in kwargs.items()}


def _compact(value: Any) -> Any:
    """(n, n) -> n, a float that is an integer -> int: shorter model kwargs, as a user would type them."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _twin_arch(kwargs: Dict[str, Any]) -> str:
    """The registered vit_posattn_* architecture with a pretrained tag of the source's input size (any tag: a 28 px
    source matches `.fashion_mnist`) closest in shape to it (most equal shape kwargs, then the nearest width).

    The checkpoint records every shape kwarg, so the name only has to build; the closest one misleads least.
    """
    shape = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio')
    scores = {}
    for name in timm.list_models('vit_posattn_*_patch*'):
        sizes = {_compact(tuple(cfg.input_size[-2:])) for cfg in get_arch_pretrained_cfgs(name).values()}
        if kwargs['img_size'] not in sizes:
            continue
        model = timm.create_model(name, device='meta')  # no memory, no init: only the shape is read
        own = dict(patch_size=_compact(tuple(model.patch_embed.patch_size)), embed_dim=model.embed_dim,
                   depth=len(model.blocks), num_heads=model.blocks[0].attn.pos_map.num_heads,
                   mlp_ratio=_compact(model.blocks[0].mlp.fc1.out_features / model.embed_dim))
        width_ratio = abs(math.log(own['embed_dim'] / kwargs['embed_dim']))
        scores[name] = (sum(own[k] == kwargs[k] for k in shape), -width_ratio)
    return max(scores, key=scores.get) if scores else 'vit_posattn_base_patch16_224'


def _build_positional_twin(source: nn.Module, arch: str, model_kwargs: Dict[str, Any]) -> VisionTransformerPosAttn:
    """The positional model with every shared weight copied from `source` (positional attention freshly initialized).

    The standard twin (`pos_attn_blocks='none'`, same kwargs) must load the source's state dict strictly and give
    its logits: anything the kwargs do not mirror (an activation, a norm, a layer timm added) is caught here.
    """
    try:
        standard = timm.create_model(arch, **{**model_kwargs, 'pos_attn_blocks': 'none'})
        model = timm.create_model(arch, **model_kwargs)
    except (TypeError, ValueError) as e:
        raise ConvertError(f'cannot build the positional twin {arch}: {one_line(e)}') from None
    device = next(source.parameters()).device
    state_dict = source.state_dict()
    incompatible = standard.load_state_dict(state_dict, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ConvertError(f'cannot mirror {type(source).__name__}: its weights differ from the twin {arch}: '
                           f'the source lacks {incompatible.missing_keys[:4]}, has extra '
                           f'{incompatible.unexpected_keys[:4]}')
    standard.to(device).eval()
    probe = torch.randn(2, model_kwargs['in_chans'], *standard.patch_embed.img_size,
                        generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        expected, actual = source(probe).float(), standard(probe).float()
    error = float((expected - actual).abs().max())
    if not error <= 1e-3 * max(1.0, float(expected.abs().max())):
        raise ConvertError(f'cannot mirror {type(source).__name__}: the standard twin {arch} with the same weights '
                           f'gives other logits (max difference {error:.3g}); the source differs in a layer the '
                           f'twin does not mirror (activation, norm or block type)')
    model.load_state_dict(checkpoint_filter_fn(state_dict, model))
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------------------------
# Fitting and measuring positional attention (the source's average attention: `attention_stats`)


def attention_kl(target: torch.Tensor, log_attn: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(target || attn), averaged over heads and rows: (..., H, N, N) -> (...).

    `log_attn` holds log-probabilities (e.g. `logits.log_softmax(-1)`), as in `F.kl_div`.
    """
    return (torch.xlogy(target, target) - target * log_attn).sum(-1).mean((-2, -1))


def _positional_maps(model: VisionTransformerPosAttn) -> List[nn.Module]:
    blocks = [blk for blk in model.blocks if isinstance(blk, PositionalBlock)]
    reparameterized = [i for i, blk in zip(model.pos_attn_indices, blocks) if blk.attn.is_reparameterized()]
    if reparameterized:
        raise ConvertError(f'blocks {reparameterized} are reparameterized (baked attention): there is nothing to fit')
    return [blk.attn.pos_map for blk in blocks]


def _log_attention(maps: Sequence[nn.Module], pos: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    return torch.stack([m.logits(pos, grid_size).float().log_softmax(-1) for m in maps])


def fit_attention(
        model: VisionTransformerPosAttn,
        target: torch.Tensor,
        steps: int = 500,
        lr: float = 1e-2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fit the attention of every positional block of `model` to `target` (positional blocks, H, N, N), in place.

    Minimizes the row-wise KL(target || A), A = pos_map(P), summed over blocks (each block's own parameters: the
    blocks are fitted independently). What moves: each block's positional attention layer and nothing else, i.e.
    the LayerNorm of P and the projections of P ('qk': `norm` + `qk`; 'tied': `norm` + `w`), by Adam with a cosine
    learning rate, full batch, `steps` steps; a 'logits' table is set in closed form, L = log(target), which is exact.
    What stays: the positional table P (`pos_embed`). P is also added to the tokens, so moving it would change every
    feature the copied weights compute; the fit changes only where the tokens' values are mixed from.

    Returns the mean KL per block before and after the fit.
    """
    maps = _positional_maps(model)
    pos, grid_size = model.pos_embed.detach(), tuple(model.patch_embed.grid_size)
    with torch.no_grad():
        expected = _log_attention(maps, pos, grid_size).shape
        if tuple(target.shape) != tuple(expected):
            raise ConvertError(f'the target attention has shape {tuple(target.shape)}; this model\'s positional '
                               f'attention has {tuple(expected)} (positional blocks, heads, tokens, tokens)')
        target = target.to(device=pos.device, dtype=torch.float32)
        before = attention_kl(target, _log_attention(maps, pos, grid_size))
        for m, t in zip(maps, target):
            if isinstance(m, LogitsAttentionMap):
                m.table.copy_(t.clamp_min(torch.finfo(t.dtype).tiny).log())
    free = [i for i, m in enumerate(maps) if not isinstance(m, LogitsAttentionMap)]
    params = [p for i in free for p in maps[i].parameters()]
    if params and steps:
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        free_maps, free_target = [maps[i] for i in free], target[free]
        with torch.enable_grad():
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                attention_kl(free_target, _log_attention(free_maps, pos, grid_size)).sum().backward()
                optimizer.step()
                schedule.step()
    with torch.no_grad():
        after = attention_kl(target, _log_attention(maps, pos, grid_size))
    return before.cpu(), after.cpu()


# --------------------------------------------------------------------------------------------------------------------
# Conversion


@dataclass
class ConversionReport:
    """What `convert_vit` did and measured (`to_dict()` is report.json)."""
    source: str
    arch: str  # the positional model: timm.create_model(arch, **model_kwargs)
    model_kwargs: Dict[str, Any]
    data_config: Dict[str, Any]  # how the source's images are prepared (the converted model's too)
    fit: Dict[str, Any]  # layer, steps, lr, the parameters that moved
    num_calibration_images: int  # averaged over
    num_holdout_images: int  # kept out of the average, for agreement / top-1
    blocks: List[Dict[str, Any]]  # per positional block: KL to the average before/after, its image part, distances
    agreement: Optional[Dict[str, float]]  # % of held-out images where argmax equals the source's
    top1: Optional[Dict[str, float]]  # % correct on the held-out images (when the batches bring labels)
    seconds: float
    source_attention: Optional[torch.Tensor] = field(default=None, repr=False)  # (positional blocks, H, N, N)

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != 'source_attention'}


def _input_size(source: nn.Module) -> Tuple[Optional[int], ...]:
    """(channels, height, width) the source takes; None where it takes any (dynamic image size)."""
    embed = source.patch_embed
    size = (None, None) if getattr(embed, 'dynamic_img_size', False) or not getattr(embed, 'strict_img_size', True) \
        else tuple(embed.img_size)
    return (embed.proj.in_channels, *size)


def _checked(x: torch.Tensor, input_size: Tuple[Optional[int], ...]) -> torch.Tensor:
    expected = 'x'.join('*' if s is None else str(s) for s in input_size)
    if x.dim() != 4 or any(e is not None and s != e for s, e in zip(x.shape[1:], input_size)):
        raise ConvertError(f'calibration images of shape {tuple(x.shape)}: the source takes (batch, {expected}) '
                           f'images; prepare them for the source (its pretrained cfg\'s input size)')
    return x


def _batches(images: Union[torch.Tensor, Iterable[Batch]], batch_size: int,
             input_size: Tuple[Optional[int], ...] = (None, None, None)
             ) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(images, targets or None) from a tensor of images or an iterable of batches (a tensor or (images, targets)),
    each of the size the source takes."""
    if isinstance(images, torch.Tensor):
        yield from ((_checked(x, input_size), None) for x in images.split(batch_size))
        return
    for batch in images:
        if isinstance(batch, torch.Tensor):
            yield _checked(batch, input_size), None
        elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            targets = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
            yield _checked(batch[0], input_size), targets
        else:
            raise ConvertError(f'a calibration batch must be an image tensor or (images, targets), got '
                               f'{type(batch).__name__}')


class _HeldOut:
    """Calibration images kept out of the average (every 1/fraction-th image), to measure the converted model on."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.seen = 0
        self.images: List[torch.Tensor] = []
        self.targets: List[torch.Tensor] = []

    def split(self, batches: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> Iterator[torch.Tensor]:
        """Yield the calibration part of each batch; keep the held-out part (on the CPU)."""
        for x, y in batches:
            index = torch.arange(self.seen, self.seen + x.shape[0], dtype=torch.float64)
            held = torch.floor((index + 1) * self.fraction) > torch.floor(index * self.fraction)
            self.seen += x.shape[0]
            if held.any():
                self.images.append(x[held.to(x.device)].cpu())
                if y is not None:
                    self.targets.append(y[held.to(y.device)].cpu())
            if not held.all():
                yield x[~held.to(x.device)]

    @property
    def count(self) -> int:
        return sum(x.shape[0] for x in self.images)

    def labels(self, num_classes: int) -> Optional[torch.Tensor]:
        """Targets of the held-out images, if every image has one the source can predict."""
        if not self.targets or sum(len(y) for y in self.targets) != self.count:
            return None
        targets = torch.cat(self.targets)
        if targets.dtype.is_floating_point or targets.ndim != 1 or int(targets.min()) < 0 \
                or int(targets.max()) >= num_classes:
            _logger.warning(f'held-out labels are not class indices of the source ({num_classes} classes): no top-1')
            return None
        return targets

    def predict(self, model: nn.Module) -> torch.Tensor:
        device = next(model.parameters()).device
        with torch.no_grad():
            return torch.cat([model(x.to(device)).argmax(-1).cpu() for x in self.images])


def _kl(value: torch.Tensor) -> float:
    return round(max(float(value), 0.0), 6)  # >= 0; float rounding can give -1e-9 for an exact fit


def _percent(hits: torch.Tensor) -> float:
    return round(100.0 * float(hits.float().mean()), 3)


def _source_data_config(source: nn.Module, recorded: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """How the source's images are prepared: its pretrained cfg, under what a train.py checkpoint recorded (its
    --mean/--std/...), at the source's own input size."""
    in_chans = source.patch_embed.proj.in_channels  # a 1-value mean is expanded to the source's channels, not 3
    config = resolve_data_config({'in_chans': in_chans, **{k: v for k, v in (recorded or {}).items()
                                                            if k in PREPROCESSING_KEYS and v}}, model=source)
    config['input_size'] = (source.patch_embed.proj.in_channels, *source.patch_embed.img_size)
    return config


def load_source(source: Union[str, os.PathLike], pretrained: Optional[bool] = None
                ) -> Tuple[nn.Module, Dict[str, Any], Dict[str, Any]]:
    """The source model (eval mode) through `loading.load_model`, how its images are prepared, and the train.py
    arguments its checkpoint recorded (empty for names, hub repos and folders). Refuses a source it cannot mirror."""
    recorded = read_checkpoint(source).args if os.path.isfile(source) else {}
    model = load_model(source, pretrained=pretrained).model.eval()
    twin_kwargs(model)
    return model, _source_data_config(model, recorded), recorded


def _block_report(model: VisionTransformerPosAttn, target: torch.Tensor, kl_before: torch.Tensor,
                  kl_after: torch.Tensor, kl_image: torch.Tensor) -> List[Dict[str, Any]]:
    """Per positional block: KL to the source average before and after the fit, the image-dependent KL no
    positional attention can remove, and the attention distances of the source average and of the fitted attention."""
    grid_size, prefix = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
    distance_source = attention_distance(target, grid_size, prefix).cpu()
    distance_fitted = attention_distance(model.get_attention_maps().float(), grid_size, prefix).cpu()
    return [dict(block=b, kl_before=_kl(kl_before[i]), kl_after=_kl(kl_after[i]), kl_image=_kl(kl_image[i]),
                 distance_source=round(float(distance_source[i].mean()), 4),
                 distance_fitted=round(float(distance_fitted[i].mean()), 4),
                 distance_source_heads=[round(float(d), 4) for d in distance_source[i]],
                 distance_fitted_heads=[round(float(d), 4) for d in distance_fitted[i]])
            for i, b in enumerate(model.pos_attn_indices)]


def convert_vit(
        source: Union[nn.Module, str],
        images: Union[torch.Tensor, Iterable[Batch]],
        pos_attn_layer: str = 'qk',
        pos_attn_blocks: Union[str, int, Sequence[int]] = 'all',
        fit_steps: int = 500,
        fit_lr: float = 1e-2,
        holdout: float = 0.2,
        batch_size: int = 64,
        pretrained: Optional[bool] = None,
        data_config: Optional[Dict[str, Any]] = None,
        seed: int = 0,
) -> Tuple[VisionTransformerPosAttn, ConversionReport]:
    """A positional ViT from a standard one: copy the shared weights, fit the attention to the source's average.

    Args:
        source: a timm VisionTransformer or our standard twin (`pos_attn_blocks='none'`), as a module, a registered
            name, a checkpoint, `hf-hub:` or `local-dir:` (loaded by `timm_posattn.loading.load_model`).
        images: calibration images, already normalized for the source: a tensor (B, C, H, W) or an iterable of
            batches (tensors, or (images, targets) as a timm loader yields them; targets give held-out top-1).
        pos_attn_layer: positional attention layer of the converted model ('qk', 'tied', 'logits').
        pos_attn_blocks: blocks made positional ('all', first k, indices); the others keep the source's attention.
        fit_steps: Adam steps of the fit ('qk', 'tied'); 0 keeps the copy-only model.
        fit_lr: peak learning rate of the fit (cosine to 0).
        holdout: fraction of the images (every 1/holdout-th) kept out of the average to measure agreement on.
        batch_size: batch size when `images` is one tensor.
        pretrained: for a registered name, load its published weights.
        data_config: how the source's images are prepared (the converted model's pretrained cfg, and the
            checkpoint's mean/std/...); default: the source's pretrained cfg, under what its train.py checkpoint
            recorded.
        seed: seed of the fresh positional attention the fit starts from.

    Returns the converted model (eval mode, on the source's device; the source is left in eval mode) and a
    `ConversionReport`. The fit moves the
    positional attention layers only, never the positional table P (see `fit_attention`). The held-out images are
    kept in memory (on the CPU) until the fitted model has been measured on them.
    """
    start = time.time()
    name = type(source).__name__ if isinstance(source, nn.Module) else str(source)
    if not 0 <= holdout < 1:
        raise ConvertError(f'holdout={holdout}: expected a fraction in [0, 1)')
    for what, value, ok, expected in (('fit_steps', fit_steps, isinstance(fit_steps, int) and fit_steps >= 0,
                                       'an integer >= 0 (0: copy only)'),
                                      ('batch_size', batch_size, isinstance(batch_size, int) and batch_size >= 1,
                                       'an integer >= 1'),
                                      ('fit_lr', fit_lr, isinstance(fit_lr, (int, float)) and 0 < fit_lr < math.inf,
                                       'a finite number > 0')):
        if not ok or isinstance(value, bool):
            raise ConvertError(f'{what}={value!r}: expected {expected}')
    if isinstance(source, (str, os.PathLike)):
        source, source_config, _ = load_source(source, pretrained)
        data_config = data_config or source_config
    check_finite(source, f'the source {name}')  # before anything is blamed on the architecture
    kwargs = twin_kwargs(source)
    try:
        resolve_pos_attn_blocks(pos_attn_blocks, kwargs['depth'])
    except ValueError as e:
        raise ConvertError(str(e)) from None
    source.eval()
    data_config = {k: v for k, v in (data_config or _source_data_config(source)).items() if k in PREPROCESSING_KEYS}
    arch = _twin_arch(kwargs)
    model_kwargs = dict(kwargs, pos_attn_blocks=pos_attn_blocks, pos_attn_layer=pos_attn_layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_positional_twin(source, arch, model_kwargs)
    # in memory, the model prepares images like its source (a checkpoint records them as train.py does: in args)
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **data_config}

    held_out = _HeldOut(holdout)
    recorded = record_average_attention(source, held_out.split(_batches(images, batch_size, _input_size(source))))
    target = recorded.average[model.pos_attn_indices]
    measure = held_out.count and model.num_classes  # a headless source has no prediction to agree with
    if measure:
        source_pred, copy_pred = held_out.predict(source), held_out.predict(model)

    kl_before, kl_after = fit_attention(model, target, steps=fit_steps, lr=fit_lr)
    check_finite(model, f'the model converted from {name}')

    blocks = _block_report(model, target, kl_before, kl_after, recorded.image_kl[model.pos_attn_indices])
    agreement = top1 = None
    if measure:
        fitted_pred = held_out.predict(model)
        agreement = dict(copy_only=_percent(copy_pred == source_pred), fitted=_percent(fitted_pred == source_pred))
        labels = held_out.labels(model.num_classes)
        if labels is not None:
            top1 = dict(source=_percent(source_pred == labels), copy_only=_percent(copy_pred == labels),
                        fitted=_percent(fitted_pred == labels))
    maps = _positional_maps(model)
    moved = sorted({f'blocks.*.attn.pos_map.{n}' for m in maps for n, _ in m.named_parameters()})
    fit = dict(pos_attn_layer=pos_attn_layer, steps=fit_steps, lr=fit_lr, moved=moved, fixed=['pos_embed'],
               closed_form=isinstance(maps[0], LogitsAttentionMap))
    report = ConversionReport(
        source=name, arch=arch, model_kwargs=model_kwargs, data_config=data_config, fit=fit,
        num_calibration_images=recorded.count, num_holdout_images=held_out.count, blocks=blocks,
        agreement=agreement, top1=top1, seconds=round(time.time() - start, 2), source_attention=target.cpu())
    return model, report


# --------------------------------------------------------------------------------------------------------------------
# Outputs


def attention_comparison_figure(
        model: VisionTransformerPosAttn,
        source_attention: torch.Tensor,
        blocks: Optional[Sequence[int]] = None,
        heads: Optional[Sequence[int]] = None,
) -> Any:
    """A matplotlib figure: per block (row) and head, the centre patch's attention row, source average | fitted.

    `blocks` are model block indices (default: first, middle and last positional block), `heads` head indices
    (default: the first four). Each pair of panels shares one colour scale, from the pair's smallest to its largest
    patch weight (a near-uniform row shows its small deviations); the titles give each row's largest weight.
    """
    plt = pyplot()

    indices = list(model.pos_attn_indices)
    if blocks is None:
        blocks = sorted({indices[0], indices[len(indices) // 2], indices[-1]})
    if heads is None:
        heads = list(range(min(4, source_attention.shape[1])))
    fitted = model.get_attention_maps().float().cpu()
    source_attention = source_attention.float().cpu()
    grid, prefix = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
    query = (grid[0] // 2) * grid[1] + grid[1] // 2
    fig, axes = plt.subplots(len(blocks), 2 * len(heads), squeeze=False,
                             figsize=(1.3 * 2 * len(heads) + 0.8, 1.6 * len(blocks) + 0.7))
    for r, b in enumerate(blocks):
        p = indices.index(b)
        for c, h in enumerate(heads):
            rows = [('source', source_attention[p, h, prefix + query]), ('fitted', fitted[p, h, prefix + query])]
            vmin = min(float(row[prefix:].min()) for _, row in rows)
            vmax = max(float(row[prefix:].max()) for _, row in rows)
            for k, (what, row) in enumerate(rows):
                ax = axes[r, 2 * c + k]
                ax.imshow(row[prefix:].reshape(grid).numpy(), cmap='viridis', vmin=vmin, vmax=vmax)
                ax.set_title(f'b{b} h{h} {what}\nmax {float(row[prefix:].max()):.3f}', fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
    fig.suptitle(f'attention of the centre patch {divmod(query, grid[1])} on the {grid[0]}x{grid[1]} grid: source '
                 f'averaged over images | fitted positional', fontsize=8)
    fig.tight_layout()
    return fig


def checkpoint_args(report: ConversionReport, **extra: Any) -> Dict[str, Any]:
    """The `args` of the converted checkpoint: what `loading`, validate.py and train.py read back.

    As train.py records them: the classes and channels as their own arguments (train.py and validate.py pass them to
    `create_model` separately), every other kwarg in `model_kwargs`, and the source's `mean`, `std`, `crop_pct`,
    `interpolation` and `crop_mode` (the input size is the model's).
    """
    model_kwargs = {k: v for k, v in report.model_kwargs.items() if k not in ('num_classes', 'in_chans')}
    args = dict(model=report.arch, model_kwargs=model_kwargs, num_classes=report.model_kwargs['num_classes'],
                in_chans=report.model_kwargs['in_chans'], converted_from=report.source)
    args.update({k: v for k, v in report.data_config.items() if k != 'input_size'})
    args.update(extra)
    return args


def output_folder(path: str, overwrite: bool = False) -> OutputFolder:
    """The folder the command writes its three files into (`outputs`: claimed, replaced only when told)."""
    return OutputFolder(path, OUTPUT_FILES, overwrite=overwrite, command='python -m timm_posattn.convert',
                        key='convert')


def write_conversion(claim: FolderClaim, model: VisionTransformerPosAttn, report: ConversionReport,
                     args: Dict[str, Any]) -> List[str]:
    """Write the checkpoint (train.py format), report.json and the attention plot into the claimed folder, as one
    set (a kill never leaves a report of another conversion beside the checkpoint); returns the paths."""
    plt = pyplot()
    checkpoint = make_checkpoint(report.arch, 0, {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                 args=args)
    claim.stage(CHECKPOINT_NAME, lambda f: write_checkpoint(checkpoint, f))
    claim.stage_text(REPORT_NAME, json.dumps(report.to_dict(), indent=2) + '\n')
    fig = attention_comparison_figure(model, report.source_attention)
    try:
        claim.stage(PLOT_NAME, lambda f: fig.savefig(f, format='png', dpi=110))
    finally:
        plt.close(fig)
    return claim.commit()


# --------------------------------------------------------------------------------------------------------------------
# Command


def _pos_attn_blocks(text: str) -> Union[str, int, List[int]]:
    if text == 'all':
        return text
    try:
        return [int(i) for i in text.split(',')] if ',' in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', a block count or comma-separated block indices, "
                                         f"got {text!r}") from None


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog='python -m timm_posattn.convert',
        description='Convert a standard ViT (timm or vit_posattn_* with pos_attn_blocks=none) into a positional ViT: '
                    'copy the weights and fit the positional attention to the source\'s image-averaged attention.')
    parser.add_argument('--source', required=True, metavar='NAME_OR_PATH',
                        help='timm model name, train.py checkpoint, weights file, hf-hub:ORG/REPO or local-dir:DIR')
    parser.add_argument('--pretrained', action='store_true',
                        help='load the published weights of a model name (folders, hub repos and checkpoints '
                             'always bring their own)')
    parser.add_argument('--data-dir', default=None, metavar='DIR', help='calibration dataset location')
    parser.add_argument('--dataset', default='', metavar='NAME',
                        help="dataset name as in train.py: '' (image folder or tar), structured, torch/cifar10, ...")
    parser.add_argument('--split', default='train', help='dataset split (default: train)')
    parser.add_argument('--num-images', type=int_range(1), default=1000, metavar='N',
                        help='calibration images, drawn at random from the split (default: 1000)')
    parser.add_argument('--holdout', type=float_range(0, 1, high_open=True), default=0.2, metavar='F',
                        help='fraction kept out of the average to measure agreement on (default: 0.2)')
    parser.add_argument('--data-seed', type=int, default=None,
                        help="seed of the structured dataset (default: the source checkpoint's, else 0)")
    parser.add_argument('--pos-attn-layer', default='qk', choices=list_pos_attn_layers(),
                        help='positional attention layer of the converted model (default: qk)')
    parser.add_argument('--pos-attn-blocks', '--pos-attn-layers', default='all', type=_pos_attn_blocks,
                        metavar='BLOCKS',
                        help="blocks made positional: 'all' (default), a count k (the first k) or indices 0,2,5")
    parser.add_argument('--fit-steps', type=int_range(0), default=500, metavar='N',
                        help='Adam steps of the attention fit (default: 500; 0: copy only)')
    parser.add_argument('--fit-lr', type=float_range(0, low_open=True), default=1e-2, metavar='LR',
                        help='peak learning rate of the fit, cosine to 0 (default: 0.01)')
    parser.add_argument('-b', '--batch-size', type=int_range(1), default=64, metavar='N')
    parser.add_argument('-j', '--workers', type=int_range(0), default=2, metavar='N', help='data loading workers')
    parser.add_argument('--seed', type=int, default=0, help='seed of the image draw and of the fit (default: 0)')
    parser.add_argument('--device', default=None, type=device_arg,
                        help='device (default: cuda if available, else cpu)')
    parser.add_argument('--out', required=True, metavar='DIR',
                        help=f'output folder for {CHECKPOINT_NAME}, {REPORT_NAME} and {PLOT_NAME}')
    parser.add_argument('--overwrite', action='store_true', help='replace those files if the folder has them')
    return parser


def _calibration_batches(loader: Iterable, num_images: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches, cut at `num_images` (for datasets without a length)."""
    left = num_images
    for x, y in loader:
        if left <= 0:
            return
        yield x[:left], y[:left]
        left -= x.shape[0]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the command; returns the report (as in report.json)."""
    from .data import create_dataset, is_structured, random_subset
    from .evaluation import image_mode

    args = _parser().parse_args(argv)
    folder = output_folder(args.out, overwrite=args.overwrite).check()
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    source, data_config, saved = load_source(args.source, pretrained=True if args.pretrained else None)
    source.to(device)
    if not (args.pretrained or os.path.exists(args.source) or args.source.startswith(('hf-hub:', 'local-dir:'))):
        print(f'note: {args.source} has random weights (no --pretrained): the conversion is only a smoke test')
    data_seed = args.data_seed if args.data_seed is not None else saved.get('data_seed', 0)

    structured = is_structured(args.dataset)
    dataset = create_dataset(args.dataset, root=args.data_dir, split=args.split, data_seed=data_seed,
                             num_samples=args.num_images if structured else None,
                             input_img_mode=image_mode(data_config))
    dataset = random_subset(dataset, args.num_images, args.seed)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        use_prefetcher=False, interpolation=data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
        num_workers=args.workers)

    with folder.claim() as claim:  # no other process writes here until the set is committed
        model, report = convert_vit(
            source, _calibration_batches(loader, args.num_images), pos_attn_layer=args.pos_attn_layer,
            pos_attn_blocks=args.pos_attn_blocks, fit_steps=args.fit_steps, fit_lr=args.fit_lr,
            holdout=args.holdout, data_config=data_config, seed=args.seed)
        report.source = args.source
        ckpt_args = checkpoint_args(report, dataset=args.dataset, data_dir=args.data_dir,
                                    split=args.split, data_seed=data_seed)
        paths = write_conversion(claim, model, report, ckpt_args)

    print(f'{report.source} -> {report.arch} ({args.pos_attn_layer}), {report.num_calibration_images} calibration '
          f'images, {report.num_holdout_images} held out, {report.seconds:.1f} s')
    for b in report.blocks:
        print(f"  block {b['block']:2d}: KL to the source average {b['kl_before']:.4f} -> {b['kl_after']:.4f} "
              f"(image-dependent part, out of reach: {b['kl_image']:.4f}); attention distance source "
              f"{b['distance_source']:.2f}, fitted {b['distance_fitted']:.2f} patches")
    if report.agreement:
        print(f"  agreement with the source (held out): copy-only {report.agreement['copy_only']:.1f}%, "
              f"fitted {report.agreement['fitted']:.1f}%")
    if report.top1:
        print(f"  top-1 (held out): source {report.top1['source']:.1f}%, copy-only {report.top1['copy_only']:.1f}%, "
              f"fitted {report.top1['fitted']:.1f}%")
    for path in paths:
        print(f'wrote {path}')
    print(f'train from it: python train.py {_train_flags(ckpt_args)} --initial-checkpoint {paths[0]}')
    return report.to_dict()


def _train_flags(args: Dict[str, Any]) -> str:
    """The train.py flags that build the converted model (train.py reads no model kwargs from --initial-checkpoint);
    the size and channels as --input-size, which sizes the model and the data alike."""
    height, width = to_2tuple(args['model_kwargs']['img_size'])
    kwargs = ' '.join(f'{k}={str(v).replace(" ", "")}' for k, v in args['model_kwargs'].items() if k != 'img_size')
    flags = (f"--model {args['model']} --num-classes {args['num_classes']} --input-size {args['in_chans']} {height} "
             f"{width} --model-kwargs {kwargs}")
    if 'mean' in args and 'std' in args:
        flags += f" --mean {' '.join(map(str, args['mean']))} --std {' '.join(map(str, args['std']))}"
    return flags


def run(argv: Optional[Sequence[str]] = None) -> int:
    """The command under the package's error policy: a user error is one line and exit code 2."""
    from .data import DatasetError
    return run_command(lambda: main(argv), argv, user_errors=(DatasetError,),
                       on_interrupt=lambda: 'the output files are written at the end, each one complete or not at all')


if __name__ == '__main__':
    raise SystemExit(run())
