"""validate.py: every model through timm_posattn.loading, the run's own evaluation reproduced, one-line errors.

One short train.py run (tiny model, EMA on) gives a real checkpoint and summary.csv; the other checkpoints are
written with `loading.make_checkpoint`, train.py's format writer. Runs go through ``validate.run`` in-process;
one subprocess checks the real command line.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
import validate  # noqa: E402
from timm_posattn import publish  # noqa: E402
from timm_posattn.loading import make_checkpoint  # noqa: E402

ARCH = 'vit_posattn_tiny_patch4_32'
TINY_KWARGS = dict(depth=1, embed_dim=24, num_heads=2)
TINY = ['--model-kwargs', 'depth=1', 'embed_dim=24', 'num_heads=2', '-j', '0', '--log-interval', '100']
STRUCTURED_TINY = ['--train-num-samples', '64', '--val-num-samples', '96', '-b', '32', '--lr', '3e-3',
                   '--warmup-epochs', '0', '--smoothing', '0']  # a real checkpoint, not a trained model
STRUCTURED_ARGS = dict(model=ARCH, dataset='structured', num_classes=2, model_kwargs=TINY_KWARGS, mean=[0.5] * 3,
                       std=[1 / 6] * 3, crop_pct=1.0, val_split='validation', val_num_samples=64, data_seed=0)


def run_validate(capsys, *argv):
    """validate.run in-process: (exit code, stdout, stderr lines)."""
    code = validate.run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def assert_one_line_error(code, err_lines, *expected):
    assert code == 2, err_lines
    assert len(err_lines) == 1 and err_lines[0].startswith('error: '), err_lines
    for text in expected:
        assert text in err_lines[0], err_lines


@pytest.fixture(scope='module')
def structured_run(tmp_path_factory):
    """One train.py epoch on `structured` with EMA: the checkpoint and the summary.csv row the run ranked it by."""
    out = tmp_path_factory.mktemp('out')
    train.main(['--output', str(out), '--experiment', 'exp', '--epochs', '1', '--model-ema', '--model-ema-decay',
                '0.9', '--no-attention-plot', *STRUCTURED_TINY, *TINY])
    exp = out / 'exp'
    with open(exp / 'summary.csv', newline='') as f:
        (row,) = list(csv.DictReader(f))
    return exp, row


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """train.py-format checkpoints: good (with EMA), all-NaN, overflowing head, truncated, empty, other width."""
    folder = tmp_path_factory.mktemp('ckpts')
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=2, **TINY_KWARGS)
    state = model.state_dict()
    ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(make_checkpoint(ARCH, 0, state, STRUCTURED_ARGS, state_dict_ema=ema), folder / 'good.pth.tar')
    nan = {k: torch.full_like(v, float('nan')) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(make_checkpoint(ARCH, 0, nan, STRUCTURED_ARGS), folder / 'nan.pth.tar')
    huge = dict(state, **{'head.weight': torch.full_like(state['head.weight'], 3e38)})  # finite, logits overflow
    torch.save(make_checkpoint(ARCH, 0, huge, STRUCTURED_ARGS), folder / 'huge_head.pth.tar')
    data = (folder / 'good.pth.tar').read_bytes()
    (folder / 'truncated.pth.tar').write_bytes(data[:len(data) // 2])
    (folder / 'empty.pth.tar').write_bytes(b'')
    wider = timm.create_model(ARCH, num_classes=2, depth=1, embed_dim=48, num_heads=2)
    torch.save(wider.state_dict(), folder / 'wider_state_dict.pth')  # bare weights of another width
    small = timm.create_model('vit_posattn_small_patch4_32', num_classes=2, depth=1)
    torch.save(make_checkpoint('vit_posattn_small_patch4_32', 0, small.state_dict(), dict(STRUCTURED_ARGS,
               model='vit_posattn_small_patch4_32', model_kwargs={'depth': 1})), folder / 'small.pth.tar')
    return folder


def test_validate_checkpoint_on_structured(structured_run, capsys):
    exp, _ = structured_run
    code, out, err = run_validate(capsys, '--checkpoint', exp / 'model_best.pth.tar', '--num-samples', '128', '-j',
                                  '0', '--results-file', exp / 'eval.json')
    assert code == 0, err
    assert 'Top-1:' in out and 'Top-5:' in out
    results = json.loads((exp / 'eval.json').read_text())
    assert results['num_samples'] == 128 and 0.0 <= results['top1'] <= 100.0
    assert results['weights'].startswith('the EMA weights') and results['checkpoint'].endswith('model_best.pth.tar')


def test_default_reproduces_what_the_run_ranked(structured_run, capsys):
    """No options: the checkpoint's EMA weights on its own evaluation set give the run's summary.csv top-1."""
    exp, row = structured_run
    code, out, err = run_validate(capsys, '--checkpoint', exp / 'last.pth.tar', '-j', '0')
    assert code == 0, err
    assert 'Evaluating the EMA weights (state_dict_ema)' in out
    assert f"Top-1: {float(row['eval_top1']):.2f}%" in out and '96 images' in out
    code, out, err = run_validate(capsys, '--checkpoint', exp / 'last.pth.tar', '-j', '0', '--no-ema')
    assert code == 0, err
    assert 'Evaluating the plain weights (state_dict; the run ranked its EMA weights)' in out


def test_results_file_is_not_replaced_without_overwrite(checkpoints, tmp_path, capsys):
    results = tmp_path / 'results.json'
    results.write_text('mine')
    argv = ['--checkpoint', checkpoints / 'good.pth.tar', '-j', '0', '--results-file', results]
    code, out, err = run_validate(capsys, *argv)
    assert_one_line_error(code, err, 'results.json', '--overwrite')
    assert results.read_text() == 'mine' and 'Evaluating' not in out  # refused before any work
    code, out, err = run_validate(capsys, *argv, '--overwrite')
    assert code == 0, err
    saved = json.loads(results.read_text())
    assert saved['weights'].startswith('the EMA weights') and saved['num_samples'] == 64
    assert sorted(os.listdir(tmp_path)) == ['results.json']  # written atomically: no temp file left


def _image_folder(root: Path, per_class: int = 4):
    """validation/ with two colour classes."""
    gen = torch.Generator().manual_seed(0)
    for label, colour in enumerate(((220, 40, 40), (40, 40, 220))):
        folder = root / 'validation' / f'class{label}'
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = torch.randint(0, 40, (32, 32, 3), generator=gen, dtype=torch.uint8)
            img[:, :16] += torch.tensor(colour, dtype=torch.uint8)
            Image.fromarray(img.numpy()).save(folder / f'{i}.png')
    return root


def test_image_folder_checkpoint(tmp_path, capsys):
    """A standard-attention twin trained on an image folder (train.py records dataset '' and its class count)."""
    data = _image_folder(tmp_path / 'data')
    kwargs = dict(TINY_KWARGS, pos_attn_blocks='none')
    model = timm.create_model(ARCH, num_classes=2, **kwargs)
    args = dict(model=ARCH, dataset='', data_dir='/elsewhere', num_classes=2, model_kwargs=kwargs,
                val_split='validation')
    torch.save(make_checkpoint(ARCH, 0, model.state_dict(), args), tmp_path / 'last.pth.tar')
    code, out, err = run_validate(capsys, '--checkpoint', tmp_path / 'last.pth.tar', '--data-dir', data, '-j', '0')
    assert code == 0, err
    assert 'Top-1:' in out and 'on folder/validation, 8 images' in out


def test_validate_local_dir_model(tmp_path, capsys):
    """A `local-dir:` export (timm's save_for_hf layout) evaluates like a model name."""
    from timm.models import save_for_hf
    model_args = dict(TINY_KWARGS, num_classes=2)
    model = timm.create_model(ARCH, **model_args)
    save_for_hf(model, str(tmp_path / 'export'), model_args=model_args, safe_serialization=True)
    code, out, err = run_validate(capsys, '--model', f'local-dir:{tmp_path / "export"}', '--pretrained', '--dataset',
                                  'structured', '--num-samples', '64', '-j', '0', '--results-file', tmp_path / 'r.json')
    assert code == 0, err
    assert 'Top-1:' in out and 'the published weights of local-dir:' in out
    results = json.loads((tmp_path / 'r.json').read_text())
    assert results['num_samples'] == 64 and results['model'].startswith('local-dir:')


def test_tampered_published_folder_is_refused(checkpoints, tmp_path, capsys):
    """The sha256 publish records is checked: head weights changed after publishing are one line, exit 2."""
    out = tmp_path / 'published'
    publish.publish(str(checkpoints / 'good.pth.tar'), ARCH, str(out), benchmark=False)
    weights = out / 'model.safetensors'
    tensors = load_file(weights)
    tensors['head.weight'] = -tensors['head.weight']
    save_file(tensors, weights)  # a well-formed file: only the checksum tells
    code, out_text, err = run_validate(capsys, '--model', f'local-dir:{out}', '-j', '0')
    assert_one_line_error(code, err, 'sha256', 'not the one that was published')
    assert 'Top-1' not in out_text


@pytest.mark.parametrize('argv, expected', [
    (['--checkpoint', '{ckpts}/nan.pth.tar'], 'cls_token holds'),
    (['--checkpoint', '{ckpts}/huge_head.pth.tar'], 'batch 0 (images 0-63) gave non-finite outputs'),
    (['--checkpoint', '{ckpts}/truncated.pth.tar'], 'truncated, damaged'),
    (['--checkpoint', '{ckpts}/empty.pth.tar'], 'is empty'),
    (['--checkpoint', '{ckpts}/small.pth.tar', '--model', ARCH], "trained as 'vit_posattn_small_patch4_32'"),
    (['--checkpoint', '{ckpts}/wider_state_dict.pth', '--model', ARCH, '--model-kwargs', 'depth=1'],
     'size mismatch'),
    (['--checkpoint', '{ckpts}/wider_state_dict.pth'], 'does not record its architecture'),
    (['--checkpoint', '{ckpts}/missing.pth.tar'], 'not found'),
    (['--checkpoint', '{ckpts}/nan.pth.tar', '--use-ema'], 'has none'),
    (['--checkpoint', '{ckpts}/good.pth.tar', '--pretrained'], 'pass one of them'),
    (['--model', ARCH, '--no-ema'], 'is not one'),
    (['--checkpoint', '{ckpts}/good.pth.tar', '--img-size', '64'], 'takes 32x32 inputs'),
    (['--checkpoint', '{ckpts}/good.pth.tar', '--split', 'bogus'], "no split 'bogus'"),
    (['--checkpoint', '{ckpts}/good.pth.tar', '--num-classes', '3'], 'size mismatch'),
    ([], 'give --checkpoint'),
    (['-b', '0'], 'expected >= 1'),
    (['--num-samples', '0'], 'expected >= 1'),
    (['-j', '-1'], 'expected >= 0'),
    (['--img-size', '0'], 'expected >= 1'),
    (['--crop-pct', '0'], 'expected (0, 1]'),
    (['--crop-pct', '1.5'], 'expected (0, 1]'),
    (['--std', '0', '1', '1'], 'expected > 0'),
    (['--model-kwargs', 'depth'], 'key=value'),
    (['--use-ema', '--no-ema'], 'not allowed with'),
    (['--device', 'nodevice'], 'expected a device'),
])
def test_bad_input_is_one_line(checkpoints, capsys, argv, expected):
    argv = [a.replace('{ckpts}', str(checkpoints)) for a in argv]
    code, out, err = run_validate(capsys, *argv, '-j', '0')
    assert_one_line_error(code, err, expected)
    assert 'Top-1' not in out


def test_command_line_error_is_one_line(checkpoints):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / 'validate.py'), '--checkpoint',
                           str(checkpoints / 'truncated.pth.tar')], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: ') and 'Traceback' not in proc.stderr
