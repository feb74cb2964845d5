"""Export a model to ONNX for inference, reparameterized: every positional block's attention A is a constant.

    python -m timm_posattn.export vit_posattn_small_patch4_32 --checkpoint output/train/.../model_best.pth.tar \\
        --output model.onnx
    python -m timm_posattn.export hf-hub:timm-posattn/vit_posattn_small_patch4_32.cifar10 --output cifar10.onnx

`timm.utils.reparameterize_model` bakes each block's A into a buffer, then timm's `timm.utils.onnx.onnx_export` writes
the graph (TorchScript exporter; `--dynamo` for the torch.export one), with a dynamic batch axis. The file is kept
only if it passes three checks: the ONNX checker, no Softmax node in any positional block (A is a stored constant, not
computed), and onnxruntime's output equal to PyTorch's within `--atol` (default 1e-4) at the export batch and at one
more image. Needs the export extra: `pip install -e ".[export]"` (onnx, onnxruntime, onnxscript).
"""
import os
import re
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.utils import ParseKwargs, reparameterize_model

from .cli import ArgumentParser, UsageError, float_range, int_range, run_command
from .files import move_into_place, temp_prefix
from .layers import PositionalBlock
from .loading import load_model
from .outputs import OutputFolder

__all__ = ['ExportError', 'ExportReport', 'export_onnx', 'softmax_blocks', 'main']

EXPORT_PACKAGES = ('onnx', 'onnxruntime')
_BLOCK = re.compile(r"(?:^|[/'])blocks\.(\d+)(?=[/.']|$)")


class ExportError(UsageError):
    """The export cannot be done as asked (missing packages, a bad input), or its result failed a check."""


@dataclass
class ExportReport:
    """What `export_onnx` wrote and what its checks found."""
    path: str
    batch_size: int
    input_size: List[int]
    opset: Optional[int]
    dynamo: bool
    reparameterized: bool
    positional_blocks: List[int]
    softmax_blocks: Dict[int, int]  # block index -> Softmax nodes in it (standard blocks only, after the check)
    max_abs_diff: float
    checked_batch_sizes: List[int] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def require_export_packages(packages: Sequence[str] = EXPORT_PACKAGES) -> None:
    """One clear line when the optional export packages are missing."""
    import importlib.util
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f'ONNX export needs {", ".join(missing)}: install the export extra, '
                          f'pip install "timm_posattn[export]" (or pip install -e ".[export]" in a checkout)')


def _node_block(node: Any) -> Optional[int]:
    """The `blocks.<i>` module a node was exported from: TorchScript names nodes by module path, the dynamo exporter
    records the module scopes in the node's metadata."""
    texts = [node.name] + [p.value for p in node.metadata_props if p.key == 'pkg.torch.onnx.name_scopes']
    for text in texts:
        match = _BLOCK.search(text)
        if match:
            return int(match.group(1))
    return None


def softmax_blocks(onnx_model: Any) -> Dict[Optional[int], int]:
    """Softmax nodes of an ONNX graph per `blocks.<i>` (None: not attributable to a block)."""
    counts: Dict[Optional[int], int] = {}
    for node in onnx_model.graph.node:
        if node.op_type == 'Softmax':
            block = _node_block(node)
            counts[block] = counts.get(block, 0) + 1
    return counts


def _positional_block_indices(model: nn.Module) -> List[int]:
    return [i for i, blk in enumerate(getattr(model, 'blocks', [])) if isinstance(blk, PositionalBlock)]


def _input_size(model: nn.Module) -> List[int]:
    patch_embed = getattr(model, 'patch_embed', None)
    if patch_embed is not None and getattr(patch_embed, 'img_size', None) is not None:
        return [patch_embed.proj.in_channels, *patch_embed.img_size]
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    if 'input_size' not in cfg:
        raise ExportError(f'cannot tell the input size of {type(model).__name__}: it has no patch_embed.img_size '
                          f'nor a pretrained_cfg input_size')
    return list(cfg['input_size'])


def _onnxruntime_output(path: str, x: torch.Tensor, threads: Optional[int] = None) -> torch.Tensor:
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def export_onnx(
        model: nn.Module,
        output_file: str,
        batch_size: int = 1,
        opset: Optional[int] = None,
        dynamo: bool = False,
        reparameterize: bool = True,
        atol: float = 1e-4,
        seed: int = 0,
        overwrite: bool = True,
) -> ExportReport:
    """Export `model` (not modified) to `output_file`, checked; the file is written only if every check passes
    (`overwrite=False`: and only if it does not exist, even if another process creates it meanwhile).

    The model is reparameterized first (a copy; `reparameterize=False` exports it as it is, positional attention
    computed in the graph). The checks: `onnx.checker`, no Softmax in a positional block (when reparameterized),
    finite PyTorch output, and onnxruntime's output within `atol` of PyTorch's at `batch_size` and `batch_size + 1`
    images (the batch axis is dynamic).
    """
    require_export_packages()
    import onnx
    from timm.utils.onnx import onnx_export

    if batch_size < 1:
        raise ExportError(f'batch_size must be >= 1, got {batch_size}')
    model = reparameterize_model(model.eval()) if reparameterize else model.eval()
    positional = _positional_block_indices(model)
    input_size = _input_size(model)
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(b, *input_size, generator=generator) for b in (batch_size, batch_size + 1)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    if not all(torch.isfinite(out).all() for out in expected):
        raise ExportError('the model gives non-finite outputs (NaN or inf) for a random input: its weights are '
                          'broken; nothing was exported')

    directory = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=temp_prefix('export'), suffix='.onnx')
    os.close(fd)
    try:
        try:
            with warnings.catch_warnings():  # the tracer's notes on shape asserts: the grid is fixed by design
                warnings.simplefilter('ignore', torch.jit.TracerWarning)
                onnx_export(model, tmp, example_input=inputs[0], opset=opset, use_dynamo=dynamo, check=True)
        except (RuntimeError, ValueError, UnicodeError, torch.onnx.errors.OnnxExporterError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]  # torch may append every weight
            raise ExportError(f'the ONNX exporter failed{f" at opset {opset}" if opset else ""}: {first}'
                              f'{"; try another --opset" if opset else ""}') from None
        onnx_model = onnx.load(tmp)
        softmax = softmax_blocks(onnx_model)
        in_positional = {b: n for b, n in softmax.items() if b in positional}
        if reparameterize and (in_positional or (positional and None in softmax)):
            raise ExportError(f'the exported graph computes attention in positional blocks (Softmax nodes per '
                              f'block: {softmax}); expected A as a constant')
        diff = 0.0
        for x, out in zip(inputs, expected):
            ort_out = _onnxruntime_output(tmp, x)
            if ort_out.shape != out.shape:
                raise ExportError(f'onnxruntime output has shape {tuple(ort_out.shape)} for a batch of {x.shape[0]}, '
                                  f'PyTorch {tuple(out.shape)}')
            diff = max(diff, (ort_out - out.float()).abs().max().item())
        if not diff <= atol:
            raise ExportError(f'onnxruntime output differs from PyTorch by {diff:.3g} (max abs), more than '
                              f'atol={atol:g}; the exported file was not kept')
        try:
            move_into_place(tmp, output_file, replace=overwrite)
        except FileExistsError:
            raise ExportError(f"'{output_file}' appeared during the export (another process?); pass --overwrite to "
                              f"replace it") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return ExportReport(
        path=output_file,
        batch_size=batch_size,
        input_size=input_size,
        opset=opset,
        dynamo=dynamo,
        reparameterized=reparameterize,
        positional_blocks=positional,
        softmax_blocks={b: n for b, n in softmax.items() if b is not None},
        max_abs_diff=diff,
        checked_batch_sizes=[x.shape[0] for x in inputs],
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog='python -m timm_posattn.export',
        description='Export a model to ONNX, reparameterized (positional attention as constants), and check it '
                    'against PyTorch with onnxruntime.')
    parser.add_argument('model', help='timm model name, train.py checkpoint path, hf-hub:ORG/NAME or local-dir:PATH')
    parser.add_argument('--output', '-o', required=True, help='the .onnx file to write')
    parser.add_argument('--checkpoint', default=None, help='weights for a model name (train.py checkpoint or '
                                                           'safetensors)')
    parser.add_argument('--pretrained', action='store_true', help='load the published weights of a model name')
    parser.add_argument('--batch-size', type=int_range(1), default=1,
                        help='batch of the example input (the exported batch axis is dynamic; default 1)')
    parser.add_argument('--opset', type=int_range(7), default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--dynamo', action='store_true', help='use the torch.export based exporter (needs onnxscript)')
    parser.add_argument('--no-reparameterize', action='store_true',
                        help='export the model as it is (attention computed in the graph)')
    parser.add_argument('--atol', type=float_range(0, low_open=True), default=1e-4,
                        help='largest accepted |onnxruntime - PyTorch| (default 1e-4)')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='model kwargs, e.g. img_size=384 (timm resamples published weights to it)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing --output file')
    return parser


def supported_opsets(dynamo: bool) -> Tuple[int, int]:
    """The opsets the installed torch's exporter writes (TorchScript, or the torch.export based one)."""
    try:
        from torch.onnx import _constants  # where torch keeps them; not public, hence the fallback
        low, high = _constants.ONNX_MIN_OPSET, _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
        return (18, _constants.ONNX_MAX_OPSET) if dynamo else (low, high)
    except (ImportError, AttributeError):
        return (18, 18) if dynamo else (7, 17)


def main(argv: Optional[Sequence[str]] = None) -> ExportReport:
    args = build_parser().parse_args(argv)
    if not args.output.endswith('.onnx'):
        raise UsageError(f"--output {args.output!r}: expected a file name ending in .onnx")
    try:
        os.fsencode(args.output).decode('utf-8')
    except UnicodeDecodeError:
        raise UsageError(f'--output {args.output!r} is not a UTF-8 path, and the ONNX exporter writes to UTF-8 paths '
                         f'only: choose another name') from None
    if args.opset is not None:
        low, high = supported_opsets(args.dynamo)
        if not low <= args.opset <= high:
            raise UsageError(f'--opset {args.opset}: the {"torch.export based" if args.dynamo else "TorchScript"} '
                             f'exporter of torch {torch.__version__} writes opsets {low} to {high}')
    folder = OutputFolder(os.path.dirname(os.path.abspath(args.output)), [os.path.basename(args.output)],
                          overwrite=args.overwrite, command='timm_posattn.export')
    folder.check()  # refuse before any work
    require_export_packages(EXPORT_PACKAGES + (('onnxscript',) if args.dynamo else ()))
    try:
        model = load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained or None,
                           **args.model_kwargs).model
    except (TypeError, ValueError) as e:  # a model kwarg the architecture refuses (LoadErrors pass through)
        if isinstance(e, UsageError):
            raise
        raise UsageError(f'cannot build {args.model}: {e}') from e
    report = export_onnx(model, args.output, batch_size=args.batch_size, opset=args.opset, dynamo=args.dynamo,
                         reparameterize=not args.no_reparameterize, atol=args.atol, overwrite=args.overwrite)
    kind = 'reparameterized' if report.reparameterized else 'as built'
    print(f'wrote {report.path}: {kind}, input {report.input_size}, batch axis dynamic (checked at '
          f'{report.checked_batch_sizes}), positional blocks {len(report.positional_blocks)} without Softmax, '
          f'max |onnxruntime - PyTorch| = {report.max_abs_diff:.2e}')
    return report


def run(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit code (2 and one line on stderr for an error the user can fix)."""
    return run_command(lambda: main(argv), argv)


if __name__ == '__main__':
    sys.exit(run())
