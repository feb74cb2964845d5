""" Positional attention layers

A positional attention layer maps the positional table P (1, N, C) of a patch grid to per-head attention
A (H, N, N), rows summing to 1. It never sees an image: a block computes A once per forward and applies it to every
image of the batch with one batched matmul (`PositionalAttention`). Variants differ only in how A is parameterized and
are chosen by name from a small registry, as timm's ViT chooses its `attn_layer`:

    'qk'      A_h = softmax((LN(P)·Wq_h)(LN(P)·Wk_h)ᵀ / √d)    the positional ViT of Jelassi, Sander & Li (2022)
    'tied'    A_h = softmax((LN(P)·W_h)(LN(P)·W_h)ᵀ / √d)      Wq = Wk: symmetric, positive semi-definite logits
    'logits'  A_h = softmax(L_h)                              a free (N, N) logit table: the simplified model's form

A new variant is one subclass of `PositionalAttentionMap` that implements `logits()` (plus `init_local()` and, where a
checkpoint of another variant can be converted, `filter_state_dict()`), registered with one line,
`@register_pos_attn_layer('name')`. Everything else (reparameterization, resolution changes through `set_grid_size`,
attention maps, checkpoint loading) goes through these methods.

How a block applies A without keeping it (and the normalized tokens, and A·V) for backward lives in `lean_attention`:
`PositionalAttention.forward` runs its operators, or with `lean=False` the plain ops.
"""
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, trunc_normal_

from .lean_attention import apply_positional_attention, forward_lean, head_attention, use_lean_ops

__all__ = [
    'PositionalAttentionMap', 'QKAttentionMap', 'TiedAttentionMap', 'LogitsAttentionMap', 'FixedAttentionMap',
    'PositionalAttention', 'PositionalBlock', 'register_pos_attn_layer', 'get_pos_attn_layer',
    'list_pos_attn_layers', 'infer_pos_attn_layer', 'apply_positional_attention', 'head_attention',
    'resample_logit_table',
]

_logger = logging.getLogger(__name__)

GridSize = Tuple[int, int]
PosSource = Callable[[], Tuple[torch.Tensor, GridSize]]

# --------------------------------------------------------------------------------------------------------------------
# Registry


_POS_ATTN_LAYERS: Dict[str, Type['PositionalAttentionMap']] = {}


def register_pos_attn_layer(name: str) -> Callable[[Type['PositionalAttentionMap']], Type['PositionalAttentionMap']]:
    """Class decorator: make a `PositionalAttentionMap` subclass selectable as `pos_attn_layer=name`."""
    def _register(cls: Type['PositionalAttentionMap']) -> Type['PositionalAttentionMap']:
        if not (isinstance(cls, type) and issubclass(cls, PositionalAttentionMap)):
            raise TypeError(f'positional attention layer {name!r} must subclass PositionalAttentionMap, got {cls!r}')
        if name in _POS_ATTN_LAYERS and _POS_ATTN_LAYERS[name] is not cls:
            raise ValueError(f'a positional attention layer named {name!r} is already registered '
                             f'({_POS_ATTN_LAYERS[name].__name__})')
        _POS_ATTN_LAYERS[name] = cls
        return cls
    return _register


def list_pos_attn_layers() -> List[str]:
    """Names accepted by `pos_attn_layer`."""
    return sorted(_POS_ATTN_LAYERS)


def get_pos_attn_layer(layer: Union[str, Type['PositionalAttentionMap']]) -> Type['PositionalAttentionMap']:
    """The layer class for a registered name (or the class itself), with an error naming the accepted values."""
    if isinstance(layer, str):
        if layer not in _POS_ATTN_LAYERS:
            raise ValueError(f'pos_attn_layer must be one of {list_pos_attn_layers()} or a PositionalAttentionMap '
                             f'subclass, got {layer!r}')
        return _POS_ATTN_LAYERS[layer]
    if isinstance(layer, type) and issubclass(layer, PositionalAttentionMap):
        return layer
    raise ValueError(f'pos_attn_layer must be one of {list_pos_attn_layers()} or a PositionalAttentionMap subclass, '
                     f'got {layer!r}')


def infer_pos_attn_layer(state_dict: Dict[str, torch.Tensor]) -> Optional[str]:
    """The registered layer whose parameters a checkpoint's positional blocks hold (None: no positional block, or no
    registered layer matches). Lets a checkpoint say what it is when its recorded kwargs predate a changed default.
    """
    first = next((k for k in state_dict if '.attn.pos_map.' in k), None)
    if first is None:
        legacy = any(k.startswith('blocks.') and k.endswith(('.attn.qk.weight', '.attn.pos_norm.weight'))
                     for k in state_dict)
        return 'qk' if legacy else None  # timm_posattn 0.1 names
    prefix = first[:first.index('.attn.pos_map.') + len('.attn.pos_map.')]
    held = {k[len(prefix):].split('.')[0] for k in state_dict if k.startswith(prefix)}

    def names(cls: Type[PositionalAttentionMap], optional: bool) -> Set[str]:
        probe = cls(4, 1, grid_size=(1, 1), num_prefix_tokens=0, pos_norm=optional, bias=optional)  # tiny
        return {k.split('.')[0] for k in probe.state_dict()}
    matches = [name for name, cls in sorted(_POS_ATTN_LAYERS.items())
               if names(cls, False) <= held <= names(cls, True)]
    return matches[0] if len(matches) == 1 else None


# --------------------------------------------------------------------------------------------------------------------
# Maps: positional table -> attention


class PositionalAttentionMap(nn.Module):
    """Base of the positional attention layers: positional table P (1, N, C) of a grid -> attention A (H, N, N).

    The one constructor of the registered layers: it holds the shape (heads, grid, prefix tokens) and, for layers
    that read P, its LayerNorm (`norm`); a subclass adds its own parameters. A layer whose logits are a product of
    positional queries and keys implements `query_key()` and inherits `logits()` (q·kᵀ); the others override
    `logits()`.
    """
    uses_pos_table: bool = True  # False for layers whose attention does not read P (a free table, a baked A)

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: GridSize,
            num_prefix_tokens: int = 1,
            pos_norm: bool = True,
            bias: bool = False,
            norm_layer: Type[nn.Module] = LayerNorm,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            dim: Width of the positional table.
            num_heads: Number of attention heads.
            grid_size: Patch grid the layer is built for (tables that depend on it are resampled for others).
            num_prefix_tokens: Class/prefix tokens in front of the patches (their rows come first in P).
            pos_norm: Normalize P before projecting it (keeps the logits O(1) whatever the table's scale).
            bias: Bias in the projections of P.
            norm_layer: Normalization layer for `pos_norm`.
        """
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        if self.uses_pos_table:
            self.norm = norm_layer(dim, device=device, dtype=dtype) if pos_norm else nn.Identity()

    def logits(self, pos: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        """Pre-softmax attention logits (H, N, N) from P (1, N, C) or (N, C) of `grid_size`: q·kᵀ of
        `query_key()`."""
        query_key = self.query_key(pos, grid_size)
        if query_key is None:
            raise NotImplementedError(f'{type(self).__name__} has neither query_key() nor its own logits()')
        return query_key[0] @ query_key[1].transpose(-2, -1)

    def query_key(self, pos: torch.Tensor, grid_size: GridSize) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Per-head positional queries and keys (H, N, d) with `logits = q @ kᵀ` (the scale folded into q), for
        maps whose logits are such a product; None for the others.

        With them the attention layer never has to hold A: without autograd it builds A one head at a time, and
        in training it keeps q and k (2·N·C numbers) for backward instead of A (H·N² numbers).
        """
        return None

    def forward(
            self,
            pos: torch.Tensor,
            grid_size: GridSize,
            query_key: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """A (H, N, N); from `query_key` (this layer's `query_key(pos, grid_size)`) when the caller has them."""
        if query_key is not None:
            return (query_key[0] @ query_key[1].transpose(-2, -1)).softmax(dim=-1)
        return self.logits(pos, grid_size).softmax(dim=-1)

    @torch.jit.ignore
    def init_local(self, beta: float) -> None:
        """Start near A = softmax(beta·I): every position first attends mostly to itself (the paper's local init)."""
        raise NotImplementedError(f'{type(self).__name__} has no local init')

    @torch.jit.ignore
    def set_grid_size(self, grid_size: GridSize) -> None:
        """The model's patch grid changed for good (`set_input_size`): resample what depends on it."""
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Names (relative to this layer) of parameters that should not be weight-decayed."""
        return set()

    @torch.jit.ignore
    def filter_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str) -> List[str]:
        """Adapt a checkpoint's entries under `prefix` to this layer, in place.

        Subclasses convert what they can (another variant's weights, another grid) and then call this, which fills
        every entry the checkpoint lacks with this layer's current (freshly initialized) value. Returns the names
        that were left fresh, for the log.
        """
        fresh = []
        for name, value in self.state_dict().items():
            if prefix + name not in state_dict:
                state_dict[prefix + name] = value
                fresh.append(prefix + name)
        return fresh


def _local_projection(weight: torch.Tensor, head_dim: int, beta: float) -> torch.Tensor:
    """Identity rows scaled so that a unit-variance row's self logit per head is about beta."""
    out_features, in_features = weight.shape
    eye = torch.eye(in_features, device=weight.device, dtype=weight.dtype)
    # LN(P) rows have unit variance: head h's self logit is s²·|x_h|²/√d ≈ s²·√d = beta
    scale = math.sqrt(beta / math.sqrt(head_dim))
    return torch.cat([eye] * (out_features // in_features), dim=0) * scale


def _require_norm(layer: nn.Module, what: str) -> None:
    if isinstance(layer.norm, nn.Identity):
        raise ValueError(f"{what}: pos_attn_init='local' needs pos_attn_norm=True (it relies on unit-variance "
                         f"LN(P) rows)")


@register_pos_attn_layer('qk')
class QKAttentionMap(PositionalAttentionMap):
    """A_h = softmax((LN(P)·Wq_h)(LN(P)·Wk_h)ᵀ / √d): separate query and key maps of the positional table."""

    def __init__(self, dim: int, num_heads: int, grid_size: GridSize, bias: bool = False, device=None, dtype=None,
                 **kwargs: Any) -> None:
        super().__init__(dim, num_heads, grid_size, bias=bias, device=device, dtype=dtype, **kwargs)
        self.qk = nn.Linear(dim, dim * 2, bias=bias, device=device, dtype=dtype)  # acts on the N positional rows

    def query_key(self, pos: torch.Tensor, grid_size: GridSize) -> Tuple[torch.Tensor, torch.Tensor]:
        N = pos.shape[-2]
        q, k = self.qk(self.norm(pos)).reshape(N, 2, self.num_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        return q * self.scale, k

    @torch.jit.ignore
    @torch.no_grad()
    def init_local(self, beta: float) -> None:
        """Wq = Wk = sqrt(beta/√d)·I, no bias: self logits ≈ beta, the others ~ N(0, beta²/d)."""
        _require_norm(self, type(self).__name__)
        self.qk.weight.copy_(_local_projection(self.qk.weight, self.head_dim, beta))
        if self.qk.bias is not None:
            self.qk.bias.zero_()

    @torch.jit.ignore
    def filter_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str) -> List[str]:
        for suffix in ('weight', 'bias'):  # a 'tied' checkpoint is the special case Wq = Wk = W: exact
            tied = f'{prefix}w.{suffix}'
            if tied in state_dict and f'{prefix}qk.{suffix}' not in state_dict:
                state_dict[f'{prefix}qk.{suffix}'] = torch.cat([state_dict.pop(tied)] * 2, dim=0)
                _logger.info(f'{prefix}qk.{suffix}: built from a tied checkpoint (Wq = Wk = W)')
        return super().filter_state_dict(state_dict, prefix)


@register_pos_attn_layer('tied')
class TiedAttentionMap(PositionalAttentionMap):
    """A_h = softmax((LN(P)·W_h)(LN(P)·W_h)ᵀ / √d): one map for queries and keys.

    The logits are a Gram matrix: symmetric (i's affinity for j is j's for i) and positive semi-definite, so positions
    with similar embeddings attend to each other. Half the positional parameters and work of 'qk'.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: GridSize, bias: bool = False, device=None, dtype=None,
                 **kwargs: Any) -> None:
        super().__init__(dim, num_heads, grid_size, bias=bias, device=device, dtype=dtype, **kwargs)
        self.w = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    def query_key(self, pos: torch.Tensor, grid_size: GridSize) -> Tuple[torch.Tensor, torch.Tensor]:
        N = pos.shape[-2]
        # the scale is split over both factors so the product is exactly a Gram matrix
        q = self.w(self.norm(pos)).reshape(N, self.num_heads, self.head_dim).transpose(0, 1) * self.scale ** 0.5
        return q, q

    @torch.jit.ignore
    @torch.no_grad()
    def init_local(self, beta: float) -> None:
        """W = sqrt(beta/√d)·I, no bias: self logits ≈ beta."""
        _require_norm(self, type(self).__name__)
        self.w.weight.copy_(_local_projection(self.w.weight, self.head_dim, beta))
        if self.w.bias is not None:
            self.w.bias.zero_()

    @torch.jit.ignore
    def filter_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str) -> List[str]:
        for suffix in ('weight', 'bias'):  # a 'qk' checkpoint: keep its query half
            qk = f'{prefix}qk.{suffix}'
            if qk in state_dict and f'{prefix}w.{suffix}' not in state_dict:
                value = state_dict.pop(qk)
                state_dict[f'{prefix}w.{suffix}'] = value[:value.shape[0] // 2]
                _logger.info(f'{prefix}w.{suffix}: the query half of a qk checkpoint (its key half is dropped)')
        return super().filter_state_dict(state_dict, prefix)


def _resample_last_dim_grid(
        t: torch.Tensor,
        old_size: GridSize,
        new_size: GridSize,
        interpolation: str,
        antialias: bool,
) -> torch.Tensor:
    """Resample the last dimension of `t` (..., old_h·old_w), read as a row-major grid, to (..., new_h·new_w)."""
    lead = t.shape[:-1]
    grid = t.reshape(-1, 1, old_size[0], old_size[1]).float()
    grid = F.interpolate(grid, size=new_size, mode=interpolation, align_corners=False, antialias=antialias)
    return grid.reshape(*lead, new_size[0] * new_size[1]).to(t.dtype)


def resample_logit_table(
        table: torch.Tensor,
        new_size: GridSize,
        old_size: GridSize,
        num_prefix_tokens: int = 1,
        interpolation: str = 'bicubic',
        antialias: bool = True,
) -> torch.Tensor:
    """Resample a (H, N, N) token-to-token table to another patch grid.

    Patch queries and patch keys are each resampled as a 2D grid (keys first, then queries); prefix-to-patch rows and
    patch-to-prefix columns along their patch axis; prefix-to-prefix entries are kept.
    """
    if tuple(new_size) == tuple(old_size):
        return table
    p = num_prefix_tokens
    new_size, old_size = tuple(new_size), tuple(old_size)
    resample = lambda t: _resample_last_dim_grid(t, old_size, new_size, interpolation, antialias)  # noqa: E731
    prefix_prefix = table[:, :p, :p]
    prefix_patch = resample(table[:, :p, p:])
    patch_prefix = resample(table[:, p:, :p].transpose(1, 2)).transpose(1, 2)
    patch_patch = resample(resample(table[:, p:, p:]).transpose(1, 2)).transpose(1, 2)
    top = torch.cat([prefix_prefix, prefix_patch], dim=2)
    bottom = torch.cat([patch_prefix, patch_patch], dim=2)
    return torch.cat([top, bottom], dim=1)


def _square_grid(num_tokens: int, num_prefix_tokens: int, what: str) -> GridSize:
    side = int(math.sqrt(num_tokens - num_prefix_tokens))
    if side * side != num_tokens - num_prefix_tokens:
        raise ValueError(f'{what}: cannot resample a table of {num_tokens} tokens, expected a square grid plus '
                         f'{num_prefix_tokens} prefix token(s)')
    return side, side


@register_pos_attn_layer('logits')
class LogitsAttentionMap(PositionalAttentionMap):
    """A_h = softmax(L_h): the logits are a learned (H, N, N) table, independent of P.

    The attention of the paper's simplified model. The table belongs to one patch grid; for another it is resampled
    (bicubic, per axis), as relative position tables are.
    """
    uses_pos_table = False

    def __init__(self, dim: int, num_heads: int, grid_size: GridSize, device=None, dtype=None, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, grid_size, device=device, dtype=dtype, **kwargs)
        num_tokens = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.table = nn.Parameter(torch.zeros(num_heads, num_tokens, num_tokens, device=device, dtype=dtype))
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.table, std=.02)  # small and random, like timm's position embeddings: A starts ~uniform

    def reset_parameters(self) -> None:
        self.init_weights()

    def logits(self, pos: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        if grid_size[0] == self.grid_size[0] and grid_size[1] == self.grid_size[1]:
            return self.table
        return self._resampled(grid_size)

    @torch.jit.unused
    def _resampled(self, grid_size: GridSize) -> torch.Tensor:
        return resample_logit_table(self.table, grid_size, self.grid_size, self.num_prefix_tokens)

    @torch.jit.ignore
    @torch.no_grad()
    def init_local(self, beta: float) -> None:
        """Add beta·I to the (small, random) table."""
        self.table.add_(beta * torch.eye(self.table.shape[-1], device=self.table.device, dtype=self.table.dtype))

    @torch.jit.ignore
    def set_grid_size(self, grid_size: GridSize) -> None:
        grid_size = (int(grid_size[0]), int(grid_size[1]))
        if grid_size != self.grid_size:
            self.table = nn.Parameter(self._resampled(grid_size).detach(), requires_grad=self.table.requires_grad)
        super().set_grid_size(grid_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        return {'table'}  # a position bias, like timm's relative position tables

    @torch.jit.ignore
    def filter_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str) -> List[str]:
        key = prefix + 'table'
        if key in state_dict and state_dict[key].shape != self.table.shape:
            old = state_dict[key]
            if old.shape[0] != self.table.shape[0]:
                raise ValueError(f'{key}: the checkpoint has {old.shape[0]} heads, this model {self.table.shape[0]}')
            old_grid = _square_grid(old.shape[-1], self.num_prefix_tokens, key)
            state_dict[key] = resample_logit_table(old, self.grid_size, old_grid, self.num_prefix_tokens)
            _logger.info(f'{key}: resampled from a {old_grid[0]}x{old_grid[1]} to a '
                         f'{self.grid_size[0]}x{self.grid_size[1]} grid')
        return super().filter_state_dict(state_dict, prefix)


class FixedAttentionMap(PositionalAttentionMap):
    """A positional attention baked into a buffer by `PositionalAttention.reparameterize()` (inference).

    It holds A itself, (H, N, N) in the model's dtype, and none of the parameters that computed it; it serves only the
    grid it was computed for.
    """
    uses_pos_table = False

    def __init__(self, attn: torch.Tensor, grid_size: GridSize, num_prefix_tokens: int = 1) -> None:
        nn.Module.__init__(self)  # not the registry's constructor: it is made from a computed A, not from a width
        self.num_heads = attn.shape[0]
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = num_prefix_tokens
        self.register_buffer('attn', attn)

    def logits(self, pos: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        return self.forward(pos, grid_size).log()

    def forward(
            self,
            pos: torch.Tensor,
            grid_size: GridSize,
            query_key: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        torch._assert(
            grid_size[0] == self.grid_size[0] and grid_size[1] == self.grid_size[1],
            'this positional attention was reparameterized (baked) for one patch grid and serves no other; '
            'build the model without reparameterize() for other input sizes')
        return self.attn

    @torch.jit.ignore
    def init_local(self, beta: float) -> None:
        raise ValueError('a reparameterized positional attention has no parameters to initialize')

    @torch.jit.ignore
    def set_grid_size(self, grid_size: GridSize) -> None:
        if tuple(grid_size) != self.grid_size:
            raise ValueError(f'this model was reparameterized for a {self.grid_size[0]}x{self.grid_size[1]} patch '
                             f'grid; its attention cannot be recomputed for {grid_size[0]}x{grid_size[1]}')

    @torch.jit.ignore
    def filter_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str) -> List[str]:
        if prefix + 'attn' not in state_dict:
            raise ValueError(f'{prefix}attn: this model is reparameterized (baked attention) but the checkpoint holds '
                             f'the parameters that compute it; load it first, then reparameterize')
        return super().filter_state_dict(state_dict, prefix)


# --------------------------------------------------------------------------------------------------------------------
# Attention and block


class PositionalAttention(nn.Module):
    """Multi-head attention whose attention matrix is a function of the positional table only.

    `pos_map` (the layer chosen by `pos_attn_layer`) turns the positional table into A once per forward; the values of
    every image are mixed by that one A. There is no cache: A always comes from the current parameters, unless the
    layer was reparameterized for inference (`reparameterize()`, called by `timm.utils.reparameterize_model`), which
    bakes A into a buffer and drops the parameters that only compute it.

    With `lean` (the default) the forward runs the operators of `lean_attention`, which keep neither A nor A·V for
    backward and, without autograd, build A one head at a time; `lean=False` runs the plain ops, as TorchScript, FX
    and jit tracing (ONNX export), torch.export and torch.func transforms always do. Both compute the same function.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: GridSize = (14, 14),
            num_prefix_tokens: int = 1,
            pos_attn_layer: Union[str, Type[PositionalAttentionMap]] = 'qk',
            qkv_bias: bool = False,
            proj_bias: bool = True,
            pos_norm: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Type[nn.Module] = LayerNorm,
            lean: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            dim: Token (and positional table) width.
            num_heads: Number of attention heads.
            grid_size: Patch grid of the model (for layers whose parameters depend on it).
            num_prefix_tokens: Class/prefix tokens in front of the patches.
            pos_attn_layer: Positional attention layer: a registered name ('qk', 'tied', 'logits') or a class.
            qkv_bias: Bias in the positional projections and the value projection.
            proj_bias: Bias in the output projection.
            pos_norm: Normalize the positional table before projecting it.
            attn_drop: Dropout on the attention matrix (one mask for the whole batch).
            proj_drop: Dropout after the output projection.
            norm_layer: Normalization layer for `pos_norm`.
            lean: Run the memory-lean operators (`lean_attention`); False: the plain ops.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.pos_map = get_pos_attn_layer(pos_attn_layer)(
            dim, num_heads, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, pos_norm=pos_norm,
            bias=qkv_bias, norm_layer=norm_layer, **dd)
        self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.lean = lean
        # Set by the model that owns this layer: returns (positional table, grid) of the model's own grid, so that
        # reparameterize() (which timm calls without arguments) can compute A. A bound method of the model, so deep
        # copies (EMA, reparameterize_model) follow the copy.
        self.pos_source: Optional[PosSource] = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        """x: normalized tokens (B, N, C); pos: the positional table (1, N, C) of `grid_size`."""
        if not torch.jit.is_scripting():  # TorchScript compiles only the plain ops
            if self.lean and use_lean_ops():
                return forward_lean(self, x, pos, grid_size)
        attn = self.attn_drop(self.pos_map(pos, grid_size))
        x = self.proj(apply_positional_attention(attn, self.v(x), self.num_heads))
        return self.proj_drop(x)

    @torch.jit.ignore
    def is_reparameterized(self) -> bool:
        return isinstance(self.pos_map, FixedAttentionMap)

    @torch.jit.ignore
    def reparameterize(self) -> None:
        """Bake this block's attention for the model's grid into a buffer, for inference.

        Afterwards the layer holds A itself (in the model's dtype) instead of the parameters that computed it, so a
        batch-1 forward does no positional work at all. It serves only that grid. Called on every such layer by
        `timm.utils.reparameterize_model(model)`.
        """
        if self.is_reparameterized():
            return
        if self.pos_source is None:
            raise RuntimeError('reparameterize() needs the positional table of the model that owns this layer; '
                               'use timm.utils.reparameterize_model(model)')
        pos, grid_size = self.pos_source()
        with torch.no_grad():
            query_key = self.pos_map.query_key(pos, grid_size)
            if query_key is None:
                attn = self.pos_map(pos, grid_size).detach().clone()
            else:  # head by head, exactly as the lean forward builds it
                attn = torch.stack([head_attention(query_key, h) for h in range(self.num_heads)])
                attn = attn.to(query_key[0].dtype)
        self.pos_map = FixedAttentionMap(attn, grid_size, self.pos_map.num_prefix_tokens)

    @torch.jit.ignore
    def filter_state_dict(self, state_dict: Dict[str, torch.Tensor], prefix: str) -> List[str]:
        """Adapt a checkpoint's attention entries under `prefix` (e.g. 'blocks.3.attn.') to this layer, in place.

        Accepts our checkpoints (any registered variant the layer can convert), version 0.1 names (`qk`,
        `pos_norm`), and standard ViT attention (`qkv`: its value rows become `v`). Entries of other layers that cannot
        be converted are dropped with a log line; returns the names left freshly initialized.
        """
        map_prefix = prefix + 'pos_map.'
        for old, new in (('qk.', 'qk.'), ('pos_norm.', 'norm.')):  # timm_posattn 0.1 kept them on the attention
            for key in [k for k in state_dict if k.startswith(prefix + old)]:
                state_dict[map_prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
        for suffix in ('weight', 'bias'):
            qkv = f'{prefix}qkv.{suffix}'
            if qkv in state_dict:  # standard attention: the value rows are ours, its image Q/K have no counterpart
                value = state_dict.pop(qkv)
                state_dict[f'{prefix}v.{suffix}'] = value[2 * value.shape[0] // 3:]
        fresh = self.pos_map.filter_state_dict(state_dict, map_prefix)
        own = {map_prefix + k for k in self.pos_map.state_dict()}
        dropped = [k for k in state_dict if k.startswith(map_prefix) and k not in own]
        dropped += [k for k in state_dict if k.startswith((prefix + 'q_norm.', prefix + 'k_norm.'))]
        for key in dropped:
            state_dict.pop(key)
        if dropped:
            _logger.info(f'Not used by {type(self.pos_map).__name__}: {", ".join(dropped)}')
        return fresh


class PositionalBlock(nn.Module):
    """Pre-norm transformer block with positional attention; same layout and names as timm's `Block`."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_bias: bool = True,
            grid_size: GridSize = (14, 14),
            num_prefix_tokens: int = 1,
            pos_attn_layer: Union[str, Type[PositionalAttentionMap]] = 'qk',
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
            grid_size=grid_size,
            num_prefix_tokens=num_prefix_tokens,
            pos_attn_layer=pos_attn_layer,
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

    def _attention(self, x: torch.Tensor, pos: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        """attn(norm1(x)). The lean operators take norm1 in: the value projection's operator normalizes x itself and
        recomputes norm1(x) in backward rather than storing it (forward hooks on norm1 and attn then do not fire).

        Returned, never bound to a name in `forward`: the output is freed by the residual add, before the MLP runs.
        """
        if not torch.jit.is_scripting():
            if self.attn.lean and use_lean_ops():
                return forward_lean(self.attn, x, pos, grid_size, norm=self.norm1)
        return self.attn(self.norm1(x), pos, grid_size)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, grid_size: GridSize) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self._attention(x, pos, grid_size)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x
