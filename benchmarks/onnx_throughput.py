#!/usr/bin/env python3
""" onnxruntime throughput: the reparameterized positional ViT vs timm's ViT of the same size, both exported alike

Each model is exported by `timm_posattn.export.export_onnx` (timm's `onnx_export` underneath, the same options for
both; ours reparameterized, so every positional block's A is a constant; every export checked against PyTorch), then
run by onnxruntime's CPU provider with the same session options. For each image size and batch the two sessions are
timed alternately (order reversed every repeat), median of `--repeats`.

    python benchmarks/onnx_throughput.py --img-size 224 384 --batch-size 1 8 --json onnx.json

Needs the export extra (`pip install -e ".[export]"`). Results for this repository's machine: docs/performance.md.
"""
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import timm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput  # noqa: E402  (this folder's benchmark: baselines, FLOP counts, environment, policies)
from timm_posattn.cli import ArgumentParser, int_range, run_command  # noqa: E402
from timm_posattn.export import export_onnx, require_export_packages  # noqa: E402


def make_session(path: str, threads: int) -> Any:
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def time_sessions(sessions: Sequence[Any], x: Any, warmup: int, repeats: int, timer: str = 'wall') -> List[List[float]]:
    """Seconds per run of each session on input `x` (numpy), taking turns, the order reversed every repeat.

    `timer`: 'wall' or 'process' (CPU seconds of this process, onnxruntime's threads included)."""
    clock = throughput.TIMERS[timer]
    names = [s.get_inputs()[0].name for s in sessions]
    for session, name in zip(sessions, names):
        for _ in range(warmup):
            session.run(None, {name: x})
    seconds: List[List[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for r in range(repeats):
        for i in (order if r % 2 == 0 else order[::-1]):
            start = clock()
            sessions[i].run(None, {names[i]: x})
            seconds[i].append(clock() - start)
    return seconds


def benchmark_onnx(
        model_name: str,
        img_size: Optional[int],
        batch_sizes: Sequence[int],
        threads: int,
        warmup: int = 1,
        repeats: int = 5,
        dynamo: bool = False,
        seed: int = 0,
        folder: Optional[str] = None,
        timer: str = 'wall',
) -> List[Dict[str, Any]]:
    """Rows for one model and image size: ours (reparameterized) vs timm's ViT, exported and run the same way."""
    kwargs = {} if img_size is None else dict(img_size=img_size)
    torch.manual_seed(seed)
    model = timm.create_model(model_name, **kwargs).eval()
    torch.manual_seed(seed)
    base, base_label = throughput.create_baseline(model_name, model, 'timm', kwargs)
    throughput.check_pair(model, base, 'timm')
    base.eval()
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        reports = [export_onnx(m, os.path.join(tmp, f'{i}.onnx'), dynamo=dynamo) for i, m in enumerate((model, base))]
        sessions = [make_session(r.path, threads) for r in reports]
        reparam = timm.utils.reparameterize_model(model)
        rows = []
        for b in batch_sizes:
            x = torch.randn(b, *reports[0].input_size, generator=torch.Generator().manual_seed(seed)).numpy()
            seconds = time_sessions(sessions, x, warmup, repeats, timer)
            img_per_s = [b / statistics.median(s) for s in seconds]
            flops = [throughput.step_flops(m, 'infer', b) for m in (reparam, base)]
            rows.append(dict(
                model=model_name,
                variant='reparam_onnx',
                baseline=base_label,
                img_size=reports[0].input_size[-1],
                tokens=throughput.num_tokens(model),
                batch_size=b,
                img_per_s=round(img_per_s[0], 2),
                baseline_img_per_s=round(img_per_s[1], 2),
                ratio=round(img_per_s[0] / img_per_s[1], 3),
                flop_ratio=round(flops[1] / flops[0], 3),
                paired_ratios=[round(t_base / t, 3) for t, t_base in zip(*seconds)],
                seconds_per_repeat=[round(t, 6) for t in seconds[0]],
                baseline_seconds_per_repeat=[round(t, 6) for t in seconds[1]],
                onnx_max_abs_diff=[r.max_abs_diff for r in reports],
                exporter='dynamo' if dynamo else 'torchscript',
                intra_op_threads=threads,
                timer=timer,
                repeats=repeats,
            ))
    return rows


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    lines = ['| model | img | N | batch | onnxruntime img/s | baseline img/s | speed ratio (repeats) | FLOP bound |',
             '|---|--:|--:|--:|--:|--:|--:|--:|']
    for r in rows:
        paired = r['paired_ratios']
        spread = f" ({min(paired):.2f}-{max(paired):.2f})" if len(paired) > 1 else ''
        lines.append(f"| {r['model']} (reparameterized) vs {r['baseline']} | {r['img_size']} | {r['tokens']} | "
                     f"{r['batch_size']} | {r['img_per_s']:.1f} | {r['baseline_img_per_s']:.1f} | "
                     f"{r['ratio']:.2f}{spread} | {r['flop_ratio']:.2f} |")
    return '\n'.join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog='python benchmarks/onnx_throughput.py',
                            description="onnxruntime throughput of the reparameterized model vs timm's ViT.")
    parser.add_argument('--models', nargs='+', default=list(throughput.DEFAULT_MODELS), metavar='NAME')
    parser.add_argument('--img-size', nargs='+', type=int_range(1), default=[224, 384], metavar='PX',
                        help='image sizes (default: 224 384)')
    parser.add_argument('--batch-size', '-b', nargs='+', type=int_range(1), default=[1, 8], metavar='N',
                        help='batch sizes (default: 1 8)')
    parser.add_argument('--threads', type=int_range(1), default=None,
                        help="onnxruntime intra-op threads (default: torch's thread count)")
    parser.add_argument('--warmup', type=int_range(1), default=1, help='untimed runs per session (default: 1)')
    parser.add_argument('--repeats', type=int_range(1), default=5, help='timed runs, median reported (default: 5)')
    parser.add_argument('--dynamo', action='store_true', help='export with the torch.export based exporter')
    parser.add_argument('--timer', default='wall', choices=list(throughput.TIMERS),
                        help='wall: wall-clock seconds (default); process: CPU seconds, for a shared machine with '
                             '--threads 1')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', default=None, metavar='OUT', help='write the environment and rows to OUT')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    throughput.require_models(args.models, args.img_size)
    output = (throughput.claim_output(args.json, args.overwrite, 'benchmarks/onnx_throughput.py') if args.json
              else None)  # refuse before the run
    require_export_packages(('onnx', 'onnxruntime') + (('onnxscript',) if args.dynamo else ()))
    threads = args.threads or torch.get_num_threads()
    rows, start = [], time.perf_counter()
    for name in args.models:
        for img_size in args.img_size:
            new_rows = benchmark_onnx(name, img_size, args.batch_size, threads, args.warmup, args.repeats,
                                      args.dynamo, args.seed, timer=args.timer)
            rows.extend(new_rows)
            print(markdown_table(new_rows), flush=True)
    import onnxruntime
    environment = dict(throughput.environment(argv), onnxruntime=onnxruntime.__version__, intra_op_threads=threads)
    environment['command'] = ' '.join(['python', os.path.relpath(os.path.abspath(__file__))] + argv)
    payload = dict(environment=environment, rows=rows, seconds_total=round(time.perf_counter() - start, 1))
    print(f"\n{environment['cpu']}, onnxruntime {environment['onnxruntime']}, {threads} threads, {args.timer} time, "
          f"{payload['seconds_total']} s, load average {throughput.load_average()}\n")
    print(markdown_table(rows))
    if output is not None:
        folder, name = output
        folder.write_text(name, json.dumps(payload, indent=2) + '\n')
        print(f'wrote {args.json}')
    return payload


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
