"""ONNX export of the reparameterized model (timm_posattn.export): A is a constant, onnxruntime agrees with PyTorch,
the command follows the error and output-folder policies. Skipped without the export extra (onnx, onnxruntime)."""
import importlib.util
import os

import pytest
import torch
import timm

import timm_posattn  # noqa: F401  (registers the models)
from timm_posattn import export

SMALL = 'vit_posattn_tiny_patch4_32'

pytestmark = pytest.mark.usefixtures('one_thread')


def _needs_onnx():
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')


def test_reparameterized_export_has_no_softmax_in_positional_blocks(tmp_path):
    _needs_onnx()
    import onnx
    torch.manual_seed(0)
    model = timm.create_model(SMALL, depth=2, pos_attn_blocks=[1], num_classes=5).eval()
    path = tmp_path / 'm.onnx'
    report = export.export_onnx(model, str(path), batch_size=2)
    assert path.is_file() and os.listdir(tmp_path) == ['m.onnx']
    assert report.positional_blocks == [1] and report.reparameterized
    assert report.checked_batch_sizes == [2, 3] and report.max_abs_diff <= 1e-4
    # the standard block keeps its softmax, the positional one has none: its A is an initializer
    assert export.softmax_blocks(onnx.load(str(path))) == {0: 1}
    assert report.softmax_blocks == {0: 1}
    assert not isinstance(model.blocks[1].attn.pos_map, timm_posattn.FixedAttentionMap)  # the model is untouched
    # as built (not reparameterized), the positional block computes its attention in the graph
    plain = export.export_onnx(model, str(tmp_path / 'plain.onnx'), reparameterize=False)
    assert plain.softmax_blocks[1] >= 1 and plain.max_abs_diff <= 1e-4


def test_export_that_fails_a_check_writes_nothing(tmp_path):
    _needs_onnx()
    model = timm.create_model(SMALL, depth=1, num_classes=5)
    with pytest.raises(export.ExportError, match='differs from PyTorch by .* atol=1e-20'):
        export.export_onnx(model, str(tmp_path / 'm.onnx'), atol=1e-20)
    assert os.listdir(tmp_path) == []  # neither the file nor a temp file
    with torch.no_grad():
        model.head.weight.fill_(float('nan'))
    with pytest.raises(export.ExportError, match='non-finite'):
        export.export_onnx(model, str(tmp_path / 'm.onnx'))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('missing', [('onnx', 'onnxruntime'), ('onnxruntime',)])
def test_missing_export_packages_are_one_clear_error(monkeypatch, missing):
    """Runs with or without the extra: the packages are hidden from the check, and only the hidden ones (or, without
    the extra, every absent one) are named."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name in missing else real(name, *a))
    absent = [name for name in export.EXPORT_PACKAGES if name in missing or real(name) is None]
    with pytest.raises(export.ExportError, match=rf'needs {", ".join(absent)}: install the export extra, .*\[export\]'):
        export.require_export_packages()


def _exit_code(argv):
    """The exit code of `python -m timm_posattn.export ARGV` (argparse exits itself, the rest goes through
    run_command)."""
    try:
        return export.run(argv)
    except SystemExit as e:
        return e.code


def test_command_writes_checks_and_refuses(tmp_path, capsys):
    _needs_onnx()
    out = tmp_path / 'tiny.onnx'
    argv = [SMALL, '--model-kwargs', 'depth=1', 'num_classes=3', '--output', str(out)]
    report = export.main(argv)
    assert out.is_file() and report.max_abs_diff <= 1e-4
    assert 'wrote' in capsys.readouterr().out
    # an existing output, a bad value, an unknown model: one line on stderr, exit code 2, nothing written
    before = out.read_bytes()
    for bad, message in ((argv, 'already holds tiny.onnx'),
                         ([SMALL, '--output', str(tmp_path / 'x.onnx'), '--batch-size', '0'], '--batch-size'),
                         (['vit_posattn_nope', '--output', str(tmp_path / 'x.onnx')], 'unknown model'),
                         ([SMALL, '--output', str(tmp_path / 'x.txt')], 'ending in .onnx')):
        assert _exit_code(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and message in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before and sorted(os.listdir(tmp_path)) == ['tiny.onnx']
    export.main(argv + ['--overwrite'])
