#!/usr/bin/env python3
""" What distillation costs per step: a distillation step against a plain training step of the same student

The ImageNet recipe (configs/imagenet_convert_small.yaml) distills a converted positional ViT from its timm source.
Its cost is stated as this ratio, measured, not guessed: the training step of train.py's `ClassificationTask`
(student forward, loss, backward, AdamW step) and of its `LogitDistillationTask` (the same plus the teacher's
forward in eval mode, as train.py builds them through `timm.task`), timed alternately in one process on the same
random batch, median of `--repeats`. A third row times a plain training step of the teacher (timm's ViT of the same
size) for scale. Weights are random: the cost does not depend on them.

    python benchmarks/distill_step.py --device cpu -b 8
    python benchmarks/distill_step.py --device cuda --dtype bfloat16 -b 128 --json distill.json
"""
import json
import os
import statistics
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import timm
from timm.optim import create_optimizer_v2
from timm.task import ClassificationTask, DistillationTeacher, LogitDistillationTask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (this folder's benchmark: timing, environment, output policy)
from timm_posattn.cli import ArgumentParser, int_range, run_command  # noqa: E402
from timm_posattn.loading import require_registered  # noqa: E402


@dataclass
class TaskRunner:
    """One timm training task on a fixed batch: `step()` is train.py's update without the data loader."""
    task: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    inputs: torch.Tensor
    targets: torch.Tensor
    autocast: Callable[[], Any]

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.task(self.inputs, self.targets)['loss']
        loss.backward()
        self.optimizer.step()


def make_task_runner(task: nn.Module, student: nn.Module, device: torch.device, dtype: torch.dtype,
                     batch_size: int, seed: int) -> TaskRunner:
    student.train()
    height, width = student.patch_embed.img_size
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, student.patch_embed.proj.in_channels, height, width, generator=generator)
    targets = torch.randint(0, student.num_classes, (batch_size,), generator=generator)
    autocast = nullcontext if dtype == torch.float32 else (lambda: torch.autocast(device.type, dtype=dtype))
    optimizer = create_optimizer_v2(student, opt='adamw', lr=1e-4, weight_decay=0.05)
    return TaskRunner(task, optimizer, device, inputs.to(device), targets.to(device), autocast)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('--student', default='vit_posattn_small_patch16_224', help='student model (timm name)')
    parser.add_argument('--teacher', default='vit_small_patch16_224', help='teacher model (timm name, random weights)')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    parser.add_argument('-b', '--batch-size', type=int_range(1), default=8)
    parser.add_argument('--warmup', type=int_range(0), default=1)
    parser.add_argument('--repeats', type=int_range(1), default=5)
    parser.add_argument('--iters', type=int_range(1), default=1)
    parser.add_argument('--num-threads', type=int_range(1), default=None)
    parser.add_argument('--seed', type=int_range(0), default=0)
    parser.add_argument('--json', default=None, metavar='OUT', help='write the results to OUT (atomically)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    json_out = throughput.claim_output(args.json, args.overwrite, 'benchmarks/distill_step.py') if args.json else None
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    require_registered(args.student, '--student')
    require_registered(args.teacher, '--teacher')
    torch.manual_seed(args.seed)
    student = timm.create_model(args.student).to(device)
    same_inputs = dict(num_classes=student.num_classes, img_size=student.patch_embed.img_size)
    teacher_model = timm.create_model(args.teacher, **same_inputs).to(device).eval()
    teacher = DistillationTeacher(teacher_model, device=device)
    scratch_teacher = timm.create_model(args.teacher, **same_inputs).to(device)
    runners = {
        'student, ClassificationTask': make_task_runner(
            ClassificationTask(student, criterion=nn.CrossEntropyLoss(), device=device, verbose=False),
            student, device, dtype, args.batch_size, args.seed),
        'student, LogitDistillationTask': make_task_runner(
            LogitDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), temperature=4.0, device=device,
                                  verbose=False),
            student, device, dtype, args.batch_size, args.seed),
        'teacher architecture, ClassificationTask': make_task_runner(
            ClassificationTask(scratch_teacher, criterion=nn.CrossEntropyLoss(), device=device, verbose=False),
            scratch_teacher, device, dtype, args.batch_size, args.seed),
    }
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    seconds = throughput.time_round_robin(list(runners.values()), args.repeats, args.iters)
    median = {name: statistics.median(s) / args.iters for name, s in zip(runners, seconds)}
    base = median['student, ClassificationTask']
    rows = [dict(step=name, seconds_per_step=round(t, 5), ratio_to_plain_student=round(t / base, 3))
            for name, t in median.items()]
    print(f'{args.student} student, {args.teacher} teacher, batch {args.batch_size}, {args.device}/{args.dtype}, '
          f'{torch.get_num_threads()} threads, median of {args.repeats}')
    print('| step | s/step | ratio to the plain student step |\n|---|--:|--:|')
    for row in rows:
        print(f"| {row['step']} | {row['seconds_per_step']:.3f} | {row['ratio_to_plain_student']:.2f} |")
    result = dict(environment=throughput.environment(sys.argv[1:] if argv is None else list(argv)),
                  student=args.student, teacher=args.teacher, batch_size=args.batch_size, device=args.device,
                  dtype=args.dtype, repeats=args.repeats, rows=rows)
    if json_out:
        folder, name = json_out
        folder.write_text(name, json.dumps(result, indent=2) + '\n')
        print(f'wrote {args.json}')
    return result


def run(argv: Optional[List[str]] = None) -> int:
    """The command under the package's error policy: a bad value is one line and exit code 2."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
