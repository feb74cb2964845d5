""" Positional-attention Vision Transformer (ViT-PosAttn) in PyTorch

A ViT whose attention matrices depend only on the positional encodings, never on the image, as studied in:
  * `Vision Transformers provably learn spatial structure` - https://arxiv.org/abs/2210.09221
    (Jelassi, Sander & Li, NeurIPS 2022)

For every positional block and head h:

    A_h = softmax((LN(P)·Wq_h)(LN(P)·Wk_h)ᵀ / √d_head)        P: the model's positional table, (N, C)
    out = proj(concat_h A_h·(X·Wv_h))

P is the model's one learned `pos_embed` (class token position included, as in timm's ViT), shared by all blocks;
each block has its own LayerNorm of P (`attn.pos_norm`) and its own Wq/Wk (`attn.qk`). P is also added to the
patch tokens as in timm's ViT, so the rest of the network is a standard pre-norm ViT.

Because A depends on no image it is computed once per forward for the whole batch (Q/K act on N positional rows,
not on B·N tokens) and applied with one batched matmul per block; in eval mode under no-grad it is cached and reused
until a parameter it depends on changes. In training, backward recomputes A·V from the saved values instead of
storing it (one bmm, since A is shared): each block keeps one (B, N, C) activation less. `pos_attn_layers` chooses
which blocks are positional: 'all', 'none' (timm's ordinary attention everywhere: the standard twin), the first k, or
a list of indices.
"""
import inspect
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Type, Union

import torch
import torch.nn as nn
from torch.jit import Final

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    LayerNorm,
    LayerScale,
    Mlp,
    PatchEmbed,
    calculate_drop_path_rates,
    get_act_layer,
    get_device_dtype,
    get_norm_layer,
    resample_abs_pos_embed,
    resample_patch_embed,
)
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, named_apply, \
    register_model
from timm.models.vision_transformer import Block, get_init_weights_vit, global_pool_nlc

from .releases import hub_cfg
from .structured import STRUCTURED_MEAN, STRUCTURED_STD

__all__ = ['VisionTransformerPosAttn', 'PositionalAttention', 'PositionalBlock']

_logger = logging.getLogger(__name__)

PosAttnLayers = Union[str, int, Sequence[int]]

# FX symbolic tracing turns parameters into proxies, so the eval cache (which reads parameter versions) is skipped.
_is_fx_tracing = getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)


def _to_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Tokens (B, N, C) -> head-major (H, N, B·d_head): per head, one matrix with the batch folded into the columns."""
    B, N, C = t.shape
    return t.view(B, N, num_heads, C // num_heads).permute(2, 1, 0, 3).reshape(num_heads, N, -1)


def _from_heads(t: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Head-major (H, N, B·d_head) -> tokens (B, N, C); the inverse of `_to_heads`."""
    H, N, _ = t.shape
    return t.view(H, N, batch_size, -1).permute(2, 1, 0, 3).reshape(batch_size, N, -1)


def apply_positional_attention(attn: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Apply per-head attention (H, N, N), shared by the whole batch, to values (B, N, C).

    The batch is folded into the GEMM's columns: one (N, N) @ (N, B·d_head) matmul per head, all heads in one bmm.
    This never materializes a (B, H, N, N) tensor and keeps the GEMMs large.
    """
    # the head-major copy of v is a temporary, freed as soon as the bmm returns
    return _from_heads(torch.bmm(attn.to(v.dtype), _to_heads(v, num_heads)), v.shape[0])


class _PositionalAttentionProj(torch.autograd.Function):
    """`proj(apply_positional_attention(attn, v))` that stores no attention output for backward.

    Autograd would keep the mixed tokens A·V (B, N, C) alive for the projection's weight gradient. Here A is shared
    by the whole batch and already saved, so backward recomputes A·V with one bmm (under 2% of a CPU training step)
    and each positional block stores one (B, N, C) activation less. The backward uses plain differentiable ops, so
    double backward works. All matmuls run in the dtype of `v` (the autocast compute dtype when autocast is on).
    """
    generate_vmap_rule = True  # torch.func transforms (e.g. per-sample gradients with vmap(grad(...))) work too

    @staticmethod
    def forward(
            attn: torch.Tensor,
            v: torch.Tensor,
            weight: torch.Tensor,
            bias: Optional[torch.Tensor],
            num_heads: int,
    ) -> torch.Tensor:
        x = apply_positional_attention(attn, v, num_heads)
        return nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        attn, v, weight, bias, num_heads = inputs
        ctx.num_heads = num_heads
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(attn, v, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        attn, v, weight = ctx.saved_tensors
        device_type = v.device.type
        if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):  # keep the forward's compute dtype
                grads = _positional_attention_proj_backward(ctx, grad_out, attn, v, weight)
        else:
            grads = _positional_attention_proj_backward(ctx, grad_out, attn, v, weight)
        return grads + (None,)


def _positional_attention_proj_backward(
        ctx: Any,
        grad_out: torch.Tensor,
        attn: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor,
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of `_PositionalAttentionProj` for (attn, v, weight, bias), computed in the dtype of `v`."""
    B, N, C = v.shape
    dtype = v.dtype
    grad_out = grad_out.to(dtype)
    attn_c = attn.to(dtype)
    v_heads = _to_heads(v, ctx.num_heads)
    grad_attn = grad_v = grad_weight = grad_bias = None
    if ctx.needs_input_grad[2]:
        x = _from_heads(torch.bmm(attn_c, v_heads), B)  # the recompute
        grad_weight = (grad_out.reshape(B * N, C).t() @ x.reshape(B * N, C)).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_out.sum(dim=(0, 1), dtype=ctx.bias_dtype)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_x = _to_heads(grad_out @ weight.to(dtype), ctx.num_heads)
        if ctx.needs_input_grad[0]:
            grad_attn = torch.bmm(grad_x, v_heads.transpose(1, 2)).to(attn.dtype)
        if ctx.needs_input_grad[1]:
            grad_v = _from_heads(torch.bmm(attn_c.transpose(1, 2), grad_x), B)
    return grad_attn, grad_v, grad_weight, grad_bias


@torch.jit.unused
def positional_attention_proj(
        attn: torch.Tensor,
        v: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        num_heads: int,
) -> torch.Tensor:
    """`linear(apply_positional_attention(attn, v), weight, bias)` that recomputes A·V in backward, not stores it."""
    return _PositionalAttentionProj.apply(attn, v, weight, bias, num_heads)


class PositionalAttention(nn.Module):
    """Multi-head attention whose attention matrix is a function of the positional table only."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = False,
            proj_bias: bool = True,
            pos_norm: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Type[nn.Module] = LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            dim: Token (and positional table) width.
            num_heads: Number of attention heads.
            qkv_bias: Bias in the positional Q/K projection and the value projection.
            proj_bias: Bias in the output projection.
            pos_norm: Normalize the positional table before Q/K (keeps logits O(1) whatever the table's scale).
            attn_drop: Dropout on the attention matrix (one mask for the whole batch).
            proj_drop: Dropout after the output projection.
            norm_layer: Normalization layer for `pos_norm`.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert dim % num_heads == 0, f'dim ({dim}) must be divisible by num_heads ({num_heads})'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5

        self.pos_norm = norm_layer(dim, **dd) if pos_norm else nn.Identity()
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)  # acts on the N positional rows only
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        # Recompute A·V in backward rather than store it: one (B, N, C) activation less per block, one extra bmm.
        self.recompute_attn_out = True

    def attention_matrix(self, pos: torch.Tensor) -> torch.Tensor:
        """Attention of every head from the positional table: (N, C) or (1, N, C) -> (H, N, N), rows sum to 1."""
        N = pos.shape[-2]
        q, k = self.qk(self.pos_norm(pos)).reshape(N, 2, self.num_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    @torch.jit.unused
    def _recompute_mix(self) -> bool:
        """Use the memory-saving autograd path: eager autograd with a plain Linear projection.

        FX and torch.compile trace the plain ops instead (torch.compile plans its own recomputation).
        """
        if _is_fx_tracing() or torch.compiler.is_compiling():
            return False
        return self.recompute_attn_out and torch.is_grad_enabled() and type(self.proj) is nn.Linear

    def forward(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        attn = self.attn_drop(attn)
        # self.v(x) is passed straight on, never bound to a name: the values are freed as soon as they are mixed
        if not torch.jit.is_scripting() and self._recompute_mix():
            x = positional_attention_proj(attn, self.v(x), self.proj.weight, self.proj.bias, self.num_heads)
        else:
            x = self.proj(apply_positional_attention(attn, self.v(x), self.num_heads))
        return self.proj_drop(x)


class PositionalBlock(nn.Module):
    """Pre-norm transformer block with positional attention; same layout and names as timm's `Block`."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_bias: bool = True,
            pos_norm: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            init_values: Optional[float] = None,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = LayerNorm,
            mlp_layer: Type[nn.Module] = Mlp,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.attn = PositionalAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            pos_norm=pos_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
            **dd,
        )
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            bias=proj_bias,
            drop=proj_drop,
            **dd,
        )
        self.ls2 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def positional_attention(self, pos: torch.Tensor) -> Optional[torch.Tensor]:
        return self.attn.attention_matrix(pos)

    def forward(self, x: torch.Tensor, attn: Optional[torch.Tensor] = None) -> torch.Tensor:
        assert attn is not None, 'PositionalBlock needs the attention matrix computed from the positional table'
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class StandardBlock(Block):
    """timm's ViT block (image-dependent attention); takes no positional attention."""

    def positional_attention(self, pos: torch.Tensor) -> Optional[torch.Tensor]:
        return None


def resolve_pos_attn_layers(pos_attn_layers: PosAttnLayers, depth: int) -> List[int]:
    """Turn the `pos_attn_layers` model argument into sorted block indices, with an error naming what is accepted."""
    if isinstance(pos_attn_layers, str):
        if pos_attn_layers == 'all':
            return list(range(depth))
        if pos_attn_layers == 'none':
            return []
        raise ValueError(
            f"pos_attn_layers must be 'all', 'none', an int (first k blocks) or a list of block indices, "
            f"got {pos_attn_layers!r}")
    if isinstance(pos_attn_layers, bool):
        raise ValueError(f'pos_attn_layers must not be a bool, got {pos_attn_layers!r}')
    if isinstance(pos_attn_layers, int):
        if not 0 <= pos_attn_layers <= depth:
            raise ValueError(f'pos_attn_layers={pos_attn_layers}: expected a block count between 0 and depth={depth}')
        return list(range(pos_attn_layers))
    indices = sorted({int(i) + depth if int(i) < 0 else int(i) for i in pos_attn_layers})
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f'pos_attn_layers has block indices {bad} outside 0..{depth - 1}')
    return indices


def _take_indices(num_blocks: int, indices: Optional[Union[int, List[int]]]) -> Tuple[List[int], int]:
    """Absolute block indices to return (None: all, int n: last n, list: as given, negatives from the end)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        torch._assert(0 < indices <= num_blocks, f'last-n ({indices}) is out of range (1 to {num_blocks})')
        take_indices = [num_blocks - indices + i for i in range(indices)]
    else:
        take_indices: List[int] = []
        for i in indices:
            idx = num_blocks + i if i < 0 else i
            torch._assert(0 <= idx < num_blocks, f'feature index {idx} is out of range (0 to {num_blocks - 1})')
            take_indices.append(idx)
    return take_indices, max(take_indices)


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
            pos_attn_layers: PosAttnLayers = 'all',
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
            qkv_bias: Bias in the Q/K/V projections.
            proj_bias: Bias in the attention output and MLP projections.
            init_values: Layer-scale init values (layer-scale enabled if not None).
            class_token: Use a class token (its position is the first row of the positional table).
            pos_attn_layers: Blocks with positional attention: 'all', 'none', first k, or a list of indices.
            pos_attn_norm: LayerNorm the positional table in each positional block before Q/K.
            pos_attn_init: Init of the positional Q/K: 'random' (timm's ViT init: attention starts near uniform) or
                'local' (Wq = Wk = a per-head identity, so each position first attends mostly to itself, the
                paper's local init that its simplified model needs to learn own-set patch association).
            pos_attn_init_scale: beta of the 'local' init: the self logit each head starts with (needs pos_attn_norm).
            fc_norm: Norm after pooling instead of before (default: True for avg pooling).
            dynamic_img_size: Accept any input size: positional table resampled and attention recomputed per grid.
            dynamic_img_pad: Pad inputs not divisible by the patch size (only with dynamic_img_size).
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
        if global_pool not in ('', 'avg', 'avgmax', 'max', 'token'):
            raise ValueError(f"global_pool must be one of 'token', 'avg', 'avgmax', 'max' or '', got {global_pool!r}")
        if global_pool == 'token' and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if embed_dim % num_heads:
            raise ValueError(f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})')
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
        self.pos_attn_indices = resolve_pos_attn_layers(pos_attn_layers, depth)
        if pos_attn_init not in ('random', 'local'):
            raise ValueError(f"pos_attn_init must be 'random' or 'local', got {pos_attn_init!r}")
        if pos_attn_init == 'local' and not pos_attn_norm:
            raise ValueError("pos_attn_init='local' needs pos_attn_norm=True (it relies on unit-variance LN(P) rows)")
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
        self.blocks = nn.Sequential(*[
            PositionalBlock(drop_path=dpr[i], pos_norm=pos_attn_norm, **block_args)
            if i in self.pos_attn_indices else StandardBlock(drop_path=dpr[i], **block_args)
            for i in range(depth)])
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim, **dd) if not use_fc_norm else nn.Identity()

        self.fc_norm = norm_layer(embed_dim, **dd) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self._attn_cache = None  # (key, attention per block), eval + no-grad only; see _cached_attention
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
            self._init_local_pos_attn(self.pos_attn_init_scale)

    @torch.no_grad()
    def _init_local_pos_attn(self, beta: float) -> None:
        """Wq = Wk = sqrt(beta / sqrt(d_head))·I, no Q/K bias: with unit-variance LN(P) rows head h's self logit is
        (1/sqrt(d_head))·(beta/sqrt(d_head))·|LN(P)_i[h]|^2 ~ beta, the other logits ~ N(0, beta^2 / d_head)."""
        for i in self.pos_attn_indices:
            qk = self.blocks[i].attn.qk
            head_dim = self.blocks[i].attn.head_dim
            dim = qk.in_features
            eye = torch.eye(dim, device=qk.weight.device, dtype=qk.weight.dtype) * math.sqrt(beta / math.sqrt(head_dim))
            qk.weight.copy_(torch.cat([eye, eye], dim=0))
            if qk.bias is not None:
                qk.bias.zero_()

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'pos_embed', 'cls_token'}

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
            if global_pool not in ('', 'avg', 'avgmax', 'max', 'token'):
                raise ValueError(f"global_pool must be one of 'token', 'avg', 'avgmax', 'max' or '', got {global_pool!r}")
            if global_pool == 'token' and not self.has_class_token:
                raise ValueError("global_pool='token' needs the class token")
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    @torch.jit.ignore
    def set_input_size(
            self,
            img_size: Optional[Tuple[int, int]] = None,
            patch_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        """Change the input resolution (and patch size): the positional table is resampled to the new grid."""
        prev_grid_size = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        num_new_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        if num_new_tokens != self.pos_embed.shape[1] or self.patch_embed.grid_size != prev_grid_size:
            self.pos_embed = nn.Parameter(resample_abs_pos_embed(
                self.pos_embed,
                new_size=self.patch_embed.grid_size,
                old_size=prev_grid_size,
                num_prefix_tokens=self.num_prefix_tokens,
                verbose=True,
            ), requires_grad=self.pos_embed.requires_grad)
        try:  # record the new size for save_for_hf / hub export, where this timm version supports it
            from timm.models._input import update_model_input_size
            update_model_input_size(self, self.patch_embed.img_size, patch_size=patch_size)
        except ImportError:
            pass

    def _pos_table(self, grid_size: Tuple[int, int]) -> torch.Tensor:
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

    def _compute_attention(self, pos: torch.Tensor) -> List[Optional[torch.Tensor]]:
        attn: List[Optional[torch.Tensor]] = []
        for blk in self.blocks:
            attn.append(blk.positional_attention(pos))
        return attn

    @torch.jit.unused
    def _cache_key(self, grid_size: Tuple[int, int]) -> Tuple[Any, ...]:
        """What the eval attention depends on: the parameters (identity, storage, version), grid, device, autocast.

        The cache holds the parameter objects themselves, so none can be freed and its storage reused unnoticed;
        an optimizer step, `load_state_dict` or any in-place change bumps a parameter's version.
        """
        params = [self.pos_embed]
        for i in self.pos_attn_indices:
            if i < len(self.blocks):
                params.extend(self.blocks[i].attn.pos_norm.parameters())
                params.extend(self.blocks[i].attn.qk.parameters())
        device_type = self.pos_embed.device.type
        autocast = torch.is_autocast_enabled(device_type) if device_type in ('cuda', 'cpu') else False
        return (
            tuple(grid_size), autocast, len(self.blocks),
            tuple((p, p.data_ptr(), p._version, p.dtype, p.device) for p in params),
        )

    @staticmethod
    def _same_key(a: Tuple[Any, ...], b: Tuple[Any, ...]) -> bool:
        if a[:3] != b[:3] or len(a[3]) != len(b[3]):
            return False
        return all(pa is pb and rest_a == rest_b for (pa, *rest_a), (pb, *rest_b) in zip(a[3], b[3]))

    @torch.jit.unused
    def _cached_attention(self, grid_size: Tuple[int, int]) -> List[Optional[torch.Tensor]]:
        key = self._cache_key(grid_size)
        if self._attn_cache is None or not self._same_key(self._attn_cache[0], key):
            self._attn_cache = (key, self._compute_attention(self._pos_table(grid_size)))
        return self._attn_cache[1]

    def _positional_attention(self, grid_size: Tuple[int, int]) -> List[Optional[torch.Tensor]]:
        """One attention matrix per positional block (None for standard blocks), shared by the whole batch."""
        if torch.jit.is_scripting():
            return self._compute_attention(self._pos_table(grid_size))
        if (
                not self.training and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and not _is_fx_tracing()
        ):
            return self._cached_attention(grid_size)
        self._attn_cache = None  # training changes the parameters: never keep a copy that could go stale
        return self._compute_attention(self._pos_table(grid_size))

    @torch.jit.ignore
    def get_attention_maps(self, img_size: Optional[Union[int, Tuple[int, int]]] = None) -> torch.Tensor:
        """Positional attention of every positional block: (blocks, heads, N, N), rows sum to 1. Needs no image.

        N = num_prefix_tokens + grid_h * grid_w (class token first). `img_size` gives the maps of another
        resolution (the positional table is resampled as in a forward at that size).
        """
        if not self.pos_attn_indices:
            raise ValueError('this model has no positional-attention blocks (pos_attn_layers=none)')
        grid_size = self.patch_embed.grid_size
        if img_size is not None:
            grid_size = self.patch_embed.dynamic_feat_size(
                (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
        with torch.no_grad():
            attn = self._compute_attention(self._pos_table(tuple(grid_size)))
        return torch.stack([a for a in attn if a is not None])

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Patch-embed, add positions, prepend the class token; returns the tokens and the patch grid."""
        torch._assert(x.ndim == 4, 'expected an image batch of shape (B, C, H, W)')
        torch._assert(x.shape[1] == self.in_chans, f'expected an input of shape (B, {self.in_chans}, H, W)')
        x = self.patch_embed(x)
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            grid_size = (H, W)
            x = x.view(B, -1, C)
        else:
            grid_size = self.patch_embed.grid_size
        pos = self._pos_table(grid_size)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + pos)
        return x, grid_size

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
        take_indices, max_index = _take_indices(len(self.blocks), indices)

        B, _, height, width = x.shape
        x, grid_size = self._embed(x)
        pos_attn = self._positional_attention(grid_size)
        last_index = len(self.blocks) - 1 if torch.jit.is_scripting() or not stop_early else max_index
        for i, blk in enumerate(self.blocks):
            if i <= last_index:
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(blk, x, pos_attn[i])
                else:
                    x = blk(x, pos_attn[i])
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
        take_indices, max_index = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.pos_attn_indices = [i for i in self.pos_attn_indices if i <= max_index]
        self._attn_cache = None
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, grid_size = self._embed(x)
        pos_attn = self._positional_attention(grid_size)
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, pos_attn[i])
            else:
                x = blk(x, pos_attn[i])
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

    def train(self, mode: bool = True) -> 'VisionTransformerPosAttn':
        self._attn_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._attn_cache = None  # .to() / .half() / .cuda(): the cached matrices belong to the old tensors
        return super()._apply(fn, recurse)


def _remap_block_attention(state_dict: Dict[str, torch.Tensor], model: VisionTransformerPosAttn) -> List[str]:
    """Convert attention weights between standard (`attn.qkv`) and positional (`attn.qk` + `attn.v`) blocks.

    Values move across (rows 2C:3C of qkv); positional Q/K and the standard block's image Q/K have no counterpart,
    so they keep the model's fresh init. Returns the names that were left freshly initialized.
    """
    fresh = []
    model_sd = model.state_dict()
    for i, blk in enumerate(model.blocks):
        prefix = f'blocks.{i}.attn.'
        for suffix in ('weight', 'bias'):
            qkv, v = f'{prefix}qkv.{suffix}', f'{prefix}v.{suffix}'
            if isinstance(blk, PositionalBlock) and qkv in state_dict:
                dim = state_dict[qkv].shape[0] // 3
                state_dict[v] = state_dict.pop(qkv)[2 * dim:]
            elif isinstance(blk, StandardBlock) and v in state_dict:
                qk = model_sd[qkv][:2 * state_dict[v].shape[0]]
                state_dict[qkv] = torch.cat([qk.to(state_dict[v].dtype), state_dict.pop(v)])
                state_dict.pop(f'{prefix}qk.{suffix}', None)
                fresh.append(f'{prefix}qkv.{suffix}[q,k rows]')
        if isinstance(blk, PositionalBlock):
            for name in [k for k in model_sd if k.startswith(prefix + 'qk.') or k.startswith(prefix + 'pos_norm.')]:
                if name not in state_dict:
                    state_dict[name] = model_sd[name]
                    fresh.append(name)
        else:
            for name in [k for k in state_dict if k.startswith(prefix + 'pos_norm.')]:
                state_dict.pop(name)
    return fresh


def checkpoint_filter_fn(
        state_dict: Dict[str, torch.Tensor],
        model: VisionTransformerPosAttn,
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to `model`: ours or a standard timm ViT of the same width and depth, any resolution.

    Position embeddings and patch kernels are resampled to the model's grid; attention weights are converted between
    standard and positional blocks (values and output projections kept, the rest freshly initialized and logged).
    """
    state_dict = state_dict.get('model', state_dict)
    state_dict = state_dict.get('state_dict', state_dict)
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

    fresh = _remap_block_attention(out_dict, model)
    if fresh:
        _logger.info(f'Freshly initialized (no counterpart in the checkpoint): {", ".join(fresh)}')
    return out_dict


def _check_kwargs(kwargs: Dict[str, Any]) -> None:
    """Reject unknown model kwargs with the list of accepted ones (a typo must not pass silently)."""
    accepted = set(inspect.signature(VisionTransformerPosAttn.__init__).parameters) - {'self'}
    accepted |= {
        'pretrained_cfg', 'pretrained_cfg_overlay', 'pretrained_strict', 'cache_dir', 'features_only',
        'out_indices', 'feature_cls', 'feature_cfg', 'output_stride', 'pretrained_model_args', 'pruned',
        'kwargs_filter', 'model_cfg',
    }
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f'Unknown model kwargs {unknown} for a positional-attention ViT; accepted: {sorted(accepted)}')


def _create_vit_posattn(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    _check_kwargs(kwargs)
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        VisionTransformerPosAttn,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


def _cfg(name: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2210.09221',
        'paper_name': 'Vision Transformers provably learn spatial structure',
        **hub_cfg(name),
        **kwargs,
    }


def _cfg_32(name: str, mean: Tuple[float, ...], std: Tuple[float, ...], num_classes: int, **kwargs) -> Dict[str, Any]:
    return _cfg(name, num_classes=num_classes, input_size=(3, 32, 32), crop_pct=1.0, mean=mean, std=std, **kwargs)


default_cfgs = generate_default_cfgs({
    'vit_posattn_tiny_patch16_224.in1k': _cfg('vit_posattn_tiny_patch16_224.in1k'),
    'vit_posattn_small_patch16_224.in1k': _cfg('vit_posattn_small_patch16_224.in1k'),
    'vit_posattn_base_patch16_224.in1k': _cfg('vit_posattn_base_patch16_224.in1k'),
    'vit_posattn_small_patch4_32.cifar10': _cfg_32(
        'vit_posattn_small_patch4_32.cifar10', CIFAR10_MEAN, CIFAR10_STD, 10),
    'vit_posattn_small_patch4_32.cifar100': _cfg_32(
        'vit_posattn_small_patch4_32.cifar100', CIFAR100_MEAN, CIFAR100_STD, 100),
    'vit_posattn_small_patch4_32.svhn': _cfg_32(
        'vit_posattn_small_patch4_32.svhn', SVHN_MEAN, SVHN_STD, 10, interpolation='bilinear'),
    'vit_posattn_tiny_patch4_32.cifar10': _cfg_32(
        'vit_posattn_tiny_patch4_32.cifar10', CIFAR10_MEAN, CIFAR10_STD, 10),
    'vit_posattn_tiny_patch4_32.structured': _cfg_32(
        'vit_posattn_tiny_patch4_32.structured', STRUCTURED_MEAN, STRUCTURED_STD, 2,
        interpolation='nearest', label_names=('-1', '+1')),
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
    model_args = dict(img_size=32, patch_size=4, embed_dim=384, depth=7, num_heads=12, mlp_ratio=1.)
    return _create_vit_posattn('vit_posattn_small_patch4_32', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_posattn_tiny_patch4_32(pretrained: bool = False, **kwargs) -> VisionTransformerPosAttn:
    """ The paper's small-image model at width 192 (MLP width 192), for quick CPU runs """
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=7, num_heads=12, mlp_ratio=1.)
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
