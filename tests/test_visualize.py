"""Attention plots of real vit_posattn_* models (every positional attention layer, reparameterized too), and the
`python -m timm_posattn.visualize` command on checkpoints, exports and bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import timm
from safetensors.torch import load_file, save_file
from timm.utils import reparameterize_model

import timm_posattn  # noqa: F401
from timm_posattn import publish
from timm_posattn.association import model_association
from timm_posattn.cli import UsageError
from timm_posattn.loading import LoadError, load_model, make_checkpoint
from timm_posattn.structured import StructuredImageDataset
from timm_posattn.visualize import resolve_query_patches, run, save_attention_plot

REPO = Path(__file__).resolve().parents[1]
ARCH = 'vit_posattn_tiny_patch4_32'
SMALL = dict(depth=2, num_classes=2)  # two blocks keep the test fast
MAIN_JOB_KWARGS = {'depth': 1, 'global_pool': 'avg', 'pos_attn_layer': 'tied'}  # what `python train.py` (the README's main job) trains


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model(ARCH, **SMALL).eval()


def _png_size(path):
    with open(path, 'rb') as f:
        header = f.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    return int.from_bytes(header[16:20], 'big'), int.from_bytes(header[20:24], 'big')


def _same_attention(a, b):
    return torch.allclose(a.get_attention_maps(), b.get_attention_maps(), atol=1e-6)


def run_main(capsys, *argv):
    """visualize.run in-process: (exit code, stdout, stderr lines)."""
    code = run([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_plot_from_module(model, tmp_path):
    path = save_attention_plot(model, str(tmp_path / 'a.png'), query_patches=[0, (3, 4)], blocks=[1])
    width, height = _png_size(path)
    heads = model.get_attention_maps().shape[1]
    assert width > 100 * heads / 2 and height > 150  # one column per head, rows for 1 block x 2 queries
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp_')]


@pytest.mark.parametrize('layer', ['qk', 'tied', 'logits'])
def test_plot_every_layer_and_its_reparameterized_model(layer, tmp_path):
    """Layers are pluggable; a reparameterized model (A baked into buffers) plots the same attention."""
    model = timm.create_model(ARCH, depth=1, num_classes=2, pos_attn_layer=layer).eval()
    baked = reparameterize_model(model)
    assert _same_attention(model, baked)
    _png_size(save_attention_plot(baked, str(tmp_path / 'baked.png'), query_patches=[(1, 2)]))


def test_plot_rejects_bad_requests(model, tmp_path):
    with pytest.raises(UsageError, match='not positional-attention blocks'):
        save_attention_plot(model, str(tmp_path / 'a.png'), blocks=[5])
    with pytest.raises(UsageError, match='query patch'):
        save_attention_plot(model, str(tmp_path / 'a.png'), query_patches=[64])
    with pytest.raises(UsageError, match='no positional-attention blocks'):
        save_attention_plot(timm.create_model(ARCH, pos_attn_blocks='none', **SMALL), str(tmp_path / 'b.png'))
    for img_size in (2, 30):  # smaller than a patch; not a multiple of the 4 px patch (the model refuses both)
        with pytest.raises(UsageError, match='expected a multiple of the patch size 4x4'):
            save_attention_plot(model, str(tmp_path / 'a.png'), img_size=img_size)
    with pytest.raises(UsageError, match='2 blocks x 12 heads would take 89,407 GiB'):  # refused before allocating
        save_attention_plot(model, str(tmp_path / 'a.png'), img_size=4000)
    with pytest.raises(UsageError, match='get_attention_maps'):
        save_attention_plot(torch.nn.Linear(2, 2), str(tmp_path / 'a.png'))
    assert not os.path.exists(tmp_path / 'a.png')


def test_non_finite_attention_is_refused(tmp_path):
    model = timm.create_model(ARCH, depth=1, num_classes=2).eval()
    with torch.no_grad():
        model.pos_embed.fill_(float('nan'))
    with pytest.raises(LoadError, match='block 0 holds NaN'):
        save_attention_plot(model, str(tmp_path / 'a.png'))
    assert not os.path.exists(tmp_path / 'a.png')


def test_resolve_query_patches():
    assert resolve_query_patches(None, (8, 8)) == [36]
    assert resolve_query_patches([(1, 2), 5], (8, 8)) == [10, 5]
    with pytest.raises(UsageError, match='inside the 8x8 grid'):
        resolve_query_patches([(8, 0)], (8, 8))


@pytest.fixture(scope='module')
def main_job_checkpoint(tmp_path_factory):
    """A train.py checkpoint of the README's main job: its model kwargs are not the architecture's defaults."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=2, **MAIN_JOB_KWARGS)
    ema = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    args = dict(model=ARCH, dataset='structured', num_classes=2, model_kwargs=MAIN_JOB_KWARGS)
    path = tmp_path_factory.mktemp('run') / 'last.pth.tar'
    torch.save(make_checkpoint(ARCH, 29, model.state_dict(), args, state_dict_ema=ema, metric=90.0), path)
    ema_model = timm.create_model(ARCH, num_classes=2, **MAIN_JOB_KWARGS)
    ema_model.load_state_dict(ema)
    return path, ema_model.eval()


def test_main_job_checkpoint_alone_is_enough(main_job_checkpoint, tmp_path, capsys):
    path, ema_model = main_job_checkpoint
    assert _same_attention(load_model(path).model, ema_model)  # EMA weights, depth=1 global_pool=avg from the checkpoint
    out = tmp_path / 'plot.png'
    code, stdout, err = run_main(capsys, path, '--out', out, '--query', '0', '7,7')
    assert code == 0, err
    assert 'Plotting the EMA weights (state_dict_ema)' in stdout and 'epoch 29' in stdout
    _png_size(out)
    before = out.read_bytes()
    code, stdout, err = run_main(capsys, path, '--out', out)  # refuses to replace an existing plot
    assert code == 2 and len(err) == 1 and '--overwrite' in err[0]
    assert out.read_bytes() == before
    code, stdout, err = run_main(capsys, path, '--out', out, '--overwrite', '--no-ema', '--query', '3')
    assert code == 0, err
    assert 'plain weights' in stdout and out.read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ['plot.png']


def test_load_from_safetensors_checkpoint(model, tmp_path, capsys):
    path = tmp_path / 'weights.safetensors'
    save_file(model.state_dict(), str(path))
    loaded = load_model(ARCH, checkpoint=path, depth=2).model
    assert loaded.num_classes == 2  # taken from the checkpoint's head
    assert _same_attention(model, loaded)
    code, _, err = run_main(capsys, path, '--out', tmp_path / 'a.png')
    assert code == 2 and len(err) == 1 and 'does not record its architecture' in err[0]


def test_load_from_local_dir(model, tmp_path, capsys):
    from timm.models import save_for_hf
    save_for_hf(model, str(tmp_path / 'export'), model_args=dict(SMALL), safe_serialization=True)
    code, stdout, err = run_main(capsys, f'local-dir:{tmp_path / "export"}', '--out', tmp_path / 'a.png')
    assert code == 0, err
    assert 'the published weights of local-dir:' in stdout
    code, _, err = run_main(capsys, f'local-dir:{tmp_path / "export"}', '--checkpoint', tmp_path / 'x.safetensors',
                            '--out', tmp_path / 'b.png')
    assert code == 2 and len(err) == 1 and 'brings its own weights' in err[0]


@pytest.fixture(scope='module')
def bad_sources(main_job_checkpoint, tmp_path_factory):
    """A tampered published folder, and all-NaN / truncated / empty / other-width checkpoints."""
    folder = tmp_path_factory.mktemp('bad')
    path, _ = main_job_checkpoint
    publish.publish(str(path), ARCH, str(folder / 'published'), benchmark=False)
    weights = folder / 'published' / 'model.safetensors'
    tensors = load_file(weights)
    tensors['head.weight'] = -tensors['head.weight']
    save_file(tensors, weights)  # well-formed; only the recorded sha256 tells
    ckpt = torch.load(path, weights_only=True)
    nan = {k: torch.full_like(v, float('nan')) if v.is_floating_point() else v for k, v in ckpt['state_dict'].items()}
    torch.save(dict(ckpt, state_dict=nan, state_dict_ema=nan), folder / 'nan.pth.tar')
    data = path.read_bytes()
    (folder / 'truncated.pth.tar').write_bytes(data[:len(data) // 3])
    (folder / 'empty.pth.tar').write_bytes(b'')
    wide = timm.create_model(ARCH, num_classes=2, depth=1, embed_dim=48, num_heads=2)
    torch.save(wide.state_dict(), folder / 'wide.pth')
    return folder


@pytest.mark.parametrize('argv, expected', [
    (['local-dir:{bad}/published'], 'sha256'),
    (['{bad}/nan.pth.tar'], 'holds 192 non-finite value(s)'),
    (['{bad}/truncated.pth.tar'], 'truncated, damaged'),
    (['{bad}/empty.pth.tar'], 'is empty'),
    ([ARCH, '--checkpoint', '{bad}/wide.pth', '--model-kwargs', 'depth=1'], 'size mismatch'),
    (['{bad}/missing.pth.tar'], 'not found'),
    ([ARCH, '--use-ema'], 'is not one'),
    ([ARCH, '--query', 'x'], 'expected a patch index'),
    ([ARCH, '--img-size', '0'], 'expected >= 1'),
    ([ARCH, '--blocks', '-1'], 'expected >= 0'),
    ([ARCH, '--model-kwargs', 'depth'], 'key=value'),
    (['resnet18'], 'get_attention_maps'),
])
def test_bad_input_is_one_line(bad_sources, tmp_path, capsys, argv, expected):
    argv = [a.replace('{bad}', str(bad_sources)) for a in argv]
    code, _, err = run_main(capsys, *argv, '--out', tmp_path / 'a.png')
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith('error: ') and expected in err[0], err
    assert not (tmp_path / 'a.png').exists()


def test_command_line_error_is_one_line(bad_sources, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-m', 'timm_posattn.visualize', str(bad_sources / 'nan.pth.tar'), '--out',
                           str(tmp_path / 'a.png')], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count('\n') == 1 and proc.stderr.startswith('error: ') and 'Traceback' not in proc.stderr
    assert not (tmp_path / 'a.png').exists()


def test_model_association_on_real_model(model):
    """A freshly initialised model attends almost uniformly, so its association sits at chance."""
    partition = StructuredImageDataset('validation', num_samples=1).partition
    m = model_association(model, partition)
    assert m['association'] == pytest.approx(m['chance'], abs=0.05)
    assert set(m) >= {'association', 'set_purity', 'partition_ari', 'chance'}
