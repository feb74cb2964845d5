#!/usr/bin/env python3
""" Micro-benchmark: ways to apply one batch-shared attention matrix A (H, N, N) to values V (B, N, C)

Why the model applies positional attention the way it does (`apply_positional_attention`: one bmm over an
(H, N, B·d_head) view of V), measured against the alternatives, and against the image-dependent attention core
of timm's ViT that it replaces:

  bmm         ours: per head one (N, N) @ (N, B·d) GEMM, all heads in one bmm, two layout copies
  broadcast   A (1, H, N, N) @ V (B, H, N, d) with matmul broadcasting over the batch
  einsum      torch.einsum('hnm,bmhd->bnhd', A, V)
  sdpa_bias   scaled_dot_product_attention with zero Q/K and log(A) as additive mask (softmax(log A) = A)
  timm_sdpa   timm's ViT attention core for the same shape: SDPA on per-image Q, K, V (needs Q/K, which
              positional attention does not compute; shown for scale)

With `--projections` the whole attention module is timed instead, value/QKV and output projections included:

  model           the model's PositionalAttention: linear -> bmm mixing -> linear
  channels_first  no layout copies: Vᵀ = Wv·X̂ᵀ (C, B·N) viewed as (H, d·B, N), then Vᵀ·Aᵀ, then the output
                  projection on the transposed result
  timm_attention  timm's Attention: QKV linear -> SDPA -> linear

Every variant is checked against the first one before anything is timed (except timm's, a different function).
`infer` is a no-grad forward; `train` a forward plus backward to every input and weight. Variants are timed
round-robin, median of `--repeats`.
"""
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

try:
    import timm_posattn  # noqa: F401
except ModuleNotFoundError as e:  # run from a checkout without installing
    if e.name != 'timm_posattn':
        raise
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_posattn.cli import ArgumentParser, UsageError, int_range, run_command  # noqa: E402
from timm_posattn.outputs import OutputFolder  # noqa: E402
from timm_posattn.layers import apply_positional_attention

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
MODES = ('infer', 'train')
Variant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (attn, v or x, qk) -> (B, N, C)


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, N, C = t.shape
    return t.view(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, H, N, d)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    B, H, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, H * d)


def make_variants(num_heads: int) -> Dict[str, Variant]:
    """Each variant maps (attn (H, N, N), v (B, N, C), qk (B, N, 2C): per-image Q/K for timm_sdpa) to (B, N, C)."""
    def bmm(attn, v, qk):
        return apply_positional_attention(attn, v, num_heads)

    def broadcast(attn, v, qk):
        return _tokens(attn.unsqueeze(0) @ _heads(v, num_heads))

    def einsum(attn, v, qk):
        B, N, C = v.shape
        return torch.einsum('hnm,bmhd->bnhd', attn, v.view(B, N, num_heads, -1)).reshape(B, N, C)

    def sdpa_bias(attn, v, qk):
        zeros = v.new_zeros(v.shape[0], num_heads, v.shape[1], v.shape[2] // num_heads)
        return _tokens(F.scaled_dot_product_attention(zeros, zeros, _heads(v, num_heads), attn_mask=attn.log()))

    def timm_sdpa(attn, v, qk):
        q, k = qk.chunk(2, dim=-1)
        return _tokens(F.scaled_dot_product_attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads)))

    return dict(bmm=bmm, broadcast=broadcast, einsum=einsum, sdpa_bias=sdpa_bias, timm_sdpa=timm_sdpa)


def projection_weights(dim: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator
                       ) -> Dict[str, torch.Tensor]:
    """Random weights (requiring grad) for the `--projections` variants, named like the modules' parameters."""
    shapes = {'v.weight': (dim, dim), 'v.bias': (dim,), 'proj.weight': (dim, dim), 'proj.bias': (dim,),
              'qkv.weight': (3 * dim, dim), 'qkv.bias': (3 * dim,)}
    return {name: (0.05 * torch.randn(*shape, generator=gen)).to(device, dtype).requires_grad_()
            for name, shape in shapes.items()}


def make_projection_variants(num_heads: int, weights: Dict[str, torch.Tensor]) -> Dict[str, Variant]:
    """Whole attention modules mapping (attn, x (B, N, C), unused) to (B, N, C), with the given weights."""
    w_v, b_v, w_proj, b_proj = (weights[k] for k in ('v.weight', 'v.bias', 'proj.weight', 'proj.bias'))
    w_qkv, b_qkv = weights['qkv.weight'], weights['qkv.bias']

    def model(attn, x, qk):
        return F.linear(apply_positional_attention(attn, F.linear(x, w_v, b_v), num_heads), w_proj, b_proj)

    def channels_first(attn, x, qk):
        B, N, C = x.shape
        v_t = torch.addmm(b_v.unsqueeze(1), w_v, x.reshape(B * N, C).t())  # (C, B·N): rows (head, d), cols (b, n)
        out_t = torch.bmm(v_t.view(num_heads, -1, N), attn.transpose(1, 2))  # (H, d·B, N), still (C, B·N)
        return F.linear(out_t.view(C, B * N).t(), w_proj, b_proj).view(B, N, C)

    def timm_attention(attn, x, qk):
        q, k, v = F.linear(x, w_qkv, b_qkv).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads))
        return F.linear(_tokens(out), w_proj, b_proj)

    return dict(model=model, channels_first=channels_first, timm_attention=timm_attention)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_layouts(
        batch_size: int = 32,
        tokens: int = 197,
        dim: int = 384,
        num_heads: int = 6,
        device: str = 'cpu',
        dtype: str = 'float32',
        modes: List[str] = list(MODES),
        warmup: int = 2,
        repeats: int = 7,
        seed: int = 0,
        projections: bool = False,
) -> List[Dict[str, object]]:
    """Time every variant in every mode; one row per (variant, mode), with its speed relative to the first variant
    (the model's way) and to the last (timm's)."""
    if dim % num_heads:
        raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
    if min(batch_size, tokens, warmup, repeats) < 1:
        raise ValueError('batch_size, tokens, warmup and repeats must be >= 1')
    torch_device, torch_dtype = torch.device(device), DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    attn = torch.randn(num_heads, tokens, tokens, generator=gen).softmax(-1).to(torch_device, torch_dtype)
    v = torch.randn(batch_size, tokens, dim, generator=gen).to(torch_device, torch_dtype)
    qk = torch.randn(batch_size, tokens, 2 * dim, generator=gen).to(torch_device, torch_dtype)
    grad_out = torch.randn(batch_size, tokens, dim, generator=gen).to(torch_device, torch_dtype)
    if projections:
        variants = make_projection_variants(num_heads, projection_weights(dim, torch_device, torch_dtype, gen))
    else:
        variants = make_variants(num_heads)
    names = list(variants)
    ours, timms = names[0], names[-1]

    with torch.no_grad():
        reference = variants[ours](attn, v, qk)
        tol = 1e-4 if torch_dtype == torch.float32 else 3e-2
        for name in names[1:-1]:  # timm's is a different function of its inputs by design
            torch.testing.assert_close(variants[name](attn, v, qk), reference, rtol=tol, atol=tol,
                                       msg=lambda m: f'{name}: {m}')

    def step(fn: Variant, mode: str) -> float:
        if mode == 'infer':
            _sync(torch_device)
            start = time.perf_counter()
            with torch.no_grad():
                fn(attn, v, qk)
        else:
            inputs = [t.detach().requires_grad_() for t in (attn, v, qk)]
            _sync(torch_device)
            start = time.perf_counter()
            fn(*inputs).backward(grad_out)
        _sync(torch_device)
        return time.perf_counter() - start

    rows = []
    for mode in modes:
        for fn in variants.values():
            for _ in range(warmup):
                step(fn, mode)
        seconds: Dict[str, List[float]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():  # round-robin: drifting load hits every variant alike
                seconds[name].append(step(fn, mode))
        median = {name: statistics.median(s) for name, s in seconds.items()}
        for name in variants:
            rows.append(dict(
                variant=name, mode=mode, projections=projections, device=torch_device.type, dtype=dtype,
                batch_size=batch_size, tokens=tokens, dim=dim, num_heads=num_heads, ms=round(1e3 * median[name], 3),
                speed_vs_ours=round(median[ours] / median[name], 3),
                speed_vs_timm=round(median[timms] / median[name], 3),
                seconds_per_repeat=[round(s, 6) for s in seconds[name]]))
    return rows


def markdown_table(rows: List[Dict[str, object]]) -> str:
    """Speeds are relative: above 1, the row's variant is faster than the model's way (`ours`) or than timm's."""
    lines = ['| variant | mode | ms | speed vs ours | speed vs timm |', '|---|---|--:|--:|--:|']
    lines += [f"| {r['variant']} | {r['mode']} | {r['ms']:.2f} | {r['speed_vs_ours']:.2f} | "
              f"{r['speed_vs_timm']:.2f} |" for r in rows]
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    parser = ArgumentParser(prog='benchmarks/attention_layout.py',
                            description='Ways to apply a batch-shared attention matrix, timed side by side.')
    parser.add_argument('--batch-size', '-b', type=int_range(1), default=32)
    parser.add_argument('--tokens', type=int_range(1), default=197,
                        help='N, class token included (default: ViT-S/16 at 224)')
    parser.add_argument('--dim', type=int_range(1), default=384)
    parser.add_argument('--heads', type=int_range(1), default=6)
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--dtype', choices=list(DTYPES), default='float32', help='dtype of A, V and Q/K')
    parser.add_argument('--modes', nargs='+', choices=MODES, default=list(MODES))
    parser.add_argument('--warmup', type=int_range(1), default=2)
    parser.add_argument('--repeats', type=int_range(1), default=7)
    parser.add_argument('--num-threads', type=int_range(1), default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--projections', action='store_true',
                        help='time whole attention modules (value/QKV and output projections included)')
    parser.add_argument('--json', metavar='OUT', default=None, help='write the rows to OUT')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda: no CUDA device is available')
    if args.dim % args.heads:
        raise UsageError(f'--dim {args.dim} is not divisible by --heads {args.heads}: expected whole heads')
    out = None
    if args.json:  # refused before any timing
        out = OutputFolder(os.path.dirname(os.path.abspath(args.json)), [os.path.basename(args.json)],
                           overwrite=args.overwrite, command='benchmarks/attention_layout.py').check()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    rows = time_layouts(args.batch_size, args.tokens, args.dim, args.heads, args.device, args.dtype, args.modes,
                        args.warmup, args.repeats, args.seed, args.projections)
    print(f'B={args.batch_size} N={args.tokens} C={args.dim} H={args.heads} {args.device}/{args.dtype}, '
          f'{torch.get_num_threads()} threads, torch {torch.__version__}\n')
    print(markdown_table(rows))
    if args.json:
        payload = dict(argv=sys.argv[1:] if argv is None else argv, torch=torch.__version__,
                       num_threads=torch.get_num_threads(), rows=rows)
        print(f'\nwrote {out.write_text(os.path.basename(args.json), json.dumps(payload, indent=2))}')
    return rows


def run(argv: Optional[List[str]] = None) -> int:
    """The command under the package's error policy: a bad value is one line and exit code 2."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
