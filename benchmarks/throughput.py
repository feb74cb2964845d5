#!/usr/bin/env python3
""" Throughput and peak-memory benchmark: positional-attention ViTs vs timm's standard ViT of the same size

For each model, a baseline with identical width, depth, heads, MLP, patch and image size is built in the same
process (`--baseline timm`: timm's `VisionTransformer`, arch kwargs read from our built model; `twin`: our model
with `pos_attn_layers='none'`; `self`: the model against a second copy of itself, an A/A check of the instrument).
Both are warmed up, then timed alternately (order flipped every repeat) and the median repeat is reported.

  infer: eval mode, torch.inference_mode(), forward only
  train: train mode, zero_grad + forward + cross-entropy + backward + AdamW step (timm.optim)

Peak memory of one step, model-owned bytes only (parameters, buffers, gradients, optimizer state, caches, step
activations and temporaries; the input batch is excluded), measured after the timed repeats:
  cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats
  cpu:  high-water mark of the CPU tensor allocator, from torch.profiler(profile_memory=True) allocation events
In both cases what the other model of the pair holds is subtracted, so each figure is what the step would need alone.

Usage and the meaning of every output field: benchmarks/README.md.
"""
import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm
from timm.layers import LayerScale
from timm.optim import create_optimizer_v2
from timm.utils import ParseKwargs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def _import_posattn():
    """Import timm_posattn (registers the vit_posattn_* models), from this checkout if it is not installed."""
    try:
        import timm_posattn
    except ModuleNotFoundError as e:
        if e.name != 'timm_posattn':
            raise
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            import timm_posattn
        except ModuleNotFoundError as e2:
            if e2.name != 'timm_posattn':
                raise
            return None
    return timm_posattn


timm_posattn = _import_posattn()
has_posattn = timm_posattn is not None


def cpu_name() -> str:
    """The CPU's model name: the package's helper when it imports, else what `platform` knows."""
    if has_posattn:
        from timm_posattn.machine import cpu_name as package_cpu_name
        return package_cpu_name()
    return platform.processor() or platform.machine()


DEFAULT_MODELS = ('vit_posattn_small_patch16_224', 'vit_posattn_small_patch4_32')
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
MODES = ('infer', 'train')
BASELINES = ('timm', 'twin', 'self')
ROW_KEYS = (
    'model', 'baseline', 'mode', 'device', 'dtype', 'batch_size', 'img_per_s', 'baseline_img_per_s', 'ratio',
    'peak_mem_mb', 'baseline_peak_mem_mb',
)


def default_batch_size(img_size: Tuple[int, int]) -> int:
    """Batch of the issue's targets: 32 at ImageNet resolution, 128 for the 32x32 models."""
    return 128 if max(img_size) <= 64 else 32


# --------------------------------------------------------------------------------------------------------------------
# Matching baselines


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
    if isinstance(block.ls1, LayerScale):
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


def timm_vit_name(model_name: str) -> str:
    """The timm ViT a model is compared with: `vit_posattn_small_patch16_224` -> `vit_small_patch16_224`.

    Models without a same-named timm ViT (the 32x32 ones) start from the 16/224 ViT of their width; every
    architecture kwarg is overridden from our model anyway, the name only labels the row.
    """
    name = model_name.split('.')[0].replace('posattn_', '')
    if name in timm.list_models(name):
        return name
    for size in ('tiny', 'small', 'base', 'large'):
        if f'_{size}' in name:
            return f'vit_{size}_patch16_224'
    return 'vit_base_patch16_224'


def create_baseline(
        model_name: str,
        model: nn.Module,
        baseline: str,
        model_kwargs: Dict[str, Any],
) -> Tuple[nn.Module, str]:
    """Build the baseline of `baseline` kind for `model`; returns it with a label saying exactly what it is."""
    if baseline == 'self':
        return timm.create_model(model_name, **model_kwargs), model_name
    if baseline == 'twin':
        if not hasattr(model, 'pos_attn_indices'):
            raise ValueError(f"--baseline twin needs a vit_posattn_* model, {model_name} has no pos_attn_layers")
        kwargs = dict(model_kwargs, pos_attn_layers='none')
        return timm.create_model(model_name, **kwargs), f'{model_name}(pos_attn_layers=none)'
    if baseline != 'timm':
        raise ValueError(f'baseline must be one of {BASELINES}, got {baseline!r}')
    timm_name = timm_vit_name(model_name)
    arch = vit_arch_kwargs(model)
    default_arch = vit_arch_kwargs(timm.create_model(timm_name, pretrained=False))
    overrides = {k: v for k, v in arch.items() if default_arch[k] != v}
    label = timm_name
    if overrides:
        label += '(' + ', '.join(f'{k}={_short(v)}' for k, v in overrides.items()) + ')'
    return timm.create_model(timm_name, pretrained=False, **arch), label


def _short(value: Any) -> str:
    if isinstance(value, tuple) and len(set(value)) == 1:
        value = value[0]
    return str(value)


def attention_param_split(model: nn.Module) -> Tuple[int, int]:
    """(params inside blocks' attention modules, params elsewhere): a like-for-like pair differs only in the first."""
    attn, other = 0, 0
    for name, p in model.named_parameters():
        if name.startswith('blocks.') and '.attn.' in name:
            attn += p.numel()
        else:
            other += p.numel()
    return attn, other


def check_pair(model: nn.Module, baseline: nn.Module, baseline_kind: str) -> Dict[str, Any]:
    """Verify the baseline matches our model outside attention; raise if it does not (the ratio would be unfair)."""
    arch, base_arch = vit_arch_kwargs(model), vit_arch_kwargs(baseline)
    diff = {k: (arch[k], base_arch[k]) for k in arch if arch[k] != base_arch[k]}
    if diff:
        raise RuntimeError(f'baseline ({baseline_kind}) architecture differs from the model: {diff}')
    attn, other = attention_param_split(model)
    base_attn, base_other = attention_param_split(baseline)
    if other != base_other:
        raise RuntimeError(
            f'baseline ({baseline_kind}) has {base_other} parameters outside attention, the model {other}: '
            f'expected them to differ only in the attention modules')
    return dict(
        param_count=attn + other,
        baseline_param_count=base_attn + base_other,
        attn_param_count=attn,
        baseline_attn_param_count=base_attn,
    )


# --------------------------------------------------------------------------------------------------------------------
# Steps


@dataclass
class Runner:
    """One model set up for one mode: `step()` runs one inference or one training step on a fixed batch."""
    model: nn.Module
    mode: str
    device: torch.device
    inputs: torch.Tensor
    targets: torch.Tensor
    autocast: Callable[[], Any]
    optimizer: Optional[torch.optim.Optimizer] = None
    scaler: Optional[Any] = None
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)

    def step(self) -> None:
        if self.mode == 'infer':
            with torch.inference_mode(), self.autocast():
                self.model(self.inputs)
            return
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn(self.model(self.inputs), self.targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def owned_tensors(self) -> List[torch.Tensor]:
        """Tensors the model side holds between steps: parameters, gradients, buffers and optimizer state."""
        tensors = []
        for p in self.model.parameters():
            tensors.append(p)
            if p.grad is not None:
                tensors.append(p.grad)
        tensors.extend(self.model.buffers())
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        return tensors


def make_runner(
        model: nn.Module,
        mode: str,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        seed: int,
        compile_model: bool = False,
) -> Runner:
    """Put `model` in `mode` on `device` with a seeded random batch (the same for both models of a pair)."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    model.to(device)
    model.train(mode == 'train')
    in_chans = model.patch_embed.proj.in_channels
    height, width = model.patch_embed.img_size
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, in_chans, height, width, generator=generator).to(device)
    targets = torch.randint(0, max(model.num_classes, 1), (batch_size,), generator=generator).to(device)
    if dtype == torch.float32:
        autocast = nullcontext
    else:
        def autocast():
            return torch.autocast(device_type=device.type, dtype=dtype)
    optimizer = scaler = None
    if mode == 'train':
        optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-4, weight_decay=0.05)
        if dtype == torch.float16:
            scaler = torch.amp.GradScaler(device.type)
    runner_model = torch.compile(model) if compile_model else model
    return Runner(runner_model, mode, device, inputs, targets, autocast, optimizer, scaler)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(runner: Runner, iters: int) -> float:
    """Wall-clock seconds of `iters` steps, the device drained before and after."""
    synchronize(runner.device)
    start = time.perf_counter()
    for _ in range(iters):
        runner.step()
    synchronize(runner.device)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------------------------------
# FLOPs: the speed-up that arithmetic alone predicts, to read a measured ratio against


class _FlopCounter(TorchDispatchMode):
    """Sum of torch.utils.flop_counter's formulas (matmuls, convs, attention) over the ops a region runs.

    Like FlopCounterMode but without its module tracker, which rejects no-grad/inference-mode forwards.
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in flop_registry and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)  # e.g. SDPA -> bmm/softmax, counted below
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in flop_registry:
            self.flops += flop_registry[packet](*args, **kwargs, out_val=out)
        return out


def step_flops(model: nn.Module, mode: str, batch_size: int) -> int:
    """FLOPs of one steady-state step (infer: forward; train: forward + backward) on a meta-device copy.

    The meta device runs no arithmetic and picks no device-specific kernel, so the count is the same everywhere.
    Inference is counted on the second call, after any eval cache is filled, as in the timed repeats.
    """
    meta_model = copy.deepcopy(model).to('meta')
    meta_model.train(mode == 'train')
    height, width = meta_model.patch_embed.img_size
    x = torch.empty(batch_size, meta_model.patch_embed.proj.in_channels, height, width, device='meta')
    counter = _FlopCounter()
    if mode == 'infer':
        with torch.inference_mode():
            meta_model(x)
            with counter:
                meta_model(x)
    else:
        with counter:
            meta_model(x).sum().backward()
    return counter.flops


# --------------------------------------------------------------------------------------------------------------------
# Peak memory


def _unique_bytes(tensors: Sequence[torch.Tensor], device: torch.device) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != device.type:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def memory_method(device: torch.device) -> str:
    return 'cuda_max_memory_allocated' if device.type == 'cuda' else 'cpu_allocator_peak_torch_profiler'


def cpu_allocator_peak(fn: Callable[[], None]) -> int:
    """Highest net bytes the CPU tensor allocator held above its starting point while `fn` ran.

    Replays the allocation/free events torch.profiler records with profile_memory=True (every c10 CPU allocation,
    scratch buffers inside ops included). It does not see memory that bypasses the tensor allocator (e.g. the
    oneDNN primitive cache) nor allocator fragmentation, so it is a lower bound on RSS growth.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as e:  # private profiler API; fail loudly rather than report zeros
        raise RuntimeError(f'this torch ({torch.__version__}) does not expose profiler memory events: {e}') from e
    allocations = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]' and e.device_type().name == 'CPU')
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_peak_memory(runner: Runner) -> int:
    """Peak bytes of one step, as if the model were alone on the device (see module docstring)."""
    runner.model.train(runner.mode == 'train')  # drops eval caches so the step rebuilds (and counts) them
    if runner.optimizer is not None:
        # Free the previous step's gradients now: the profiler cannot see frees of blocks allocated before it
        # started, and the step re-allocates them anyway (counted in its increase).
        runner.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    device = runner.device
    owned = _unique_bytes(runner.owned_tensors(), device)
    if device.type == 'cuda':
        synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        runner.step()
        synchronize(device)
        increase = torch.cuda.max_memory_allocated(device) - start
    elif device.type == 'cpu':
        increase = cpu_allocator_peak(runner.step)
    else:
        raise ValueError(f'peak memory is measured on cpu or cuda, not {device.type}')
    return owned + increase


# --------------------------------------------------------------------------------------------------------------------
# Benchmark


def benchmark_pair(
        model_name: str,
        baseline: str = 'timm',
        modes: Sequence[str] = MODES,
        device: str = 'cpu',
        dtype: str = 'float32',
        batch_size: Optional[int] = None,
        warmup: int = 1,
        repeats: int = 5,
        iters: int = 1,
        compile_model: bool = False,
        measure_memory: bool = True,
        seed: int = 0,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Benchmark `model_name` against its baseline; one row per mode (the issue's keys first, then details)."""
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {list(DTYPES)}, got {dtype!r}')
    if warmup < 1 or repeats < 1 or iters < 1:
        raise ValueError(f'warmup, repeats and iters must be >= 1, got {warmup}, {repeats}, {iters}')
    model_kwargs = dict(model_kwargs or {})
    torch_device = torch.device(device)
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    torch.manual_seed(seed)
    base_model, base_label = create_baseline(model_name, model, baseline, model_kwargs)
    pair_info = check_pair(model, base_model, baseline)
    if batch_size is None:
        batch_size = default_batch_size(model.patch_embed.img_size)

    # Counted before anything moves to the device (the count runs on a meta copy).
    flops_by_mode = {mode: [step_flops(m, mode, batch_size) for m in (model, base_model)] for mode in modes}
    rows = []
    for mode in modes:
        flops = flops_by_mode[mode]
        runners = [
            make_runner(m, mode, torch_device, DTYPES[dtype], batch_size, seed, compile_model)
            for m in (model, base_model)]
        for runner in runners:
            for _ in range(warmup):
                runner.step()
        seconds: Tuple[List[float], List[float]] = ([], [])
        for r in range(repeats):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):  # alternate who goes first: drift hits both alike
                seconds[i].append(time_steps(runners[i], iters))
        peaks = [measure_peak_memory(runner) if measure_memory else None for runner in runners]
        img_per_s = [batch_size * iters / statistics.median(s) for s in seconds]
        mb = [None if p is None else round(p / 2 ** 20, 2) for p in peaks]
        rows.append(dict(
            model=model_name,
            baseline=base_label,
            mode=mode,
            device=torch_device.type,
            dtype=dtype,
            batch_size=batch_size,
            img_per_s=round(img_per_s[0], 2),
            baseline_img_per_s=round(img_per_s[1], 2),
            ratio=round(img_per_s[0] / img_per_s[1], 3),
            paired_ratios=[round(b / a, 3) for a, b in zip(*seconds)],
            peak_mem_mb=mb[0],
            baseline_peak_mem_mb=mb[1],
            mem_ratio=None if peaks[0] is None else round(peaks[0] / peaks[1], 3),
            gflops_per_img=round(flops[0] / batch_size / 1e9, 4),
            baseline_gflops_per_img=round(flops[1] / batch_size / 1e9, 4),
            flop_ratio=round(flops[1] / flops[0], 3),
            memory_method=memory_method(torch_device) if measure_memory else None,
            num_threads=torch.get_num_threads(),
            baseline_kind=baseline,
            compile=compile_model,
            seconds_per_repeat=[round(s, 6) for s in seconds[0]],
            baseline_seconds_per_repeat=[round(s, 6) for s in seconds[1]],
            warmup=warmup,
            repeats=repeats,
            iters=iters,
            model_kwargs={k: str(v) for k, v in model_kwargs.items()},
            **pair_info,
        ))
        del runners
        gc.collect()
    return rows


def environment(argv: Sequence[str]) -> Dict[str, Any]:
    """What the numbers depend on: the command line, machine, threads, library versions."""
    env = dict(
        command=' '.join(['python', os.path.relpath(__file__)] + list(argv)),
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        num_threads=torch.get_num_threads(),
        torch=torch.__version__,
        timm=timm.__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        time_utc=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
    )
    if has_posattn:
        env['timm_posattn'] = getattr(timm_posattn, '__version__', 'unknown')
    if torch.cuda.is_available():
        env['cuda_device'] = torch.cuda.get_device_name()
        env['cuda'] = torch.version.cuda
    return env


def _spread(row: Dict[str, Any]) -> str:
    """' (lo-hi)' of the per-repeat ratios: a wide range means the machine was too noisy for the median to trust."""
    paired = row.get('paired_ratios') or []
    return f' ({min(paired):.2f}-{max(paired):.2f})' if len(paired) > 1 else ''


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Rows as a markdown table.

    speed ratio > 1: ours is faster (in brackets the range of the per-repeat ratios, each of two adjacent runs);
    FLOP ratio: the speed ratio arithmetic alone predicts (baseline FLOPs / ours);
    mem ratio < 1: ours needs less memory.
    """
    def fmt(v, spec):
        return '-' if v is None else format(v, spec)
    lines = [
        '| model | baseline | mode | batch | img/s | baseline img/s | speed ratio (repeats) | FLOP ratio '
        '| peak MB | baseline peak MB | mem ratio |',
        '|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|',
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['baseline']} | {r['mode']} | {r['batch_size']} | {fmt(r['img_per_s'], '.1f')} | "
            f"{fmt(r['baseline_img_per_s'], '.1f')} | {fmt(r['ratio'], '.2f')}{_spread(r)} | {fmt(r.get('flop_ratio'), '.2f')} | "
            f"{fmt(r['peak_mem_mb'], '.0f')} | "
            f"{fmt(r['baseline_peak_mem_mb'], '.0f')} | {fmt(r['mem_ratio'], '.2f')} |")
    return '\n'.join(lines)


def write_json(path: str, payload: Dict[str, Any]) -> None:
    """Atomic write: a temp file in the same directory, then os.replace (no half-written results)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.throughput-', suffix='.json', dir=directory)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(payload, f, indent=2)
            f.write('\n')
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Throughput and peak memory of positional-attention ViTs vs a same-size standard ViT.')
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME',
                        help=f'models to benchmark (default: {" ".join(DEFAULT_MODELS)})')
    parser.add_argument('--baseline', default='timm', choices=BASELINES,
                        help="timm: timm's VisionTransformer with identical arch (default); twin: our model with "
                             "pos_attn_layers='none'; self: the model against itself (A/A check of the instrument)")
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='device (default: cpu)')
    parser.add_argument('--dtype', default='float32', choices=list(DTYPES),
                        help='float32, or bfloat16/float16 autocast (mixed precision, fp32 weights)')
    parser.add_argument('--batch-size', '-b', type=int, default=None,
                        help='batch size for every model (default: 32 at 224px, 128 for 32px models)')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES, help='infer and/or train')
    parser.add_argument('--warmup', type=int, default=None,
                        help='untimed steps per model and mode (default: 1 on cpu, 5 on cuda; +1 with --compile)')
    parser.add_argument('--repeats', type=int, default=5, help='timed repeats, the median is reported (default: 5)')
    parser.add_argument('--iters', type=int, default=None,
                        help='steps per timed repeat (default: 1 on cpu, 20 on cuda)')
    parser.add_argument('--compile', action='store_true', help='torch.compile both models')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory step')
    parser.add_argument('--num-threads', type=int, default=None, help='torch.set_num_threads (default: torch)')
    parser.add_argument('--seed', type=int, default=0, help='seed for weights and inputs (default: 0)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='extra kwargs for the model, e.g. pos_attn_layers=6 (the timm baseline follows)')
    parser.add_argument('--json', default=None, metavar='OUT', help='write the environment and rows to OUT')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device is available')
    if args.batch_size is not None and args.batch_size < 1:
        raise SystemExit(f'--batch-size must be >= 1, got {args.batch_size}')
    unknown = [m for m in args.models if not timm.is_model(m.split('.')[0])]
    if unknown:
        hint = '' if has_posattn else ' (timm_posattn could not be imported, so vit_posattn_* are not registered)'
        raise SystemExit(f'unknown model(s) {unknown}: expected names registered with timm{hint}')
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    # A CPU step takes seconds, a GPU step milliseconds: GPU repeats need many steps to rise above launch jitter.
    if args.warmup is None:
        args.warmup = (5 if args.device == 'cuda' else 1) + int(args.compile)  # compiling takes the first call
    if args.iters is None:
        args.iters = 20 if args.device == 'cuda' else 1

    rows = []
    start = time.perf_counter()
    for name in args.models:
        rows.extend(benchmark_pair(
            name,
            baseline=args.baseline,
            modes=args.modes,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            warmup=args.warmup,
            repeats=args.repeats,
            iters=args.iters,
            compile_model=args.compile,
            measure_memory=not args.no_memory,
            seed=args.seed,
            model_kwargs=args.model_kwargs,
        ))
        print(markdown_table(rows[-len(args.modes):]), flush=True)
    payload = dict(environment=environment(argv), rows=rows, seconds_total=round(time.perf_counter() - start, 1))
    env = payload['environment']
    print(f"\n{env['cpu']}, {env['num_threads']} threads, torch {env['torch']}, timm {env['timm']}, "
          f"{args.device}/{args.dtype}, memory: {rows[0]['memory_method'] if rows else '-'}, "
          f"{payload['seconds_total']} s\n")
    print(markdown_table(rows))
    if args.json:
        write_json(args.json, payload)
        print(f'\nwrote {args.json}')
    return payload


if __name__ == '__main__':
    main()
