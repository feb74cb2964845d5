#!/usr/bin/env python3
""" Throughput and peak-memory benchmark: positional-attention ViTs vs timm's standard ViT of the same size

Positional attention saves per-image work that grows with the number of tokens N (the Q/K projections of B·N tokens,
B per-image Q·Kᵀ and softmaxes), so the benchmark sweeps image sizes (`--img-size 224 384 512`) and batch sizes, one
row per model variant, size, batch and mode, each with its token count, FLOP bound, speed ratio and memory ratio.
Variants: `posattn` (the model as trained: every forward computes each block's A from the current parameters) and,
for inference, `reparam` (`timm.utils.reparameterize_model`: each block's A baked into a buffer), timed in the same
round as the plain model, so the cost of computing A every forward is read off directly (`speed_vs_posattn`).

For each model, a baseline with identical width, depth, heads, MLP, patch and image size is built in the same
process (`--baseline timm`: timm's `VisionTransformer`, arch kwargs read from our built model; `twin`: our model
with `pos_attn_blocks='none'`; `self`: the model against a second copy of itself, an A/A check of the instrument).
All models of a round are warmed up, then timed alternately (order reversed every repeat) and the median repeat is
reported.

  infer: eval mode, torch.inference_mode(), forward only
  train: train mode, zero_grad + forward + cross-entropy + backward + AdamW step (timm.optim)

With --compile every model is `torch.compile`d (default backend, static shapes) for each round; its first call, which
compiles, is an untimed warm-up step whose seconds are reported (`compile_s`).

Peak memory of one step, model-owned bytes only (parameters, buffers, gradients, optimizer state, caches, step
activations and temporaries; the input batch is excluded), measured on an untimed step before the timed repeats
(see `warm_up`):
  cuda: torch.cuda.max_memory_allocated after reset_peak_memory_stats
  cpu:  high-water mark of the CPU tensor allocator, from torch.profiler(profile_memory=True) allocation events
In both cases what the other models of the round hold is subtracted, so each figure is what the step would need alone.

Usage and the meaning of every output field: benchmarks/README.md.
"""
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

import timm
from timm.optim import create_optimizer_v2
from timm.utils import ParseKwargs, reparameterize_model


def _import_posattn():
    """Import timm_posattn (registers the vit_posattn_* models), from this checkout if it is not installed."""
    try:
        import timm_posattn
    except ModuleNotFoundError as e:
        if e.name != 'timm_posattn':
            raise
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import timm_posattn
    return timm_posattn


timm_posattn = _import_posattn()
from timm_posattn.cli import ArgumentParser, UsageError, int_range, one_line, run_command  # noqa: E402
from timm_posattn.flops import FlopCounter  # noqa: E402
from timm_posattn.machine import cpu_name  # noqa: E402
from timm_posattn.memory import cpu_allocator_peak  # noqa: E402
from timm_posattn.vit_posattn import vit_arch_kwargs  # noqa: E402
from timm_posattn.outputs import OutputFolder  # noqa: E402


DEFAULT_MODELS = ('vit_posattn_small_patch16_224',)
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
MODES = ('infer', 'train')
# 5, not 3: a CPU step's time varies so much on a 2-core machine that a median of 3 moved the rows nearest their
# targets across the line from run to run (docs/performance.md)
DEFAULT_REPEATS = 5
BASELINES = ('timm', 'twin', 'self')
VARIANTS = ('posattn', 'reparam')
ROW_KEYS = (
    'model', 'variant', 'baseline', 'mode', 'device', 'dtype', 'img_size', 'tokens', 'batch_size', 'img_per_s',
    'baseline_img_per_s', 'ratio', 'flop_ratio', 'peak_mem_mb', 'baseline_peak_mem_mb', 'mem_ratio',
)


def default_batch_sizes(img_size: Tuple[int, int], mode: str) -> Tuple[int, ...]:
    """Batches of the issue's targets: inference at 1, 8 and 32 and training at 8 for ImageNet-size inputs;
    inference at 1 and 128 and training at 128 for the 32x32 models."""
    if max(img_size) <= 64:
        return (1, 128) if mode == 'infer' else (128,)
    return (1, 8, 32) if mode == 'infer' else (8,)


def default_reparam_batch_sizes(infer_batch_sizes: Sequence[int]) -> Tuple[int, ...]:
    """Batch 1 (the latency target) and the largest inference batch: what computing A every forward costs at each."""
    return tuple(sorted({1, max(infer_batch_sizes)}))


def num_tokens(model: nn.Module) -> int:
    """Tokens per image: patches plus prefix (class) tokens."""
    return model.patch_embed.num_patches + getattr(model, 'num_prefix_tokens', 1)


# --------------------------------------------------------------------------------------------------------------------
# Matching baselines


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
            raise ValueError(f"--baseline twin needs a vit_posattn_* model, {model_name} has no pos_attn_blocks")
        kwargs = dict(model_kwargs, pos_attn_blocks='none')
        return timm.create_model(model_name, **kwargs), f'{model_name}(pos_attn_blocks=none)'
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
    compiled: bool = False

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
    # static shapes: each round has one batch size, and both models of a round are compiled alike
    runner_model = torch.compile(model, dynamic=False) if compile_model else model
    return Runner(runner_model, mode, device, inputs, targets, autocast, optimizer, scaler, compiled=compile_model)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


TIMERS = {'wall': time.perf_counter, 'process': time.process_time}


def time_steps(runner: Runner, iters: int, timer: str = 'wall') -> float:
    """Seconds of `iters` steps, the device drained before and after.

    `timer`: 'wall' (wall clock: what a user waits) or 'process' (CPU time of this process, every thread summed: with
    one thread, what the step costs however busy the machine is; CPU only).
    """
    clock = TIMERS[timer]
    synchronize(runner.device)
    start = clock()
    for _ in range(iters):
        runner.step()
    synchronize(runner.device)
    return clock() - start


# --------------------------------------------------------------------------------------------------------------------
# FLOPs: the speed-up that arithmetic alone predicts, to read a measured ratio against


def step_flops(model: nn.Module, mode: str, batch_size: int) -> int:
    """FLOPs of one steady-state step (infer: forward; train: forward + backward) on a meta-device copy.

    The meta device runs no arithmetic and picks no device-specific kernel, so the count is the same everywhere.
    Inference is counted on the second call, as the timed repeats run warm.
    """
    meta_model = copy.deepcopy(model).to('meta')
    meta_model.train(mode == 'train')
    height, width = meta_model.patch_embed.img_size
    x = torch.empty(batch_size, meta_model.patch_embed.proj.in_channels, height, width, device='meta')
    counter = FlopCounter()
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


def measure_peak_memory(runner: Runner) -> int:
    """Peak bytes of one step, as if the model were alone on the device (see module docstring)."""
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


def _as_batch_sizes(value: Union[None, int, Sequence[int]], default: Sequence[int]) -> Tuple[int, ...]:
    if value is None:
        return tuple(default)
    sizes = (value,) if isinstance(value, int) else tuple(value)
    if any(b < 1 for b in sizes):
        raise ValueError(f'batch sizes must be >= 1, got {list(sizes)}')
    return tuple(dict.fromkeys(sizes))  # in the given order, each once


def warm_up(runner: Runner, warmup: int, measure_memory: bool) -> Tuple[Optional[int], Optional[float]]:
    """Run the untimed steps; returns the step's peak memory (None if not measured), taken on one of them, and for a
    compiled model the seconds of its first call (compiling, then one step).

    On the CPU an eager inference step allocates the same tensors on every call (nothing is cached), so the first
    step is measured and counts as a warm-up step (the sweep's largest steps take many seconds). Otherwise the step
    after the warm-up is measured: a training step once the optimizer state exists, a CUDA step once cuBLAS has its
    workspace, a compiled step once it is compiled.
    """
    first = measure_memory and runner.mode == 'infer' and runner.device.type == 'cpu' and not runner.compiled
    peak = measure_peak_memory(runner) if first else None
    compile_s = None
    for i in range(warmup - int(first)):
        if i == 0 and runner.compiled:
            compile_s = time_steps(runner, 1)
        else:
            runner.step()
    if measure_memory and not first:
        peak = measure_peak_memory(runner)
    return peak, compile_s


def time_round_robin(runners: Sequence[Runner], repeats: int, iters: int, timer: str = 'wall') -> List[List[float]]:
    """Seconds per repeat of each runner, the runners taking turns and the order reversed every repeat.

    Drifting machine load then hits every model alike, and a model's repeat is adjacent in time to the others'.
    """
    seconds: List[List[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for r in range(repeats):
        for i in (order if r % 2 == 0 else order[::-1]):
            seconds[i].append(time_steps(runners[i], iters, timer))
    return seconds


def benchmark_pair(
        model_name: str,
        baseline: str = 'timm',
        modes: Sequence[str] = MODES,
        device: str = 'cpu',
        dtype: str = 'float32',
        batch_size: Union[None, int, Sequence[int]] = None,
        train_batch_size: Union[None, int, Sequence[int]] = None,
        reparam_batch_size: Union[None, int, Sequence[int]] = (),
        img_size: Optional[int] = None,
        warmup: int = 1,
        repeats: int = DEFAULT_REPEATS,
        iters: int = 1,
        compile_model: bool = False,
        measure_memory: bool = True,
        seed: int = 0,
        model_kwargs: Optional[Dict[str, Any]] = None,
        timer: str = 'wall',
) -> List[Dict[str, Any]]:
    """Benchmark `model_name` against its baseline; one row per variant, mode and batch size.

    `batch_size`: the batches of every mode (default: `default_batch_sizes`); `train_batch_size` overrides them for
    training. `reparam_batch_size`: inference batches at which the reparameterized model is timed too, in the same
    round (None: `default_reparam_batch_sizes`; empty: never). `img_size`: build the model (and so its baseline) for
    this input size instead of its own.
    """
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {list(DTYPES)}, got {dtype!r}')
    if warmup < 1 or repeats < 1 or iters < 1:
        raise ValueError(f'warmup, repeats and iters must be >= 1, got {warmup}, {repeats}, {iters}')
    if timer not in TIMERS or (timer == 'process' and device != 'cpu'):
        raise ValueError(f"timer must be 'wall', or 'process' on the cpu; got {timer!r} on {device}")
    model_kwargs = dict(model_kwargs or {})
    if img_size is not None:
        if 'img_size' in model_kwargs:
            raise ValueError('give the image size either as img_size or in model_kwargs, not both')
        model_kwargs['img_size'] = img_size
    torch_device = torch.device(device)
    torch.manual_seed(seed)
    model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    torch.manual_seed(seed)
    base_model, base_label = create_baseline(model_name, model, baseline, model_kwargs)
    pair_info = check_pair(model, base_model, baseline)
    size = tuple(model.patch_embed.img_size)
    batches = {'infer': _as_batch_sizes(batch_size, default_batch_sizes(size, 'infer'))}
    batches['train'] = _as_batch_sizes(
        train_batch_size if train_batch_size is not None else batch_size, default_batch_sizes(size, 'train'))
    reparam_batches = set(_as_batch_sizes(reparam_batch_size, default_reparam_batch_sizes(batches['infer'])))
    reparam_model = None
    if 'infer' in modes and reparam_batches & set(batches['infer']):
        reparam_model = reparameterize_model(model)  # a copy with each block's A in a buffer

    rows = []
    for mode in modes:
        for b in batches[mode]:
            candidates = [('posattn', model)]
            if mode == 'infer' and b in reparam_batches:
                candidates.append(('reparam', reparam_model))
            models = [m for _, m in candidates] + [base_model]
            # counted before anything moves to the device (the count runs on a meta copy)
            flops = [step_flops(m, mode, b) for m in models]
            if compile_model:
                torch._dynamo.reset()  # each round compiles afresh (and never hits the recompile limit)
            runners = [make_runner(m, mode, torch_device, DTYPES[dtype], b, seed, compile_model) for m in models]
            peaks, compile_s = zip(*[warm_up(runner, warmup, measure_memory) for runner in runners])
            seconds = time_round_robin(runners, repeats, iters, timer)
            img_per_s = [b * iters / statistics.median(s) for s in seconds]
            mb = [None if p is None else round(p / 2 ** 20, 2) for p in peaks]
            for i, (variant, m) in enumerate(candidates):
                rows.append(dict(
                    model=model_name,
                    variant=variant,
                    baseline=base_label,
                    mode=mode,
                    device=torch_device.type,
                    dtype=dtype,
                    img_size=size[0] if size[0] == size[1] else list(size),
                    tokens=num_tokens(m),
                    batch_size=b,
                    img_per_s=round(img_per_s[i], 2),
                    baseline_img_per_s=round(img_per_s[-1], 2),
                    ratio=round(img_per_s[i] / img_per_s[-1], 3),
                    flop_ratio=round(flops[-1] / flops[i], 3),
                    peak_mem_mb=mb[i],
                    baseline_peak_mem_mb=mb[-1],
                    peak_mem_bytes=peaks[i],
                    baseline_peak_mem_bytes=peaks[-1],
                    mem_ratio=None if peaks[i] is None else round(peaks[i] / peaks[-1], 4),
                    ratio_of_bound=round(img_per_s[i] / img_per_s[-1] / (flops[-1] / flops[i]), 3),
                    speed_vs_posattn=(round(img_per_s[i] / img_per_s[0], 3) if variant != 'posattn' else None),
                    paired_ratios=[round(t_base / t, 3) for t, t_base in zip(seconds[i], seconds[-1])],
                    gflops_per_img=round(flops[i] / b / 1e9, 4),
                    baseline_gflops_per_img=round(flops[-1] / b / 1e9, 4),
                    memory_method=memory_method(torch_device) if measure_memory else None,
                    num_threads=torch.get_num_threads(),
                    timer=timer,
                    baseline_kind=baseline,
                    compile=compile_model,
                    compile_s=None if compile_s[i] is None else round(compile_s[i], 1),
                    baseline_compile_s=None if compile_s[-1] is None else round(compile_s[-1], 1),
                    seconds_per_repeat=[round(t, 6) for t in seconds[i]],
                    baseline_seconds_per_repeat=[round(t, 6) for t in seconds[-1]],
                    warmup=warmup,
                    repeats=repeats,
                    iters=iters,
                    model_kwargs={k: str(v) for k, v in model_kwargs.items()},
                    **pair_info,
                ))
            del runners
            for m in models:  # a training round's gradients must not count as an inference round's memory
                m.zero_grad(set_to_none=True)
            gc.collect()
    return rows


def load_average() -> Optional[List[float]]:
    """The machine's 1, 5 and 15 minute load averages: above the thread count, other work shared the cores."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


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

    speed ratio > 1: ours is faster (in brackets the range of the per-repeat ratios, each of adjacent runs);
    FLOP bound: the speed ratio arithmetic alone predicts (baseline FLOPs / ours); of bound: speed ratio / FLOP bound;
    mem ratio < 1: ours needs less memory; with --compile, compile s: seconds of the first call (compiling, one step).
    """
    def fmt(v, spec):
        return '-' if v is None else format(v, spec)
    compiled = any(r.get('compile') for r in rows)
    compile_columns = ' compile s | baseline compile s |' if compiled else ''
    lines = [
        '| model | variant | baseline | img | N | mode | batch | img/s | baseline img/s | speed ratio (repeats) '
        '| FLOP bound | of bound | peak MB | baseline peak MB | mem ratio |' + compile_columns,
        '|---|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|' + ('--:|--:|' if compiled else ''),
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['baseline']} | {r['img_size']} | {r['tokens']} | {r['mode']} | "
            f"{r['batch_size']} | {fmt(r['img_per_s'], '.1f')} | {fmt(r['baseline_img_per_s'], '.1f')} | "
            f"{fmt(r['ratio'], '.2f')}{_spread(r)} | {fmt(r.get('flop_ratio'), '.2f')} | "
            f"{fmt(r.get('ratio_of_bound'), '.2f')} | {fmt(r['peak_mem_mb'], '.0f')} | "
            f"{fmt(r['baseline_peak_mem_mb'], '.0f')} | {fmt(r['mem_ratio'], '.2f')} |"
            + (f" {fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('baseline_compile_s'), '.1f')} |" if compiled else ''))
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The benchmark issue's CPU targets (ViT-S/16 against timm's ViT of the same size, fp32), read off the rows


@dataclass(frozen=True)
class Target:
    """A bound on one row metric for the rows of one variant and mode (optionally only some sizes and batches)."""
    text: str
    variant: str
    mode: str
    metric: str  # a row key: 'ratio_of_bound', 'mem_ratio' or 'ratio'
    at_least: Optional[float] = None
    at_most: Optional[float] = None
    img_sizes: Optional[Tuple[int, ...]] = None  # None: every size
    batch_sizes: Optional[Tuple[int, ...]] = None  # None: every batch

    def applies(self, row: Dict[str, Any]) -> bool:
        return (row['variant'] == self.variant and row['mode'] == self.mode
                and (self.img_sizes is None or row['img_size'] in self.img_sizes)
                and (self.batch_sizes is None or row['batch_size'] in self.batch_sizes))

    def met(self, value: float) -> bool:
        return ((self.at_least is None or value >= self.at_least)
                and (self.at_most is None or value <= self.at_most))


TARGET_MODEL = 'vit_posattn_small_patch16_224'
CPU_TARGETS = (
    Target('inference speed ratio >= 0.95 x FLOP bound (batch 8, 32)', 'posattn', 'infer', 'ratio_of_bound',
           at_least=0.95, batch_sizes=(8, 32)),
    Target('training speed ratio >= 0.95 x FLOP bound (batch 8)', 'posattn', 'train', 'ratio_of_bound',
           at_least=0.95, batch_sizes=(8,)),
    Target('inference peak memory <= 1.0x', 'posattn', 'infer', 'mem_ratio', at_most=1.0),
    Target('training peak memory <= 0.9x', 'posattn', 'train', 'mem_ratio', at_most=0.9),
    Target('reparameterized batch-1 speed ratio >= 1.0 at 224', 'reparam', 'infer', 'ratio', at_least=1.0,
           img_sizes=(224,), batch_sizes=(1,)),
    Target('reparameterized batch-1 speed ratio >= 1.1 at 384', 'reparam', 'infer', 'ratio', at_least=1.1,
           img_sizes=(384,), batch_sizes=(1,)),
)


# The same model and baseline both compiled by inductor (`--compile`), at 224 and 384 px (the operators issue)
COMPILED_CPU_TARGETS = (
    Target('compiled inference speed ratio >= 0.95 x FLOP bound (batch 8, 32)', 'posattn', 'infer', 'ratio_of_bound',
           at_least=0.95, img_sizes=(224, 384), batch_sizes=(8, 32)),
    Target('compiled training speed ratio >= 0.95 x FLOP bound (batch 8)', 'posattn', 'train', 'ratio_of_bound',
           at_least=0.95, img_sizes=(224, 384), batch_sizes=(8,)),
    Target('compiled inference peak memory <= 1.0x (batch 8, 32)', 'posattn', 'infer', 'mem_ratio', at_most=1.0,
           img_sizes=(224, 384), batch_sizes=(8, 32)),
    Target('compiled training peak memory <= 0.9x (batch 8)', 'posattn', 'train', 'mem_ratio', at_most=0.9,
           img_sizes=(224, 384), batch_sizes=(8,)),
)


def check_targets(
        rows: Sequence[Dict[str, Any]],
        targets: Sequence[Target] = CPU_TARGETS,
        compiled_targets: Sequence[Target] = COMPILED_CPU_TARGETS,
) -> List[Dict[str, Any]]:
    """Each target against each row it applies to: the issues' setting only (ViT-S/16 vs timm, CPU, fp32), eager rows
    against `targets`, compiled rows against `compiled_targets`."""
    results = []
    for row in rows:
        if (row['model'].split('.')[0] != TARGET_MODEL or row['baseline_kind'] != 'timm' or row['device'] != 'cpu'
                or row['dtype'] != 'float32'):
            continue
        for target in (compiled_targets if row['compile'] else targets):
            value = row.get(target.metric)
            if target.applies(row) and value is not None:
                results.append(dict(target=target.text, img_size=row['img_size'], batch_size=row['batch_size'],
                                    metric=target.metric, value=value, met=target.met(value),
                                    num_threads=row.get('num_threads'), timer=row.get('timer', 'wall')))
    return results


def targets_text(results: Sequence[Dict[str, Any]]) -> str:
    lines = [f"{'met   ' if r['met'] else 'MISSED'} {r['target']}: {r['metric']} {r['value']:.4g} at "
             f"{r['img_size']} px, batch {r['batch_size']}" for r in results]
    missed = sum(not r['met'] for r in results)
    lines.append(f'{len(results) - missed} of {len(results)} target checks met')
    return '\n'.join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Plot and output


def plot_sweep(rows: Sequence[Dict[str, Any]], write: Callable[[Callable[[Any], None]], Any]) -> None:
    """Speed ratio (solid) and FLOP bound (dashed) against the token count N, one panel per mode, one line per
    model, variant and batch size. `write(fn)` stores the PNG that `fn(file)` writes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r['mode'] == m for r in rows)]
    several_models = len({r['model'] for r in rows}) > 1
    fig, axes = plt.subplots(1, len(modes), figsize=(5.6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        groups: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = {}
        for r in rows:
            if r['mode'] == mode:
                groups.setdefault((r['model'], r['variant'], r['batch_size']), []).append(r)
        for (model, variant, batch), group in sorted(groups.items()):
            group = sorted(group, key=lambda r: r['tokens'])
            tokens = [r['tokens'] for r in group]
            label = f"{model} " if several_models else ''
            label += f"{'reparameterized' if variant == 'reparam' else 'positional'}, batch {batch}"
            line, = ax.plot(tokens, [r['ratio'] for r in group], 'o-', label=label)
            ax.plot(tokens, [r['flop_ratio'] for r in group], '--', color=line.get_color(), alpha=0.7)
            for r in group:
                ax.annotate(f"{r['img_size']}", (r['tokens'], r['ratio']), textcoords='offset points', xytext=(4, -10),
                            fontsize=7, color='grey')
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.set_xlabel('tokens per image N (image size in grey)')
        ax.set_ylabel('speed ratio vs timm ViT (above 1: faster)')
        ax.set_title(f"{'inference' if mode == 'infer' else 'training step'}: measured (solid), FLOP bound (dashed)",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    device = (f"{rows[0]['device']}, {rows[0]['dtype']}, {rows[0]['num_threads']} threads, "
              f"{rows[0].get('timer', 'wall')} time") if rows else ''
    fig.suptitle(f'Positional attention vs timm ViT of the same size ({device})', fontsize=10)
    fig.tight_layout()
    try:
        write(lambda f: fig.savefig(f, format='png', dpi=110))
    finally:
        plt.close(fig)


def require_models(models: Sequence[str], img_sizes: Sequence[Optional[int]],
                   model_kwargs: Optional[Dict[str, Any]] = None) -> None:
    """Every model of a sweep is registered and builds at every size (on the meta device): a bad name, size or kwarg
    is refused before minutes of timing, not midway through them."""
    unknown = [m for m in models if not timm.is_model(m.split('.')[0])]
    if unknown:
        raise UsageError(f'unknown model(s) {unknown}: expected names registered with timm')
    for name in models:
        for img_size in img_sizes:
            kwargs = dict(model_kwargs or {}, **({} if img_size is None else {'img_size': img_size}))
            try:
                timm.create_model(name, pretrained=False, device='meta', **kwargs)
            except (TypeError, ValueError) as e:
                raise UsageError(f'{name} cannot be built with {kwargs}: {one_line(e)}') from None


def claim_output(path: str, overwrite: bool, command: str = 'benchmarks/throughput.py') -> Tuple[OutputFolder, str]:
    """The output-folder policy for one file the user named: refused before any work if it exists, unless
    --overwrite; written atomically."""
    folder = OutputFolder(os.path.dirname(os.path.abspath(path)), [os.path.basename(path)], overwrite=overwrite,
                          command=command, flag='--overwrite')
    return folder.check(), os.path.basename(path)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog='python benchmarks/throughput.py',
        description='Throughput and peak memory of positional-attention ViTs vs a same-size standard ViT, over image '
                    'and batch sizes.')
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), metavar='NAME',
                        help=f'models to benchmark (default: {" ".join(DEFAULT_MODELS)})')
    parser.add_argument('--img-size', nargs='+', type=int_range(1), default=None, metavar='PX',
                        help="image sizes to build each model (and its baseline) for, e.g. 224 384 512 "
                             "(default: the model's own)")
    parser.add_argument('--baseline', default='timm', choices=BASELINES,
                        help="timm: timm's VisionTransformer with identical arch (default); twin: our model with "
                             "pos_attn_blocks='none'; self: the model against itself (A/A check of the instrument)")
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='device (default: cpu)')
    parser.add_argument('--dtype', default='float32', choices=list(DTYPES),
                        help='float32, or bfloat16/float16 autocast (mixed precision, fp32 weights)')
    parser.add_argument('--batch-size', '-b', nargs='+', type=int_range(1), default=None, metavar='N',
                        help='batch sizes of every mode (default: inference 1 8 32 and training 8 for 224 px and '
                             'larger, inference 1 128 and training 128 for 32 px models)')
    parser.add_argument('--train-batch-size', nargs='+', type=int_range(1), default=None, metavar='N',
                        help='batch sizes of the training step (default: those of --batch-size if given, else above)')
    parser.add_argument('--reparam-batch-size', nargs='*', type=int_range(1), default=None, metavar='N',
                        help='inference batch sizes at which the reparameterized model is timed too, in the same '
                             'round (default: 1 and the largest inference batch; none: give the flag alone)')
    parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES, help='infer and/or train')
    parser.add_argument('--warmup', type=int_range(1), default=None,
                        help='untimed steps per model and mode (default: 1 on cpu, 5 on cuda; +1 with --compile)')
    parser.add_argument('--repeats', type=int_range(1), default=DEFAULT_REPEATS,
                        help=f'timed repeats, the median is reported (default: {DEFAULT_REPEATS})')
    parser.add_argument('--iters', type=int_range(1), default=None,
                        help='steps per timed repeat (default: 1 on cpu, 20 on cuda)')
    parser.add_argument('--timer', default='wall', choices=list(TIMERS),
                        help='wall: wall-clock seconds (default); process: CPU seconds of this process, for a shared '
                             'machine, with --num-threads 1 (CPU only)')
    parser.add_argument('--compile', action='store_true', help='torch.compile every model')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory step')
    parser.add_argument('--num-threads', type=int_range(1), default=None,
                        help='torch.set_num_threads (default: torch)')
    parser.add_argument('--seed', type=int, default=0, help='seed for weights and inputs (default: 0)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='extra kwargs for the model, e.g. pos_attn_blocks=6 (the timm baseline follows)')
    parser.add_argument('--json', default=None, metavar='OUT', help='write the environment, rows and targets to OUT')
    parser.add_argument('--plot', default=None, metavar='PNG',
                        help='write the speed ratio and FLOP bound against the token count to PNG')
    parser.add_argument('--overwrite', action='store_true', help='replace existing --json / --plot files')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('--device cuda: no CUDA device is available')
    if args.timer == 'process' and args.device != 'cpu':
        raise UsageError('--timer process measures CPU time: use it with --device cpu')
    if args.img_size and 'img_size' in args.model_kwargs:
        raise UsageError('give the image size with --img-size or in --model-kwargs, not both')
    require_models(args.models, args.img_size or [None], args.model_kwargs)
    if args.json and args.plot and os.path.abspath(args.json) == os.path.abspath(args.plot):
        raise UsageError(f'--json and --plot both name {args.json}: give two files (the rows and the figure)')
    outputs = [claim_output(path, args.overwrite) for path in (args.json, args.plot) if path]  # refuse before the run
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    # A CPU step takes seconds, a GPU step milliseconds: GPU repeats need many steps to rise above launch jitter.
    if args.warmup is None:
        args.warmup = (5 if args.device == 'cuda' else 1) + int(args.compile)  # compiling takes the first call
    if args.iters is None:
        args.iters = 20 if args.device == 'cuda' else 1

    rows = []
    start, load_start = time.perf_counter(), load_average()
    for name in args.models:
        for img_size in args.img_size or [None]:
            new_rows = benchmark_pair(
                name,
                baseline=args.baseline,
                modes=args.modes,
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
                train_batch_size=args.train_batch_size,
                reparam_batch_size=args.reparam_batch_size,
                img_size=img_size,
                warmup=args.warmup,
                repeats=args.repeats,
                iters=args.iters,
                compile_model=args.compile,
                measure_memory=not args.no_memory,
                seed=args.seed,
                model_kwargs=args.model_kwargs,
                timer=args.timer,
            )
            rows.extend(new_rows)
            print(markdown_table(new_rows), flush=True)
    targets = check_targets(rows)
    load_end = load_average()
    payload = dict(environment=dict(environment(argv), load_average=load_start, load_average_end=load_end),
                   rows=rows, targets=targets, seconds_total=round(time.perf_counter() - start, 1))
    env = payload['environment']
    print(f"\n{env['cpu']}, {env['num_threads']} threads, torch {env['torch']}, timm {env['timm']}, "
          f"{args.device}/{args.dtype}, {args.timer} time, memory: {rows[0]['memory_method'] if rows else '-'}, "
          f"{payload['seconds_total']} s, load average {env['load_average']} at the start, {load_end} at the end\n")
    print(markdown_table(rows))
    if targets:
        print('\n' + targets_text(targets))
    for (folder, name), path in zip(outputs, [p for p in (args.json, args.plot) if p]):
        if path == args.json:
            folder.write_text(name, json.dumps(payload, indent=2) + '\n')
        else:
            plot_sweep(rows, lambda fn: folder.write(name, fn))
        print(f'wrote {path}')
    return payload


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
