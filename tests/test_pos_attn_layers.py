"""Positional attention layers: the registry, each shipped variant, a variant written here, and reparameterization."""
import copy
import logging
import math
import warnings
from typing import Tuple

import pytest
import torch
import torch.nn as nn
import timm
from timm.utils import reparameterize_model

import timm_posattn  # noqa: F401  (registers the models)
from timm_posattn.layers import (
    FixedAttentionMap, LogitsAttentionMap, PositionalAttentionMap, QKAttentionMap, TiedAttentionMap,
    get_pos_attn_layer, list_pos_attn_layers, register_pos_attn_layer, resample_logit_table)

SMALL = 'vit_posattn_tiny_patch4_32'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class CosineAttentionMap(PositionalAttentionMap):
    """A variant that exists only in this test: logits = per-head temperature x cosine similarity of LN(P)·W rows.

    The class and its registration line are all it takes; nothing else in the package knows about it.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], bias: bool = False, device=None,
                 dtype=None, **kwargs):
        super().__init__(dim, num_heads, grid_size, bias=bias, device=device, dtype=dtype, **kwargs)  # and self.norm
        self.w = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.temperature = nn.Parameter(torch.full((num_heads, 1, 1), 4.0, device=device, dtype=dtype))

    def logits(self, pos: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
        N = pos.shape[-2]
        q = self.w(self.norm(pos)).reshape(N, self.num_heads, self.head_dim).transpose(0, 1)
        q = torch.nn.functional.normalize(q, dim=-1)
        return self.temperature * (q @ q.transpose(-2, -1))


register_pos_attn_layer('cosine_test')(CosineAttentionMap)


def _model(layer, **kwargs):
    return timm.create_model(SMALL, **{'depth': 2, 'num_classes': 3, 'pos_attn_layer': layer, **kwargs})


def test_registry_names_and_errors():
    assert {'qk', 'tied', 'logits', 'cosine_test'} <= set(list_pos_attn_layers())
    assert get_pos_attn_layer('tied') is TiedAttentionMap and get_pos_attn_layer(QKAttentionMap) is QKAttentionMap
    with pytest.raises(ValueError, match=r"pos_attn_layer must be one of \[.*'logits'.*\] or a PositionalAttentionMap subclass, got 'qkv'"):
        _model('qkv')
    with pytest.raises(TypeError, match='must subclass PositionalAttentionMap'):
        register_pos_attn_layer('bad')(nn.Linear)
    with pytest.raises(ValueError, match='already registered'):
        register_pos_attn_layer('qk')(TiedAttentionMap)


@pytest.mark.parametrize('layer', ['qk', 'tied', 'logits', 'cosine_test', CosineAttentionMap])
def test_every_layer_gives_the_whole_model_contract(layer, tmp_path):
    """Train step, attention maps, TorchScript, FX, a checkpoint round trip and reparameterization, per layer."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model = _model(layer)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters()), 'unused parameters'
    maps = model.get_attention_maps()
    assert maps.shape == (2, 12, 65, 65)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 12, 65))
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        ref = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), ref)
        torch.testing.assert_close(create_feature_extractor(model, {'head': 'out'})(x)['out'], ref)
    # a checkpoint of this model loads back through timm's pretrained path (checkpoint_filter_fn)
    from safetensors.torch import save_file
    path = tmp_path / 'w.safetensors'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = _model(layer, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)
        fused = reparameterize_model(model)
        torch.testing.assert_close(fused(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(fused.get_attention_maps(), maps)


def test_reparameterize_bakes_attention_and_drops_its_parameters():
    model = _model('qk').eval()
    x = torch.randn(3, 3, 32, 32)
    fused = reparameterize_model(model)  # a deep copy: the model itself is unchanged
    assert isinstance(model.blocks[0].attn.pos_map, QKAttentionMap)
    assert all(isinstance(b.attn.pos_map, FixedAttentionMap) for b in fused.blocks)
    keys = set(fused.state_dict())
    assert {'blocks.0.attn.pos_map.attn', 'blocks.1.attn.pos_map.attn'} <= keys
    assert not any('pos_map.qk' in k or 'pos_map.norm' in k for k in keys)
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    # the copy's layers compute from the copy's table, not the original's
    assert fused.blocks[0].attn.pos_source.__self__ is fused
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
        fused.to(torch.bfloat16)
        assert fused.blocks[0].attn.pos_map.attn.dtype == torch.bfloat16  # stored in the compute dtype
        fused.to(torch.float32)
    # a reparameterized model serves its own grid only, and says so
    dyn = reparameterize_model(_model('qk', dynamic_img_size=True).eval())
    with pytest.raises(AssertionError, match='reparameterized'):
        dyn(torch.randn(1, 3, 48, 48))
    with pytest.raises(AssertionError, match='reparameterized'):
        dyn.get_attention_maps(img_size=48)
    with pytest.raises(ValueError, match='reparameterized for a 8x8 patch grid'):
        dyn.set_input_size(img_size=(48, 48))
    # its state dict reloads into a reparameterized model, and is refused (one clear line) by an unfused one
    again = reparameterize_model(_model('qk').eval())
    again.load_state_dict(fused.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='Unexpected key.*pos_map.attn'):
        _model('qk').load_state_dict(fused.state_dict())


def test_reparameterized_model_exports_without_softmax():
    """Traced for export, the baked model has no softmax: A is a constant."""
    fused = reparameterize_model(_model('tied').eval())
    gm = torch.fx.symbolic_trace(fused)
    assert not any('softmax' in str(n.target) for n in gm.graph.nodes)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), fused(x))


def test_tied_logits_are_symmetric_and_positive_semidefinite():
    layer = TiedAttentionMap(48, num_heads=4, grid_size=(4, 4), bias=True)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.5)
    pos = torch.randn(1, 17, 48)
    logits = layer.logits(pos, (4, 4)).double()
    torch.testing.assert_close(logits, logits.transpose(-1, -2), rtol=0, atol=1e-5)
    eig = torch.linalg.eigvalsh((logits + logits.transpose(-1, -2)) / 2)
    assert eig.min() > -1e-4 * eig.abs().max(), eig.min()
    # the untied layer is neither, in general: the test above can fail
    qk = QKAttentionMap(48, num_heads=4, grid_size=(4, 4))
    nn.init.normal_(qk.qk.weight, std=0.5)
    untied = qk.logits(pos, (4, 4))
    assert not torch.allclose(untied, untied.transpose(-1, -2), atol=1e-3)


def test_tied_has_half_the_positional_parameters():
    def positional(model):
        return sum(p.numel() for n, p in model.named_parameters() if '.pos_map.' in n and '.norm.' not in n)
    assert 2 * positional(_model('tied')) == positional(_model('qk'))


def test_qk_checkpoint_loads_into_tied_and_tied_into_qk(tmp_path, caplog):
    from safetensors.torch import save_file
    qk = _model('qk')
    path = tmp_path / 'qk.safetensors'
    save_file({k: v.contiguous() for k, v in qk.state_dict().items()}, str(path))
    with caplog.at_level(logging.INFO, logger='timm_posattn.layers'):
        tied = _model('tied', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    assert 'the query half of a qk checkpoint' in caplog.text
    torch.testing.assert_close(tied.blocks[1].attn.pos_map.w.weight, qk.blocks[1].attn.pos_map.qk.weight[:192])
    torch.testing.assert_close(tied.blocks[1].attn.pos_map.norm.weight, qk.blocks[1].attn.pos_map.norm.weight)
    # tied is the special case Wq = Wk of qk: that conversion is exact
    path = tmp_path / 'tied.safetensors'
    save_file({k: v.contiguous() for k, v in tied.state_dict().items()}, str(path))
    back = _model('qk', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
    torch.testing.assert_close(back.get_attention_maps(), tied.get_attention_maps())


def test_standard_vit_checkpoint_into_every_layer(tmp_path, caplog):
    from safetensors.torch import save_file
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=3)
    path = tmp_path / 'vit.safetensors'
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    for layer in ('qk', 'tied', 'logits', 'cosine_test'):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger='timm_posattn.vit_posattn'):
            model = timm.create_model('vit_posattn_tiny_patch16_224', img_size=32, patch_size=4, depth=2,
                                      num_classes=3, pos_attn_layer=layer, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(path), num_classes=3))
        torch.testing.assert_close(model.blocks[1].attn.v.weight, vit.blocks[1].attn.qkv.weight[2 * 192:])
        assert 'Freshly initialized' in caplog.text and 'blocks.1.attn.pos_map.' in caplog.text


def test_version_0_1_checkpoint_names_load(tmp_path):
    """timm_posattn 0.1 kept the positional Q/K and norm on the attention module (`attn.qk`, `attn.pos_norm`)."""
    from safetensors.torch import save_file
    model = _model('qk')
    old = {k.replace('attn.pos_map.qk.', 'attn.qk.').replace('attn.pos_map.norm.', 'attn.pos_norm.'): v.contiguous()
           for k, v in model.state_dict().items()}
    assert 'blocks.0.attn.qk.weight' in old
    save_file(old, str(tmp_path / 'old.safetensors'))
    loaded = _model('qk', pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'old.safetensors'),
                                                                        num_classes=3))
    torch.testing.assert_close(loaded.get_attention_maps(), model.get_attention_maps())


def test_logit_table_follows_the_resolution(tmp_path):
    model = _model('logits', dynamic_img_size=True).eval()
    table = model.blocks[0].attn.pos_map.table
    assert table.shape == (12, 65, 65)
    assert 'blocks.0.attn.pos_map.table' in model.no_weight_decay()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 3)
    maps = model.get_attention_maps(img_size=(48, 40))
    assert maps.shape == (2, 12, 1 + 12 * 10, 1 + 12 * 10)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 12, 121))
    # resampling to the same grid is the identity; a constant table stays constant at any grid
    assert resample_logit_table(table, (8, 8), (8, 8)) is table
    const = torch.full((2, 17, 17), 0.7)
    torch.testing.assert_close(resample_logit_table(const, (6, 6), (4, 4)), torch.full((2, 37, 37), 0.7))
    # set_input_size resamples the parameter for good; a checkpoint of the other grid is resampled on load
    model.set_input_size(img_size=(48, 48))
    assert model.blocks[0].attn.pos_map.table.shape == (12, 145, 145)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / 'w48.safetensors'))
    small = _model('logits', pretrained=True,
                   pretrained_cfg_overlay=dict(file=str(tmp_path / 'w48.safetensors'), num_classes=3))
    assert small.blocks[0].attn.pos_map.table.shape == (12, 65, 65)


@pytest.mark.parametrize('layer', ['qk', 'tied', 'logits'])
def test_local_init_of_every_shipped_layer(layer):
    n = 65
    beta = 2.0
    maps = _model(layer, pos_attn_init='local', pos_attn_init_scale=beta).get_attention_maps()
    diag = maps.diagonal(dim1=-2, dim2=-1).mean().item()
    expected = math.exp(beta) / (math.exp(beta) + n - 1)
    assert abs(diag - expected) < 0.3 * expected, (layer, diag, expected)
    # the default init starts near uniform; a Gram matrix has a positive diagonal, so tied leans a little to itself
    uniform = _model(layer).get_attention_maps().diagonal(dim1=-2, dim2=-1).mean().item()
    assert abs(uniform - 1 / n) < (0.5 if layer == 'tied' else 0.2) / n, uniform
    with pytest.raises(NotImplementedError, match='CosineAttentionMap has no local init'):
        _model('cosine_test', pos_attn_init='local')


def test_img_size_must_be_a_multiple_of_the_patch_size():
    with pytest.raises(ValueError, match=r'img_size \(33, 33\) is not divisible by patch_size \(4, 4\)'):
        timm.create_model(SMALL, img_size=33)
    model = timm.create_model(SMALL, img_size=33, dynamic_img_size=True, dynamic_img_pad=True, depth=1)
    assert model(torch.randn(1, 3, 33, 33)).shape == (1, 10)  # padding asked for: accepted
    with pytest.raises(ValueError, match='dynamic_img_pad needs dynamic_img_size'):
        timm.create_model(SMALL, img_size=33, dynamic_img_pad=True)
    with pytest.raises(ValueError, match='not divisible'):
        timm.create_model(SMALL, depth=1).set_input_size(img_size=(30, 32))


def test_deep_copy_and_pickle_keep_layers_bound_to_their_own_model(tmp_path):
    model = _model('qk')
    ema = copy.deepcopy(model)
    assert ema.blocks[1].attn.pos_source.__self__ is ema
    torch.save(model, tmp_path / 'whole.pt')  # whole-module pickling (a user's choice) still works
    loaded = torch.load(tmp_path / 'whole.pt', weights_only=False)
    assert loaded.blocks[0].attn.pos_source.__self__ is loaded


@pytest.mark.parametrize('layer', ['qk', 'tied', 'logits'])
def test_checkpoint_says_which_layer_it_holds(layer, tmp_path):
    """A train.py checkpoint whose recorded kwargs do not name the layer (e.g. written before a default changed) is
    rebuilt with the layer its weights belong to."""
    from timm_posattn import loading
    from timm_posattn.layers import infer_pos_attn_layer
    model = _model(layer)
    assert infer_pos_attn_layer(model.state_dict()) == layer
    assert infer_pos_attn_layer(timm.create_model('vit_tiny_patch16_224', depth=1).state_dict()) is None
    path = tmp_path / 'ckpt.pth.tar'
    torch.save(loading.make_checkpoint(SMALL, 0, model.state_dict(), args={'model_kwargs': {'depth': 2}}), path)
    loaded = loading.load_model(str(path)).model
    assert type(loaded.blocks[0].attn.pos_map) is type(model.blocks[0].attn.pos_map)
    torch.testing.assert_close(loaded.get_attention_maps(), model.get_attention_maps())
