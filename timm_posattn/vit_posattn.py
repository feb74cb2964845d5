""" Positional-attention Vision Transformer (ViT-PosAttn) in PyTorch

A ViT whose attention matrices depend only on the positional encodings, never on the image, as studied in:
  * `Vision Transformers provably learn spatial structure` - https://arxiv.org/abs/2210.09221
    (Jelassi, Sander & Li, NeurIPS 2022)

For every positional block and head h (with the default positional attention layer, 'qk'):

    A_h = softmax((LN(P)·Wq_h)(LN(P)·Wk_h)ᵀ / √d_head)        P: the model's positional table, (N, C)
    out = proj(concat_h A_h·(X·Wv_h))

P is the model's one learned `pos_embed` (class token position included, as in timm's ViT), shared by all blocks; each
block has its own positional attention layer (`attn.pos_map`, chosen by `pos_attn_layer`: 'qk', 'tied', 'logits' or
a class, see `timm_posattn.layers`). P is also added to the patch tokens as in timm's ViT, so the rest of the network
is a standard pre-norm ViT.

Because A depends on no image it is computed once per forward for the whole batch (from N positional rows, not B·N
tokens) and applied with one batched matmul per block. Nothing is cached: every forward computes A from the current
parameters. For inference, `timm.utils.reparameterize_model(model)` bakes each block's A into a buffer. In training,
backward recomputes A·V from the saved values instead of storing it (one bmm, since A is shared): each block keeps one
(B, N, C) activation less. `pos_attn_blocks` chooses which blocks are positional: 'all', 'none' (timm's ordinary
attention everywhere: the standard twin), the first k, or a list of indices.
"""
import inspect
import logging
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.jit import Final

from timm.layers import (
    LayerNorm,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_device_dtype,
    get_norm_layer,
    resample_abs_pos_embed,
    resample_patch_embed,
    to_2tuple,
)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, named_apply, register_model
from timm.models._features import feature_take_indices  # timm's own models import it from here
from timm.models.vision_transformer import Block, get_init_weights_vit, global_pool_nlc

from .dataset_info import DATASETS
from .layers import GridSize, PositionalAttentionMap, PositionalBlock
from .published import check_finite, verify_pretrained_source
from .releases import hub_cfg

__all__ = [
    'VisionTransformerPosAttn', 'StandardBlock', 'checkpoint_filter_fn', 'resolve_pos_attn_blocks', 'vit_arch_kwargs',
    'rename_deprecated_kwargs',
]

_logger = logging.getLogger(__name__)

PosAttnBlocks = Union[str, int, Sequence[int]]


class StandardBlock(Block):
    """timm's ViT block (image-dependent attention); takes and ignores the positional table.

    Block.forward written out (TorchScript has no super()); tests check the twin's logits equal timm's ViT's.
    """

    def forward(self, x: torch.Tensor, pos: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def resolve_pos_attn_layers(pos_attn_layers: PosAttnBlocks, depth: int) -> List[int]:
    """The old name of `resolve_pos_attn_blocks` (until 0.4)."""
    warnings.warn('resolve_pos_attn_layers is now resolve_pos_attn_blocks', FutureWarning, stacklevel=2)
    return resolve_pos_attn_blocks(pos_attn_layers, depth)


def resolve_pos_attn_blocks(pos_attn_blocks: PosAttnBlocks, depth: int) -> List[int]:
    """Turn the `pos_attn_blocks` model argument into sorted block indices, with an error naming what is accepted."""
    if isinstance(pos_attn_blocks, str):
        if pos_attn_blocks == 'all':
            return list(range(depth))
        if pos_attn_blocks == 'none':
            return []
        raise ValueError(
            f"pos_attn_blocks must be 'all', 'none', an int (first k blocks) or a list of block indices, "
            f"got {pos_attn_blocks!r}")
    if isinstance(pos_attn_blocks, bool):
        raise ValueError(f'pos_attn_blocks must not be a bool, got {pos_attn_blocks!r}')
    if isinstance(pos_attn_blocks, int):
        if not 0 <= pos_attn_blocks <= depth:
            raise ValueError(f'pos_attn_blocks={pos_attn_blocks}: expected a block count between 0 and depth={depth}')
        return list(range(pos_attn_blocks))
    indices = sorted({int(i) + depth if int(i) < 0 else int(i) for i in pos_attn_blocks})
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f'pos_attn_blocks has block indices {bad} outside 0..{depth - 1}')
    return indices


class VisionTransformerPosAttn(nn.Module):
    """ Vision Transformer with positional attention

    A PyTorch impl of the positional-attention ViT of `Vision Transformers provably learn spatial structure`
        - https://arxiv.org/abs/2210.09221
    """
    dynamic_img_size: Final[bool]

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            init_values: Optional[float] = None,
            class_token: bool = True,
            pos_attn_blocks: PosAttnBlocks = 'all',
            pos_attn_layer: Union[str, Type[PositionalAttentionMap]] = 'qk',
            pos_attn_norm: bool = True,
            pos_attn_init: str = 'random',
            pos_attn_init_scale: float = 1.0,
            fc_norm: Optional[bool] = None,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            weight_init: str = '',
            embed_layer: Callable = PatchEmbed,
            norm_layer: Optional[Union[str, Type[nn.Module]]] = None,
            act_layer: Optional[Union[str, Type[nn.Module]]] = None,
            mlp_layer: Type[nn.Module] = Mlp,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            img_size: Input image size.
            patch_size: Patch size.
            in_chans: Number of image input channels.
            num_classes: Number of classes for classification head.
            global_pool: Pooling of the final tokens ('token', 'avg', 'avgmax', 'max' or '').
            embed_dim: Transformer embedding dimension.
            depth: Number of blocks.
            num_heads: Number of attention heads.
            mlp_ratio: Ratio of MLP hidden dim to embedding dim.
            qkv_bias: Bias in the Q/K/V projections (positional ones included).
            proj_bias: Bias in the attention output and MLP projections.
            init_values: Layer-scale init values (layer-scale enabled if not None).
            class_token: Use a class token (its position is the first row of the positional table).
            pos_attn_blocks: Blocks with positional attention: 'all', 'none', first k, or a list of indices.
            pos_attn_layer: Positional attention layer of those blocks: 'qk' (separate query/key maps of P), 'tied'
                (one map: symmetric logits), 'logits' (a free logit table), or a `PositionalAttentionMap` class.
            pos_attn_norm: LayerNorm the positional table in each positional block before projecting it.
            pos_attn_init: Init of the positional attention: 'random' (timm's ViT init: attention starts near
                uniform) or 'local' (each position first attends mostly to itself, A ≈ softmax(beta·I): the paper's
                local init).
            pos_attn_init_scale: beta of the 'local' init: the self logit each head starts with.
            fc_norm: Norm after pooling instead of before (default: True for avg pooling).
            dynamic_img_size: Accept any input size: positional table resampled and attention recomputed per grid.
            dynamic_img_pad: Pad inputs not divisible by the patch size (needs dynamic_img_size).
            drop_rate: Head dropout rate.
            pos_drop_rate: Dropout on tokens after the position embedding is added.
            proj_drop_rate: Projection dropout rate.
            attn_drop_rate: Attention dropout rate.
            drop_path_rate: Stochastic depth rate.
            weight_init: Weight init scheme ('', 'jax', 'jax_nlhb', 'moco', 'skip').
            embed_layer: Patch embedding layer.
            norm_layer: Normalization layer.
            act_layer: MLP activation layer.
            mlp_layer: MLP layer.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_global_pool(global_pool, class_token)
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})')
        if pos_attn_init not in ('random', 'local'):
            raise ValueError(f"pos_attn_init must be 'random' or 'local', got {pos_attn_init!r}")
        if dynamic_img_pad and not dynamic_img_size:
            raise ValueError('dynamic_img_pad needs dynamic_img_size=True (padded inputs have a larger patch grid)')
        if not dynamic_img_pad:
            _check_divisible(img_size, patch_size)
        use_fc_norm = global_pool in ('avg', 'avgmax', 'max') if fc_norm is None else fc_norm
        norm_layer = get_norm_layer(norm_layer) or LayerNorm
        act_layer = get_act_layer(act_layer) or nn.GELU

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.num_reg_tokens = 0
        self.has_class_token = class_token
        self.no_embed_class = False  # the positional table always covers the class token: it takes part in A
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.pos_attn_indices = resolve_pos_attn_blocks(pos_attn_blocks, depth)
        self.pos_attn_init = pos_attn_init
        self.pos_attn_init_scale = float(pos_attn_init_scale)

        embed_args = {}
        if dynamic_img_size:
            embed_args.update(dict(strict_img_size=False, output_fmt='NHWC'))
        self.patch_embed = embed_layer(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            dynamic_img_pad=dynamic_img_pad,
            **embed_args,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        reduction = self.patch_embed.feat_ratio() if hasattr(self.patch_embed, 'feat_ratio') else patch_size

        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + self.num_prefix_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)
        block_args = dict(
            dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            init_values=init_values,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=norm_layer,
            act_layer=act_layer,
            mlp_layer=mlp_layer,
            **dd,
        )
        pos_block_args = dict(
            grid_size=self.patch_embed.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
            pos_attn_layer=pos_attn_layer,
            pos_norm=pos_attn_norm,
        )
        self.blocks = nn.ModuleList([  # not Sequential: positional blocks also take the positional table
            PositionalBlock(drop_path=dpr[i], **pos_block_args, **block_args)
            if i in self.pos_attn_indices else StandardBlock(drop_path=dpr[i], **block_args)
            for i in range(depth)])
        for blk in self._positional_blocks():
            blk.attn.pos_source = self._native_pos_table  # what reparameterize() computes A from
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd) if not use_fc_norm else nn.Identity()

        self.fc_norm = norm_layer(embed_dim, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self.weight_init_mode = 'reset' if weight_init == 'skip' else weight_init
        if weight_init != 'skip':
            self.init_weights(needs_reset=False)

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """Initialize weights the way timm's ViT does ('', 'jax', 'jax_nlhb', 'moco' or 'reset')."""
        mode = mode or self.weight_init_mode
        assert mode in ('jax', 'jax_nlhb', 'moco', 'reset', '')
        head_bias = -math.log(self.num_classes) if 'nlhb' in mode and self.num_classes > 0 else 0.
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        named_apply(get_init_weights_vit(mode, head_bias, needs_reset=needs_reset), self)
        if self.pos_attn_init == 'local':
            for blk in self._positional_blocks():
                blk.attn.pos_map.init_local(self.pos_attn_init_scale)

    def _positional_blocks(self) -> List[PositionalBlock]:
        return [blk for blk in self.blocks if isinstance(blk, PositionalBlock)]

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        names = {'pos_embed', 'cls_token'}
        for i, blk in enumerate(self.blocks):
            if isinstance(blk, PositionalBlock):
                names |= {f'blocks.{i}.attn.pos_map.{n}' for n in blk.attn.pos_map.no_weight_decay()}
        return names

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^cls_token|pos_embed|patch_embed',  # stem and embed
            blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))]
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            _check_global_pool(global_pool, self.has_class_token)
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def set_input_size(
            self,
            img_size: Optional[Tuple[int, int]] = None,
            patch_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        """Change the input resolution (and patch size): the positional table and the positional attention layers
        are resampled to the new grid."""
        if img_size is not None and not getattr(self.patch_embed, 'dynamic_img_pad', False):
            _check_divisible(img_size, patch_size or self.patch_embed.patch_size)
        prev_grid_size = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        grid_size = self.patch_embed.grid_size
        for blk in self._positional_blocks():
            blk.attn.pos_map.set_grid_size(grid_size)  # refuses before anything changes if it cannot follow
        num_new_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        if num_new_tokens != self.pos_embed.shape[1] or grid_size != prev_grid_size:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed,
                new_size=grid_size,
                old_size=prev_grid_size,
                num_prefix_tokens=self.num_prefix_tokens,
                verbose=True,
            ), requires_grad=self.pos_embed.requires_grad)
        try:  # record the new size for save_for_hf / hub export, where this timm version supports it
            from timm.models._input import update_model_input_size
            update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size)
        except ImportError:
            pass

    def _pos_table(self, grid_size: GridSize) -> torch.Tensor:
        """The positional table P (1, N, C) for a patch grid: class token row first, resampled if the grid changed.

        Kept with its leading 1 rather than indexed: under no-grad, `param[0]` is a view that claims requires_grad
        without a grad_fn, which breaks tools that hook modules (FlopCounterMode's module tracker).
        """
        if grid_size == self.patch_embed.grid_size:
            return self.pos_embed
        return resample_abs_pos_embed(
            self.pos_embed,
            new_size=grid_size,
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
        )

    @torch.jit.ignore
    def _native_pos_table(self) -> Tuple[torch.Tensor, GridSize]:
        """(P, grid) of the model's own grid: what a positional layer's reparameterize() bakes its attention from."""
        grid_size = tuple(self.patch_embed.grid_size)
        return self._pos_table(grid_size), grid_size

    def _grid_size_for(self, img_size: Optional[Union[int, Tuple[int, int]]]) -> GridSize:
        if img_size is None:
            return tuple(self.patch_embed.grid_size)
        return tuple(self.patch_embed.dynamic_feat_size(to_2tuple(img_size)))

    @torch.jit.ignore
    def get_attention_maps(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """Positional attention of every positional block: (blocks, heads, N, N), rows sum to 1. Needs no image.

        N = num_prefix_tokens + grid_h * grid_w (class token first). `img_size` gives the maps of another
        resolution (computed as a forward at that size would).
        """
        blocks = self._positional_blocks()
        if not blocks:
            raise ValueError('this model has no positional-attention blocks (pos_attn_blocks=none)')
        grid_size = self._grid_size_for(img_size)
        with torch.no_grad():
            pos = self._pos_table(grid_size)
            return torch.stack([blk.attn.pos_map(pos, grid_size) for blk in blocks])

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, GridSize]:
        """Patch-embed, add positions, prepend the class token; returns the tokens, the positional table, the grid."""
        torch._assert(x.ndim == 4, 'expected an image batch of shape (B, C, H, W)')
        torch._assert(x.shape[1] == self.in_chans, f'expected an input of shape (B, {self.in_chans}, H, W)')
        x = self.patch_embed(x)
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            grid_size = (H, W)
            x = x.reshape(B, H * W, C)
        else:
            grid_size = self.patch_embed.grid_size
        pos = self._pos_table(grid_size)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + pos)
        return x, pos, grid_size

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates.

        Args:
            x: Input image tensor
            indices: Take last n blocks if int, all if None, select matching indices if sequence
            return_prefix_tokens: Return both prefix and spatial intermediate tokens
            norm: Apply norm layer to all intermediates
            stop_early: Stop iterating over blocks when last desired intermediate hit
            output_fmt: Shape of intermediate feature outputs ('NCHW' or 'NLC')
            intermediates_only: Only return intermediate features
        """
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        reshape = output_fmt == 'NCHW'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B = x.shape[0]
        x, pos, grid_size = self._embed(x)
        last_index = len(self.blocks) - 1 if torch.jit.is_scripting() or not stop_early else max_index
        for i, blk in enumerate(self.blocks):
            if i <= last_index:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, pos, grid_size)
                else:
                    x = blk(x, pos, grid_size)
                if i in take_indices:
                    intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if reshape:
            H, W = grid_size
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens))

        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks (and optionally norm / head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.pos_attn_indices = [i for i in self.pos_attn_indices if i <= max_index]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, pos, grid_size = self._embed(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, pos, grid_size)
            else:
                x = blk(x, pos, grid_size)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        return global_pool_nlc(x, pool_type=pool_type, num_prefix_tokens=self.num_prefix_tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def _check_global_pool(global_pool: str, class_token: bool) -> None:
    if global_pool not in ('', 'avg', 'avgmax', 'max', 'token'):
        raise ValueError(f"global_pool must be one of 'token', 'avg', 'avgmax', 'max' or '', got {global_pool!r}")
    if global_pool == 'token' and not class_token:
        raise ValueError("global_pool='token' needs class_token=True")


def _check_divisible(img_size: Union[int, Tuple[int, int]], patch_size: Union[int, Tuple[int, int]]) -> None:
    """Patches must tile the image: otherwise the last pixel rows/columns would be silently dropped."""
    img, patch = to_2tuple(img_size), to_2tuple(patch_size)
    if any(i % p for i, p in zip(img, patch)):
        raise ValueError(f'img_size {tuple(img)} is not divisible by patch_size {tuple(patch)}: choose a multiple of '
                         f'the patch size (or dynamic_img_pad=True to pad)')


def _remap_standard_attention(state_dict: Dict[str, torch.Tensor], model: VisionTransformerPosAttn, prefix: str,
                              model_sd: Dict[str, torch.Tensor]) -> List[str]:
    """A positional checkpoint into a standard block: values become qkv's value rows, Q/K keep the fresh init."""
    fresh = []
    for suffix in ('weight', 'bias'):
        v = f'{prefix}v.{suffix}'
        if v in state_dict:
            qkv = f'{prefix}qkv.{suffix}'
            qk = model_sd[qkv][:2 * state_dict[v].shape[0]]
            state_dict[qkv] = torch.cat([qk.to(state_dict[v].dtype), state_dict.pop(v)])
            fresh.append(f'{qkv}[q,k rows]')
    for key in [k for k in state_dict if k.startswith((prefix + 'pos_map.', prefix + 'qk.', prefix + 'pos_norm.'))]:
        state_dict.pop(key)
    return fresh


def vit_arch_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Architecture kwargs of a built timm-style ViT (ours or timm's), read from its modules.

    Reading the built module rather than a name keeps the baseline identical to our model whatever kwargs it was
    created with, and the same function applied to the baseline verifies the match.
    """
    if not hasattr(model, 'blocks') or not hasattr(model, 'patch_embed'):
        raise ValueError(f'{type(model).__name__} is not a timm-style ViT (expected .blocks and .patch_embed)')
    block = model.blocks[0]
    attn = block.attn
    value_proj = attn.v if hasattr(attn, 'v') else attn.qkv  # ours has a separate value projection
    init_values = None
    if not isinstance(block.ls1, nn.Identity):  # layer scale
        init_values = round(float(block.ls1.gamma.detach().flatten()[0]), 8)
    return dict(
        img_size=tuple(model.patch_embed.img_size),
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=value_proj.bias is not None,
        proj_bias=attn.proj.bias is not None,
        init_values=init_values,
        class_token=getattr(model, 'cls_token', None) is not None,
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=bool(getattr(model, 'dynamic_img_size', False)),
    )


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: VisionTransformerPosAttn,
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`: ours (any positional attention layer the model's can convert, any grid) or a
    standard timm ViT of the same width and depth, at any resolution.

    Position embeddings and patch kernels are resampled to the model's grid; attention weights are converted by each
    block's layer (values and output projections kept; what has no counterpart freshly initialized and logged).
    Weights holding NaN or inf are refused, and weights timm just loaded from a folder or Hub repo written by
    `timm_posattn.publish` are checked against what publishing recorded (`timm_posattn.published`), so that
    ``timm.create_model('local-dir:…' / 'hf-hub:…', pretrained=True)`` checks what our own loaders do.
    """
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    check_finite(state_dict, f"the weights from {cfg.get('file') or cfg.get('hf_hub_id') or 'the checkpoint'}")
    verify_pretrained_source(cfg)
    state_dict = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}
    required = ('patch_embed.proj.weight', 'pos_embed', 'blocks.0.norm1.weight')
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(
            f'checkpoint is not a ViT checkpoint this model can load: expected keys {list(required)}, missing '
            f'{missing}; its first keys are {list(state_dict)[:5]}')
    width = state_dict['pos_embed'].shape[-1]
    if width != model.embed_dim:
        raise ValueError(f'checkpoint has width {width}, this model has embed_dim={model.embed_dim}: '
                         f'choose the model variant of the same width')
    ckpt_depth = 1 + max(int(k.split('.')[1]) for k in state_dict if k.startswith('blocks.'))
    if ckpt_depth != len(model.blocks):
        raise ValueError(f'checkpoint has {ckpt_depth} blocks, this model has depth={len(model.blocks)}')

    out_dict = {}
    for k, v in state_dict.items():
        if k == 'patch_embed.proj.weight':
            O, I, H, W = model.patch_embed.proj.weight.shape
            if v.ndim < 4:
                v = v.reshape(O, -1, H, W)
            if v.shape[-2:] != (H, W):
                v = resample_patch_embed(v, (H, W), interpolation=interpolation, antialias=antialias, verbose=True)
        elif k == 'pos_embed':
            if v.shape[1] != model.pos_embed.shape[1]:
                num_prefix = model.num_prefix_tokens
                old_patches = v.shape[1] - num_prefix
                old_side = int(math.sqrt(old_patches))
                if old_side * old_side != old_patches:
                    raise ValueError(f'cannot resample pos_embed of {v.shape[1]} tokens: expected a square grid '
                                     f'plus {num_prefix} class token(s)')
                v = resample_abs_pos_embed(
                    v,
                    new_size=model.patch_embed.grid_size,
                    old_size=(old_side, old_side),
                    num_prefix_tokens=num_prefix,
                    interpolation=interpolation,
                    antialias=antialias,
                    verbose=True,
                )
        elif k.startswith('pre_logits') or k in ('dist_token', 'reg_token', 'head_dist.weight', 'head_dist.bias'):
            continue
        out_dict[k] = v

    fresh = []
    model_sd = model.state_dict()
    for i, blk in enumerate(model.blocks):
        prefix = f'blocks.{i}.attn.'
        if isinstance(blk, PositionalBlock):
            fresh += blk.attn.filter_state_dict(out_dict, prefix)
        else:
            fresh += _remap_standard_attention(out_dict, model, prefix, model_sd)
    if fresh:
        _logger.info(f'Freshly initialized (no counterpart in the checkpoint): {", ".join(fresh)}')
    return out_dict


# what build_model_with_cfg takes besides the model's own arguments
_FACTORY_KWARGS = {'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_strict', 'pretrained_model_args',
                   'cache_dir', 'features_only', 'feature_cls', 'feature_cfg', 'pruned', 'kwargs_filter'}


# model kwargs renamed in 0.3: the old name is accepted, with a FutureWarning, until 0.4
RENAMED_KWARGS = {'pos_attn_layers': 'pos_attn_blocks'}


def rename_deprecated_kwargs(kwargs: Dict[str, Any], origin: str = 'model kwargs') -> Dict[str, Any]:
    """Model kwargs (a copy) with the renamed ones under their new names; giving both names with two values is
    refused."""
    kwargs = dict(kwargs)
    for old, new in RENAMED_KWARGS.items():
        if old not in kwargs:
            continue
        value = kwargs.pop(old)
        if new in kwargs and kwargs[new] != value:
            raise TypeError(f'{origin}: {old}={value!r} and {new}={kwargs[new]!r} give one value twice ({old} is the '
                            f'old name of {new}); give {new} only')
        warnings.warn(f'{origin}: {old} is now called {new} (which blocks are positional); the old name is accepted '
                      f'until timm_posattn 0.4', FutureWarning, stacklevel=3)
        kwargs[new] = value
    return kwargs


def _create_vit_posattn(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    kwargs = rename_deprecated_kwargs(kwargs, variant)
    out_indices = kwargs.pop('out_indices', 3)
    accepted = set(inspect.signature(VisionTransformerPosAttn.__init__).parameters) - {'self'}
    unknown = sorted(set(kwargs) - accepted - _FACTORY_KWARGS)
    if unknown:  # a typo in a model kwarg must not pass silently, nor end in a bare TypeError deep in a layer
        raise TypeError(f'Unknown model kwarg {unknown[0]!r} for {variant}; accepted: {sorted(accepted)}')
    return build_model_with_cfg(
        VisionTransformerPosAttn,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(name: str = '', **kwargs) -> Dict[str, Any]:
    imagenet = DATASETS['imagenet']
    return {
        'url': '',
        'num_classes': imagenet.num_classes,
        'input_size': imagenet.input_size,
        'pool_size': None,
        'crop_pct': imagenet.crop_pct,
        'interpolation': imagenet.interpolation,
        'fixed_input_size': True,
        'mean': imagenet.mean,
        'std': imagenet.std,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2210.09221',
        'paper_name': 'Vision Transformers provably learn spatial structure',
        **hub_cfg(name),
        **kwargs,
    }


def _cfg_dataset(name: str, **kwargs) -> Dict[str, Any]:
    """The cfg of a tag trained on a dataset of the table: its classes, size, normalization and eval transform."""
    info = DATASETS[name.split('.')[-1]]
    cfg = dict(num_classes=info.num_classes, input_size=info.input_size, crop_pct=info.crop_pct,
               interpolation=info.interpolation, mean=info.mean, std=info.std)
    if info.label_names is not None:
        cfg['label_names'] = info.label_names
    return _cfg(name, **{**cfg, **kwargs})


default_cfgs = generate_default_cfgs({
    'vit_posattn_tiny_patch16_224.in1k': _cfg('vit_posattn_tiny_patch16_224.in1k'),
    'vit_posattn_small_patch16_224.in1k': _cfg('vit_posattn_small_patch16_224.in1k'),
    'vit_posattn_base_patch16_224.in1k': _cfg('vit_posattn_base_patch16_224.in1k'),
    'vit_posattn_small_patch4_32.cifar10': _cfg_dataset('vit_posattn_small_patch4_32.cifar10'),
    'vit_posattn_small_patch4_32.cifar100': _cfg_dataset('vit_posattn_small_patch4_32.cifar100'),
    'vit_posattn_small_patch4_32.svhn': _cfg_dataset('vit_posattn_small_patch4_32.svhn'),
    'vit_posattn_tiny_patch4_32.cifar10': _cfg_dataset('vit_posattn_tiny_patch4_32.cifar10'),
    'vit_posattn_tiny_patch4_32.structured': _cfg_dataset('vit_posattn_tiny_patch4_32.structured'),
    'vit_posattn_tiny_patch4_32.fashion_mnist': _cfg_dataset('vit_posattn_tiny_patch4_32.fashion_mnist'),
})


@register_model
def vit_posattn_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ ViT-Tiny/16 with positional attention (width 192, 3 heads, depth 12) """
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_vit_posattn('vit_posattn_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_posattn_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ ViT-Small/16 with positional attention (width 384, 6 heads, depth 12) """
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vit_posattn('vit_posattn_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_posattn_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ ViT-Base/16 with positional attention (width 768, 12 heads, depth 12) """
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vit_posattn('vit_posattn_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_posattn_small_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ The paper's small-image model: 32x32 input, 4x4 patches, 7 blocks, 12 heads, width 384, MLP width 384 """
    # no img_size here: the tag's cfg gives it (fixed_input_size: timm passes its input_size as img_size and in_chans)
    model_args = dict(patch_size=4, embed_dim=384, depth=7, num_heads=12, mlp_ratio=1.)
    return _create_vit_posattn('vit_posattn_small_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_posattn_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ The paper's small-image model at width 192 (MLP width 192), for quick CPU runs; `.fashion_mnist`: 1x28x28 """
    # no img_size here: the tag's cfg gives it (3x32x32, or 1x28x28 for `.fashion_mnist`), as timm does for its ViTs
    model_args = dict(patch_size=4, embed_dim=192, depth=7, num_heads=12, mlp_ratio=1.)
    return _create_vit_posattn('vit_posattn_tiny_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


# Short names, built with the full variant's pretrained cfgs (`vit_posattn_small.in1k` works like the full name).
@register_model
def vit_posattn_tiny(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ Short name for vit_posattn_tiny_patch16_224 """
    return vit_posattn_tiny_patch16_224(pretrained=pretrained, **kwargs)


@register_model
def vit_posattn_small(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ Short name for vit_posattn_small_patch16_224 """
    return vit_posattn_small_patch16_224(pretrained=pretrained, **kwargs)


@register_model
def vit_posattn_base(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ Short name for vit_posattn_base_patch16_224 """
    return vit_posattn_base_patch16_224(pretrained=pretrained, **kwargs)
