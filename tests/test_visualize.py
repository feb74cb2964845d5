"""Attention plots of real vit_posattn_* models from a module, a name, checkpoints and a local-dir export."""
import os

import pytest
import torch
import timm
from safetensors.torch import save_file

import timm_posattn  # noqa: F401
from timm_posattn.association import model_association
from timm_posattn.structured import StructuredImageDataset
from timm_posattn.visualize import load_model, main, resolve_query_patches, save_attention_plot

ARCH = 'vit_posattn_tiny_patch4_32'
SMALL = dict(depth=2, num_classes=2)  # two blocks keep the test fast


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model(ARCH, **SMALL).eval()


def _png_size(path):
    with open(path, 'rb') as f:
        header = f.read(24)
    assert header[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
    return int.from_bytes(header[16:20], 'big'), int.from_bytes(header[20:24], 'big')


def test_plot_from_module(model, tmp_path):
    path = save_attention_plot(model, str(tmp_path / 'a.png'), query_patches=[0, (3, 4)], blocks=[1])
    width, height = _png_size(path)
    heads = model.get_attention_maps().shape[1]
    assert width > 100 * heads / 2 and height > 150  # one column per head, rows for 1 block x 2 queries
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp_')]


def test_plot_rejects_bad_requests(model, tmp_path):
    with pytest.raises(ValueError, match='not positional-attention blocks'):
        save_attention_plot(model, str(tmp_path / 'a.png'), blocks=[5])
    with pytest.raises(ValueError, match='query patch'):
        save_attention_plot(model, str(tmp_path / 'a.png'), query_patches=[64])
    with pytest.raises(ValueError, match='no positional-attention blocks'):
        save_attention_plot(timm.create_model(ARCH, pos_attn_layers='none', **SMALL), str(tmp_path / 'b.png'))
    assert not os.path.exists(tmp_path / 'a.png')


def test_resolve_query_patches():
    assert resolve_query_patches(None, (8, 8)) == [36]
    assert resolve_query_patches([(1, 2), 5], (8, 8)) == [10, 5]
    with pytest.raises(ValueError, match='inside the 8x8 grid'):
        resolve_query_patches([(8, 0)], (8, 8))


def _same_attention(a, b):
    return torch.allclose(a.get_attention_maps(), b.get_attention_maps(), atol=1e-6)


def test_load_from_safetensors_checkpoint(model, tmp_path):
    path = str(tmp_path / 'weights.safetensors')
    save_file(model.state_dict(), path)
    loaded = load_model(ARCH, checkpoint=path, depth=2)
    assert loaded.num_classes == 2  # taken from the checkpoint's head
    assert _same_attention(model, loaded)
    with pytest.raises(ValueError, match='does not record its architecture'):
        load_model(path)


def test_load_from_train_checkpoint_by_path(model, tmp_path):
    """A train.py-style checkpoint (plain-typed args) names its arch, so the path alone is enough."""
    path = str(tmp_path / 'last.pth.tar')
    torch.save({'epoch': 3, 'arch': ARCH, 'state_dict': model.state_dict(), 'args': {'model': ARCH}}, path)
    loaded = load_model(path, depth=2)
    assert _same_attention(model, loaded)
    out = str(tmp_path / 'plot.png')
    assert main([path, '--out', out, '--model-kwargs', 'depth=2', '--query', '0', '7,7']) == out
    _png_size(out)
    with pytest.raises(SystemExit):  # refuses to replace an existing plot
        main([path, '--out', out, '--model-kwargs', 'depth=2'])


def test_load_from_local_dir(model, tmp_path):
    from timm.models import save_for_hf
    save_for_hf(model, str(tmp_path / 'export'), model_args=dict(SMALL), safe_serialization=True)
    loaded = load_model(f'local-dir:{tmp_path / "export"}')
    assert _same_attention(model, loaded)
    with pytest.raises(ValueError, match='brings its own weights'):
        load_model(f'local-dir:{tmp_path / "export"}', checkpoint='x.safetensors')


def test_model_association_on_real_model(model):
    """A freshly initialised model attends almost uniformly, so its association sits at chance."""
    partition = StructuredImageDataset('validation', num_samples=1).partition
    m = model_association(model, partition)
    assert m['association'] == pytest.approx(m['chance'], abs=0.05)
    assert set(m) >= {'association', 'set_purity', 'partition_ari', 'chance'}
