#!/usr/bin/env python3
"""The comparison table of train.py runs (benchmarks/fashion_mnist.sh, or any run folders): per run the model, its
attention, epochs, final and best top-1 on the evaluation split, read from each run's args.yaml and summary.csv.

    python benchmarks/fashion_mnist_table.py runs/fm/qk runs/fm/standard ... [--json table.json]
"""
import csv
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import yaml

try:
    import timm_posattn  # noqa: F401
except ModuleNotFoundError as e:  # run from a checkout without installing
    if e.name != 'timm_posattn':
        raise
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm_posattn.cli import ArgumentParser, UsageError, run_command  # noqa: E402
from timm_posattn.outputs import OutputFolder  # noqa: E402


def read_run(folder: str) -> Dict[str, Any]:
    """One row: what the run was (args.yaml) and what it measured (summary.csv)."""
    try:
        with open(os.path.join(folder, 'args.yaml'), encoding='utf-8') as f:
            args = yaml.safe_load(f)
        with open(os.path.join(folder, 'summary.csv'), newline='') as f:
            rows = list(csv.DictReader(f))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"'{folder}' is not a finished train.py run folder (args.yaml and summary.csv): {e}") from None
    if not rows or 'eval_top1' not in rows[0]:
        raise UsageError(f"'{folder}/summary.csv' has no evaluated epoch")
    kwargs = args.get('model_kwargs') or {}
    blocks = kwargs.get('pos_attn_blocks', kwargs.get('pos_attn_layers', 'all'))
    if not args['model'].startswith('vit_posattn'):
        attention = 'standard (timm ViT)'
    elif blocks == 'none':
        attention = 'standard (our twin)'
    else:
        attention = f"positional ({kwargs.get('pos_attn_layer', 'qk')})"
    top1 = [float(r['eval_top1']) for r in rows]
    return dict(run=os.path.basename(os.path.normpath(folder)), model=args['model'], attention=attention,
                seed=args.get('seed'), epochs=len(rows), final_top1=round(top1[-1], 2), best_top1=round(max(top1), 2),
                top1_per_epoch=[round(t, 2) for t in top1])


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ['| run | attention | seed | epochs | final top-1 | best top-1 |', '|---|---|--:|--:|--:|--:|']
    lines += [f"| {r['run']} | {r['attention']} | {r['seed']} | {r['epochs']} | {r['final_top1']:.2f} | "
              f"{r['best_top1']:.2f} |" for r in rows]
    return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = ArgumentParser(prog='benchmarks/fashion_mnist_table.py', description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', help='train.py run folders')
    parser.add_argument('--json', default=None, help='also write the rows to this file')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --json file')
    args = parser.parse_args(argv)
    out = None
    if args.json:
        out = OutputFolder(os.path.dirname(os.path.abspath(args.json)), [os.path.basename(args.json)],
                           overwrite=args.overwrite, command='benchmarks/fashion_mnist_table.py').check()
    rows = [read_run(folder) for folder in args.runs]
    print(markdown(rows))
    if out is not None:
        print(f"wrote {out.write_text(os.path.basename(args.json), json.dumps(rows, indent=2) + chr(10))}")
    return rows


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
