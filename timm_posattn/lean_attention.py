""" Memory-lean positional attention: custom operators that torch.compile sees as single ops

A positional block's attention A (H, N, N) depends on no image, so what autograd would keep of it for backward can be
recomputed cheaply: A from the positional queries and keys (N·N·C multiply-adds once per batch), the attention output
A·V with one bmm, the normalized tokens with one elementwise pass. Three operators compute a block's attention branch
and save only what they must:

    torch.ops.timm_posattn.*                    computes                   saves for backward
    layer_norm_linear(x, norm_weight,           linear(layer_norm(x))      x, not layer_norm(x)
                      norm_bias, eps, w, b)
    attend_project(q, k, v, w, b, num_heads)    linear(softmax(q·kᵀ)·V)    q, k, v: not A, not A·V
    mix_project(attn, v, w, b, num_heads)       linear(A·V), A given       A, v: not A·V

(w None: no projection.) Per block that is two (B, N, C) activations and an (H, N, N) matrix fewer than autograd keeps.
Forward, A is built one head at a time and applied at once, so without autograd at most one (N, N) matrix exists, and
a single image goes through SDPA, which builds none. Being `torch.library.custom_op`s with `register_fake` and
`register_autograd`, they behave the same under `torch.compile`: the compiler sees one op each, saves what
`setup_context` saves, and compiles the backward formulas, which use plain differentiable ops (double backward works).

Without autograd a block's branch of more than one image is a fourth operator, `norm_attend_project` (all of
linear(A·linear(layer_norm(x))) in one, no backward), which keeps values, mixed tokens and output in one buffer (the
norm and the projections a quarter of the batch at a time), so that what it holds besides its output stays under one
(B, N, C) activation. A compiler plans memory around an operator without
seeing inside it (it keeps freed buffers of the previous block for reuse while the operator runs): this is what keeps
a compiled model's inference within timm's.

Dtypes: the value projection runs in the dtype of its weight (`layer_norm_linear` casts it to autocast's dtype), the
mixing and the output projection in the dtype of v, the softmax in float32 at least; gradients come back in each
input's dtype. The operators run with autocast off, so the compiler's shapes and dtypes are the eager ones.

`forward_lean(attn, x, pos, grid_size, norm)` is what a `layers.PositionalAttention` computes through them (its block
passes norm1); `use_lean_ops()` says where they run: eager mode and torch.compile. TorchScript, FX and jit tracing
(ONNX export), torch.export and torch.func transforms run the plain ops instead (torch.func's grad does not support
custom operators' autograd formulas).
"""
import contextlib
from typing import Callable, ContextManager, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils import flop_counter

from timm.layers import LayerNorm

__all__ = [
    'forward_lean', 'use_lean_ops', 'attend_project', 'mix_project', 'layer_norm_linear', 'norm_attend_project',
    'positional_attention_proj', 'apply_positional_attention', 'head_attention', 'apply_attention_by_head',
    'attend_one_image',
]

GridSize = Tuple[int, int]

# FX symbolic tracing turns parameters into proxies: record the plain ops
_is_fx_tracing = getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing', torch.fx._symbolic_trace.is_fx_tracing)


def use_lean_ops() -> bool:
    """Whether the operators can run here: eager mode and torch.compile, but not FX or jit tracing (ONNX export),
    torch.export or torch.func transforms, which get the plain ops. (TorchScript is checked by the caller.)"""
    if torch.compiler.is_compiling():
        is_exporting = getattr(torch.compiler, 'is_exporting', None)
        return is_exporting is None or not is_exporting()
    return not (_is_fx_tracing() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active())


# --------------------------------------------------------------------------------------------------------------------
# Applying a batch-shared attention (plain ops)


def _to_heads(t: Tensor, num_heads: int) -> Tensor:
    """Tokens (B, N, C) -> head-major (H, N, B·d_head): per head, one matrix with the batch folded into the columns."""
    B, N, C = t.shape
    return t.view(B, N, num_heads, C // num_heads).permute(2, 1, 0, 3).reshape(num_heads, N, B * (C // num_heads))


def _from_heads(t: Tensor, batch_size: int, channels: int) -> Tensor:
    """Head-major (H, N, B·d_head) -> tokens (B, N, C); the inverse of `_to_heads` (sizes explicit: B may be 0)."""
    H, N = t.shape[0], t.shape[1]
    return t.view(H, N, batch_size, channels // H).permute(2, 1, 0, 3).reshape(batch_size, N, channels)


def apply_positional_attention(attn: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """Apply per-head attention (H, N, N), shared by the whole batch, to values (B, N, C).

    The batch is folded into the GEMM's columns: one (N, N) @ (N, B·d_head) matmul per head, all heads in one bmm.
    This never materializes a (B, H, N, N) tensor and keeps the GEMMs large.
    """
    # the head-major copy of v is a temporary, freed as soon as the bmm returns
    return _from_heads(torch.bmm(attn.to(v.dtype), _to_heads(v, num_heads)), v.shape[0], v.shape[2])


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def head_attention(query_key: Tuple[Tensor, Tensor], head: int) -> Tensor:
    """One head's attention (N, N) from positional queries and keys (H, N, d), softmax in float32 at least.

    The one definition that the operators and `PositionalAttention.reparameterize()` share, so a reparameterized
    model computes exactly what the model computed.
    """
    q, k = query_key
    return (q[head] @ k[head].transpose(0, 1)).softmax(dim=-1, dtype=_softmax_dtype(q.dtype))


def _attention_from_query_key(q: Tensor, k: Tensor) -> Tensor:
    """All heads of A at once, as `head_attention` builds each (backward's recompute)."""
    return (q @ k.transpose(-2, -1)).softmax(dim=-1, dtype=_softmax_dtype(q.dtype))


def apply_attention_by_head(
        attn_of_head: Callable[[int], Tensor],
        v: Tensor,
        num_heads: int,
        out: Optional[Tensor] = None,
) -> Tensor:
    """Apply per-head attention, shared by the whole batch, to values (B, N, C), one head at a time (no autograd).

    The same (N, N) @ (N, B·d_head) GEMM per head as `apply_positional_attention`, but `attn_of_head(h)` may build
    each head's A just before it is used, so that only one head's (N, N) matrix ever exists (at high resolution and
    small batches the full (H, N, N) would outweigh the activations of a whole block), and each head's values and
    result are head-major only while it is computed: besides the result, the working memory is two heads' worth of
    (B, N, C). The result is written in token layout into `out` (may be v itself: a head's values are copied before
    its result replaces them).
    """
    B, N, C = v.shape
    d = C // num_heads
    v_by_head = v.unflatten(-1, (num_heads, d))
    out = v.new_empty(B, N, C) if out is None else out
    out_by_head = out.view(B, N, num_heads, d)
    for h in range(num_heads):
        v_head = v_by_head[:, :, h].transpose(0, 1).reshape(N, B * d)
        mixed = torch.mm(attn_of_head(h).to(v.dtype), v_head)
        del v_head
        out_by_head[:, :, h].copy_(mixed.view(N, B, d).transpose(0, 1))
    return out


def attend_one_image(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """softmax(q·kᵀ)·V for a batch of one image (1, N, C): nothing to share, so the fused SDPA kernel does it without
    ever materializing A (the scale is already in q)."""
    N, C = v.shape[1], v.shape[2]
    v = v.view(1, N, num_heads, C // num_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.unsqueeze(0).to(v.dtype), k.unsqueeze(0).to(v.dtype), v, scale=1.0)
    return out.transpose(1, 2).reshape(1, N, C)


def _project(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """linear(x, weight, bias) in the dtype of x (weight None: x)."""
    if weight is None:
        return x
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _autocast_off(device_type: str) -> ContextManager:
    """Autocast disabled, where it is on: the operators compute in the dtypes their inputs say."""
    if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _output_like(v: Tensor, weight: Optional[Tensor]) -> Tensor:
    """An empty output of the mixing operators: v's shape with the projection's width, v's dtype (fake kernels)."""
    return v.new_empty((*v.shape[:-1], v.shape[-1] if weight is None else weight.shape[0]))


# --------------------------------------------------------------------------------------------------------------------
# Mixing and projecting: attend_project (A from q and k) and mix_project (A given)


@torch.library.custom_op('timm_posattn::attend_project', mutates_args=())
def attend_project(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        num_heads: int,
) -> Tensor:
    """linear(softmax(q·kᵀ)·V, weight, bias): per-head positional queries and keys (H, N, d) with the scale in q,
    values (B, N, C) of the whole batch. A is built head by head (one image: SDPA) and never saved."""
    with _autocast_off(v.device.type):
        if v.shape[0] == 1:
            x = attend_one_image(q, k, v, num_heads)
        else:
            x = apply_attention_by_head(lambda h: head_attention((q, k), h), v, num_heads)
        return _project(x, weight, bias)


@attend_project.register_fake
def _attend_project_fake(q, k, v, weight, bias, num_heads):
    return _output_like(v, weight)


@torch.library.custom_op('timm_posattn::mix_project', mutates_args=())
def mix_project(
        attn: Tensor,
        v: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        num_heads: int,
) -> Tensor:
    """linear(A·V, weight, bias) for a given A (H, N, N): a free logit table, a baked A, a dropped-out A."""
    with _autocast_off(v.device.type):
        return _project(apply_attention_by_head(attn.__getitem__, v, num_heads), weight, bias)


@mix_project.register_fake
def _mix_project_fake(attn, v, weight, bias, num_heads):
    return _output_like(v, weight)


def _save_mix_context(ctx, num_heads: int, bias: Optional[Tensor]) -> None:
    ctx.num_heads = num_heads
    ctx.bias_dtype = None if bias is None else bias.dtype


def _attend_project_setup(ctx, inputs, output) -> None:
    q, k, v, weight, bias, num_heads = inputs
    _save_mix_context(ctx, num_heads, bias)
    ctx.save_for_backward(q, k, v, weight)


def _mix_project_setup(ctx, inputs, output) -> None:
    attn, v, weight, bias, num_heads = inputs
    _save_mix_context(ctx, num_heads, bias)
    ctx.save_for_backward(attn, v, weight)


def _mix_project_grads(
        ctx,
        attn: Tensor,
        v: Tensor,
        weight: Optional[Tensor],
        grad_out: Tensor,
        needs_attn: bool,
        needs_v: bool,
        needs_weight: bool,
        needs_bias: bool,
) -> Tuple[Optional[Tensor], ...]:
    """Gradients of linear(A·V, weight, bias) for (A, v, weight, bias), A·V recomputed; matmuls in the dtype of v."""
    dtype = v.dtype
    grad_out = grad_out.to(dtype)
    attn_c = attn.to(dtype)
    out_features = grad_out.shape[-1]
    grad_attn = grad_v = grad_weight = grad_bias = None
    if weight is not None and needs_weight:
        mixed = apply_positional_attention(attn_c, v, ctx.num_heads)  # the recompute
        grad_weight = (grad_out.reshape(-1, out_features).t() @ mixed.reshape(-1, v.shape[-1])).to(weight.dtype)
    if ctx.bias_dtype is not None and needs_bias:
        grad_bias = grad_out.reshape(-1, out_features).sum(dim=0, dtype=ctx.bias_dtype)
    if needs_attn or needs_v:
        grad_mixed = grad_out if weight is None else grad_out @ weight.to(dtype)
        if needs_attn:
            grad_attn = torch.bmm(_to_heads(grad_mixed, ctx.num_heads), _to_heads(v, ctx.num_heads).transpose(1, 2))
            grad_attn = grad_attn.to(attn.dtype)
        if needs_v:
            grad_v = apply_positional_attention(attn_c.transpose(1, 2), grad_mixed, ctx.num_heads)
    return grad_attn, grad_v, grad_weight, grad_bias


def _attend_project_backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
    q, k, v, weight = ctx.saved_tensors
    needs_q, needs_k, needs_v, needs_weight, needs_bias = ctx.needs_input_grad[:5]
    with _autocast_off(grad_out.device.type):
        attn = _attention_from_query_key(q, k)  # A as the forward built it
        grad_attn, grad_v, grad_weight, grad_bias = _mix_project_grads(
            ctx, attn, v, weight, grad_out, needs_q or needs_k, needs_v, needs_weight, needs_bias)
        grad_q = grad_k = None
        if grad_attn is not None:  # softmax backward, then the product q·kᵀ
            grad_logits = (attn * (grad_attn - (grad_attn * attn).sum(dim=-1, keepdim=True))).to(q.dtype)
            grad_q = grad_logits @ k if needs_q else None
            grad_k = grad_logits.transpose(-2, -1) @ q if needs_k else None
    return grad_q, grad_k, grad_v, grad_weight, grad_bias, None


def _mix_project_backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
    attn, v, weight = ctx.saved_tensors
    with _autocast_off(grad_out.device.type):
        grads = _mix_project_grads(ctx, attn, v, weight, grad_out, *ctx.needs_input_grad[:4])
    return (*grads, None)


attend_project.register_autograd(_attend_project_backward, setup_context=_attend_project_setup)
mix_project.register_autograd(_mix_project_backward, setup_context=_mix_project_setup)


# --------------------------------------------------------------------------------------------------------------------
# LayerNorm and the value projection


@torch.library.custom_op('timm_posattn::layer_norm_linear', mutates_args=())
def _layer_norm_linear(
        x: Tensor,
        norm_weight: Optional[Tensor],
        norm_bias: Optional[Tensor],
        eps: float,
        weight: Tensor,
        bias: Optional[Tensor],
) -> Tensor:
    """linear(layer_norm(x)): the norm over the last dimension in the dtype of x, the linear in the dtype of weight."""
    with _autocast_off(x.device.type):
        x = F.layer_norm(x, x.shape[-1:], norm_weight, norm_bias, eps)
        return F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))


@_layer_norm_linear.register_fake
def _layer_norm_linear_fake(x, norm_weight, norm_bias, eps, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)


def _layer_norm_linear_setup(ctx, inputs, output) -> None:
    x, norm_weight, norm_bias, eps, weight, bias = inputs
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, norm_weight, norm_bias, weight)


def _layer_norm_linear_backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
    x, norm_weight, norm_bias, weight = ctx.saved_tensors
    needs_x, needs_norm_weight, needs_norm_bias, _, needs_weight, needs_bias = ctx.needs_input_grad[:6]
    C, out_features = x.shape[-1], weight.shape[0]
    grad_x = grad_norm_weight = grad_norm_bias = grad_weight = grad_bias = None
    with _autocast_off(grad_out.device.type):
        x_norm, mean, rstd = torch.native_layer_norm(x, (C,), norm_weight, norm_bias, ctx.eps)  # the recompute
        grad_out = grad_out.to(weight.dtype)
        if needs_weight:
            grad_weight = grad_out.reshape(-1, out_features).t() @ x_norm.reshape(-1, C).to(weight.dtype)
        if ctx.bias_dtype is not None and needs_bias:
            grad_bias = grad_out.reshape(-1, out_features).sum(dim=0, dtype=ctx.bias_dtype)
        mask = [needs_x, norm_weight is not None and needs_norm_weight, norm_bias is not None and needs_norm_bias]
        if any(mask):
            grad_x_norm = (grad_out @ weight).to(x_norm.dtype)
            grad_x, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
                grad_x_norm, x, [C], mean, rstd, norm_weight, norm_bias, mask)
    return grad_x, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


_layer_norm_linear.register_autograd(_layer_norm_linear_backward, setup_context=_layer_norm_linear_setup)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _in_autocast_dtype(device_type: str, *tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    """Linear weights and biases cast to autocast's dtype, where autocast is on (it leaves float64 alone)."""
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def layer_norm_linear(x: Tensor, norm: nn.Module, linear: nn.Module) -> Tensor:
    """`linear(norm(x))` for a plain LayerNorm over the last dimension, storing x rather than norm(x) for backward.

    Under autocast the linear runs in autocast's dtype, as `linear(norm(x))` would (the weight is cast before the
    operator, so its gradient comes back through the cast in the parameter's dtype).
    """
    weight, bias = _in_autocast_dtype(x.device.type, linear.weight, linear.bias)
    return _layer_norm_linear(x, norm.weight, norm.bias, norm.eps, weight, bias)


def _is_plain_layer_norm(norm: nn.Module) -> bool:
    """A LayerNorm over the last dimension that F.layer_norm computes (not timm's fast-norm kernels)."""
    return (type(norm) in (nn.LayerNorm, LayerNorm) and not getattr(norm, '_fast_norm', False)
            and len(norm.normalized_shape) == 1)


# --------------------------------------------------------------------------------------------------------------------
# Inference: a block's whole attention branch in one buffer

INFERENCE_CHUNKS = 4  # the batch in quarters: the slices' temporaries are a quarter of one (B, N, C) activation


@torch.library.custom_op('timm_posattn::norm_attend_project', mutates_args=())
def norm_attend_project(
        x: Tensor,
        norm_weight: Optional[Tensor],
        norm_bias: Optional[Tensor],
        eps: float,
        v_weight: Tensor,
        v_bias: Optional[Tensor],
        q: Optional[Tensor],
        k: Optional[Tensor],
        attn: Optional[Tensor],
        proj_weight: Tensor,
        proj_bias: Optional[Tensor],
        num_heads: int,
) -> Tensor:
    """linear(A·linear(layer_norm(x), v_weight, v_bias), proj_weight, proj_bias), without autograd: A = softmax(q·kᵀ)
    built head by head, or `attn` (H, N, N) given.

    One (B, N, C) buffer holds the values, then (head by head, in place) the mixed tokens, then the output: the
    normalization and the projections run on `INFERENCE_CHUNKS` slices of the batch, each slice's temporary the only
    other activation. Besides the output, the working memory is then about a third of one (B, N, C) activation (and
    one head's A), where the training path's operators hold the values, the mixed tokens and the output at once. A
    compiler cannot see inside an operator, so this is what keeps a compiled block within timm's block.
    """
    with _autocast_off(x.device.type):
        batch, channels = x.shape[0], x.shape[-1]
        step = -(-batch // INFERENCE_CHUNKS)
        parts = [slice(start, start + step) for start in range(0, batch, step)]
        v = x.new_empty((*x.shape[:-1], v_weight.shape[0]), dtype=v_weight.dtype)
        for part in parts:
            tokens = F.layer_norm(x[part], (channels,), norm_weight, norm_bias, eps).to(v.dtype)
            _linear_into(v[part], tokens, v_weight, v_bias)
            del tokens
        if attn is None:
            assert q is not None and k is not None
            query_key = (q, k)
            apply_attention_by_head(lambda h: head_attention(query_key, h), v, num_heads, out=v)
        else:
            apply_attention_by_head(attn.__getitem__, v, num_heads, out=v)
        proj_weight = proj_weight.to(v.dtype)
        proj_bias = None if proj_bias is None else proj_bias.to(v.dtype)
        if proj_weight.shape[0] != v.shape[-1]:  # another width: a buffer of its own
            out = v.new_empty((*v.shape[:-1], proj_weight.shape[0]))
            for part in parts:
                _linear_into(out[part], v[part], proj_weight, proj_bias)
            return out
        for part in parts:
            v[part] = F.linear(v[part], proj_weight, proj_bias)
        return v


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """out = linear(x, weight, bias) for contiguous (..., in) x and (..., out) `out`, written in place."""
    x, out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)


@norm_attend_project.register_fake
def _norm_attend_project_fake(x, norm_weight, norm_bias, eps, v_weight, v_bias, q, k, attn, proj_weight, proj_bias,
                              num_heads):
    return x.new_empty((*x.shape[:-1], proj_weight.shape[0]), dtype=v_weight.dtype)


def _whole_branch_fits(attn: nn.Module, norm: Optional[nn.Module]) -> bool:
    """Whether `norm_attend_project` computes this branch: a plain LayerNorm and linear value and output projections."""
    return (norm is not None and _is_plain_layer_norm(norm) and type(attn.v) is nn.Linear
            and type(attn.proj) is nn.Linear)


# --------------------------------------------------------------------------------------------------------------------
# A positional attention layer through the operators


def positional_attention_proj(
        attn: Optional[Tensor],
        v: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        num_heads: int,
        query_key: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tensor:
    """`linear(apply_positional_attention(attn, v), weight, bias)` through the operators: A·V is recomputed in
    backward, not stored. With `query_key` (q, k such that attn = softmax(q @ kᵀ)), A is built from them inside the
    operator (`attn` is not used and may be None) and gradients flow to q and k. `weight` None: no projection."""
    if query_key is not None:
        return attend_project(query_key[0], query_key[1], v, weight, bias, num_heads)
    return mix_project(attn, v, weight, bias, num_heads)


def forward_lean(
        attn: nn.Module,
        x: Tensor,
        pos: Tensor,
        grid_size: GridSize,
        norm: Optional[nn.Module] = None,
) -> Tensor:
    """What the `PositionalAttention` `attn` computes for `norm(x)` (no norm: for x), through the operators.

    A plain LayerNorm `norm` runs inside the value projection's operator; A is built inside the mixing operator from
    the map's positional queries and keys, unless the map has none or attention dropout is active (a dropped-out A
    cannot be rebuilt in backward): then the map's A is given to it. Without autograd, a block's branch of more than
    one image is the one operator `norm_attend_project`.
    """
    dropout = attn.training and attn.attn_drop.p > 0
    query_key = None if dropout else attn.pos_map.query_key(pos, grid_size)
    if not torch.is_grad_enabled() and x.shape[0] > 1 and _whole_branch_fits(attn, norm):
        given = attn.attn_drop(attn.pos_map(pos, grid_size)) if query_key is None else None
        q, k = (None, None) if query_key is None else query_key
        v_weight, v_bias, proj_weight, proj_bias = _in_autocast_dtype(
            x.device.type, attn.v.weight, attn.v.bias, attn.proj.weight, attn.proj.bias)
        return attn.proj_drop(norm_attend_project(
            x, norm.weight, norm.bias, norm.eps, v_weight, v_bias, q, k, given, proj_weight, proj_bias,
            attn.num_heads))
    if norm is not None and _is_plain_layer_norm(norm) and type(attn.v) is nn.Linear:
        v = layer_norm_linear(x, norm, attn.v)
    else:
        v = attn.v(x if norm is None else norm(x))
    fused = type(attn.proj) is nn.Linear
    weight, bias = (attn.proj.weight, attn.proj.bias) if fused else (None, None)
    if query_key is not None:
        x = attend_project(query_key[0], query_key[1], v, weight, bias, attn.num_heads)
    else:
        x = mix_project(attn.attn_drop(attn.pos_map(pos, grid_size)), v, weight, bias, attn.num_heads)
    return attn.proj_drop(x if fused else attn.proj(x))


# --------------------------------------------------------------------------------------------------------------------
# FLOPs (torch.utils.flop_counter and timm_posattn.flops): the matmuls inside the operators


def _register_flops(op: torch._ops.OpOverloadPacket) -> Callable:
    """register_flop_formula for `op`, looked up by its overload packet as the counters do (torch 2.4 registered
    formulas under each overload instead)."""
    def register(fn: Callable) -> Callable:
        formula = flop_counter.register_flop_formula(op)(fn)
        flop_counter.flop_registry.setdefault(op, formula)
        return fn
    return register


def _linear_flops(tokens: int, in_features: int, weight_shape: Optional[Tuple[int, ...]]) -> int:
    return 0 if weight_shape is None else 2 * tokens * in_features * weight_shape[0]


@_register_flops(torch.ops.timm_posattn.attend_project)
def _attend_project_flops(q_shape, k_shape, v_shape, weight_shape, bias_shape, num_heads, *args, **kwargs) -> int:
    H, N, d = q_shape
    B, M, C = v_shape
    return 2 * H * N * k_shape[1] * d + 2 * N * M * B * C + _linear_flops(B * N, C, weight_shape)


@_register_flops(torch.ops.timm_posattn.mix_project)
def _mix_project_flops(attn_shape, v_shape, weight_shape, bias_shape, num_heads, *args, **kwargs) -> int:
    B, M, C = v_shape
    N = attn_shape[1]
    return 2 * N * M * B * C + _linear_flops(B * N, C, weight_shape)


@_register_flops(torch.ops.timm_posattn.layer_norm_linear)
def _layer_norm_linear_flops(x_shape, norm_weight_shape, norm_bias_shape, eps, weight_shape, *args, **kwargs) -> int:
    tokens = 1
    for size in x_shape[:-1]:
        tokens *= size
    return _linear_flops(tokens, x_shape[-1], weight_shape)


@_register_flops(torch.ops.timm_posattn.norm_attend_project)
def _norm_attend_project_flops(x_shape, norm_weight_shape, norm_bias_shape, eps, v_weight_shape, v_bias_shape,
                               q_shape, k_shape, attn_shape, proj_weight_shape, *args, **kwargs) -> int:
    """The branch's arithmetic: the value projection, each head's A once, the mixing and the output projection."""
    B, N, C = x_shape
    attention = 0 if q_shape is None else 2 * q_shape[0] * N * k_shape[1] * q_shape[2]
    mixing = 2 * N * N * B * v_weight_shape[0]
    return (_linear_flops(B * N, C, v_weight_shape) + attention + mixing
            + _linear_flops(B * N, v_weight_shape[0], proj_weight_shape))
