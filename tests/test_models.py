"""The model family and the timm contract: every registered name, positional attention itself, and bad input."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F
import timm
from safetensors.torch import save_file

import timm_posattn  # noqa: F401  (registers the models)
from timm_posattn.layers import PositionalAttention, PositionalBlock, apply_positional_attention
from timm_posattn.lean_attention import positional_attention_proj
from timm_posattn.vit_posattn import StandardBlock

FULL_NAMES = [
    'vit_posattn_tiny_patch16_224', 'vit_posattn_small_patch16_224', 'vit_posattn_base_patch16_224',
    'vit_posattn_small_patch4_32', 'vit_posattn_tiny_patch4_32',
]
SHORT_NAMES = {'vit_posattn_tiny': 'vit_posattn_tiny_patch16_224', 'vit_posattn_small': 'vit_posattn_small_patch16_224',
               'vit_posattn_base': 'vit_posattn_base_patch16_224'}
SMALL = 'vit_posattn_tiny_patch4_32'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small(**kwargs):
    """The quick CPU model, made smaller still where a test only needs the mechanics."""
    return timm.create_model(SMALL, **{'depth': 3, 'num_classes': 5, **kwargs})


def _collect_block_attention(model, x):
    """The attention matrix each positional block uses during a forward, seen by a hook on its map: the plain ops'
    forward (the lean operators build A inside, head by head, where no hook sees it; the operators' tests check that
    they compute what the plain ops compute)."""
    seen = []
    blocks = [blk for blk in model.blocks if isinstance(blk, PositionalBlock)]
    hooks = [blk.attn.pos_map.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
             for blk in blocks]
    for blk in blocks:
        blk.attn.lean = False
    try:
        model(x)
    finally:
        for blk, h in zip(blocks, hooks):
            blk.attn.lean = True
            h.remove()
    return seen


def test_list_models_has_every_name():
    assert set(FULL_NAMES) | set(SHORT_NAMES) == set(timm.list_models('vit_posattn*'))


@pytest.mark.parametrize('name', FULL_NAMES)
def test_every_model_builds_and_trains(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg['input_size'])
    out = model(x)
    assert out.shape == (1, model.num_classes)
    out.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), 'unused parameters'
    assert torch.isfinite(model.pos_embed.grad).all() and model.pos_embed.grad.abs().sum() > 0


def test_paper_small_image_model_shape():
    model = timm.create_model('vit_posattn_small_patch4_32')
    assert len(model.blocks) == 7 and model.embed_dim == 384 and model.pos_attn_indices == list(range(7))
    assert model.blocks[0].attn.num_heads == 12 and model.blocks[0].mlp.fc1.out_features == 384
    assert model.patch_embed.grid_size == (8, 8)
    assert 6.0e6 < sum(p.numel() for p in model.parameters()) < 6.6e6


@pytest.mark.parametrize('short', sorted(SHORT_NAMES))
def test_short_names_build_the_full_variant(short):
    model, full = timm.create_model(short, device='meta'), timm.create_model(SHORT_NAMES[short], device='meta')
    assert model.pretrained_cfg['architecture'] == SHORT_NAMES[short]
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in full.named_parameters()]


def test_pretrained_tags_have_data_config():
    cfg = timm.get_pretrained_cfg('vit_posattn_small_patch4_32.cifar100').to_dict()
    assert cfg['num_classes'] == 100 and cfg['input_size'] == (3, 32, 32) and cfg['paper_ids'] == 'arXiv:2210.09221'
    for name in ('vit_posattn_small_patch4_32.svhn', 'vit_posattn_tiny_patch16_224.in1k'):
        cfg = timm.get_pretrained_cfg(name).to_dict()
        assert cfg['mean'] and cfg['std'] and cfg['crop_pct'] and cfg['license']


def test_fashion_mnist_tag_builds_the_one_channel_28px_model_that_takes_its_weights(tmp_path):
    """timm applies the tag's cfg (fixed_input_size): in_chans 1, img_size 28 and 10 classes come from it, and
    pretrained=True loads a weights file of that shape (here a 1-block model, kwargs as for any tag)."""
    cfg = timm.get_pretrained_cfg('vit_posattn_tiny_patch4_32.fashion_mnist').to_dict()
    assert cfg['input_size'] == (1, 28, 28) and cfg['num_classes'] == 10 and cfg['crop_pct'] == 1.0
    assert (cfg['mean'], cfg['std']) == ((0.2860,), (0.3530,)) and cfg['label_names'][0] == 'T-shirt/top'
    trained = timm.create_model('vit_posattn_tiny_patch4_32.fashion_mnist', depth=1)
    assert trained.patch_embed.proj.in_channels == 1 and trained.patch_embed.grid_size == (7, 7)
    assert trained.num_classes == 10
    with torch.no_grad():
        for param in trained.parameters():
            param.add_(torch.randn_like(param))  # not the init: the loaded weights must be these
    path = tmp_path / 'model.safetensors'
    save_file(trained.state_dict(), str(path))
    loaded = timm.create_model('vit_posattn_tiny_patch4_32.fashion_mnist', pretrained=True, depth=1,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.eval()(x), rtol=0, atol=0)


def test_default_tags_keep_the_size_the_name_says():
    """A name without a tag builds its default tag's cfg; timm makes the first tag *with weights* the default, so
    publishing `.fashion_mnist` before a 32 px tag would make `vit_posattn_tiny_patch4_32` a 1 x 28 x 28 model (and
    train.py's default model with it). This fails the day that happens."""
    for name in FULL_NAMES:
        size = int(name.rsplit('_', 1)[-1])
        assert timm.get_pretrained_cfg(name).input_size == (3, size, size), name
        model = timm.create_model(name, device='meta')
        assert tuple(model.patch_embed.img_size) == (size, size) and model.patch_embed.proj.in_channels == 3


def test_attention_is_the_same_for_every_image():
    model = _small().eval()
    a = _collect_block_attention(model, torch.randn(2, 3, 32, 32))
    b = _collect_block_attention(model, torch.randn(3, 3, 32, 32) * 5 + 1)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert x.shape == (12, 65, 65)
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def _naive_positional_attention(attn_module: PositionalAttention, pos, x):
    """Per-image, per-head reference written straight from the formula, no batching tricks."""
    H, d = attn_module.num_heads, attn_module.head_dim
    p = attn_module.pos_map.norm(pos)
    qk = attn_module.pos_map.qk
    wq, wk = qk.weight[:H * d], qk.weight[H * d:]
    bq, bk = qk.bias[:H * d], qk.bias[H * d:]
    outs = []
    for b in range(x.shape[0]):
        v = x[b] @ attn_module.v.weight.T + attn_module.v.bias
        heads = []
        for h in range(H):
            sl = slice(h * d, (h + 1) * d)
            q = p @ wq[sl].T + bq[sl]
            k = p @ wk[sl].T + bk[sl]
            a = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
            heads.append(a @ v[:, sl])
        outs.append(torch.cat(heads, dim=-1) @ attn_module.proj.weight.T + attn_module.proj.bias)
    return torch.stack(outs)


def test_batched_attention_matches_naive_reference():
    attn = PositionalAttention(48, num_heads=4, grid_size=(4, 4), qkv_bias=True)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    pos, x = torch.randn(17, 48), torch.randn(5, 17, 48)
    out = attn(x, pos, (4, 4))
    torch.testing.assert_close(out, _naive_positional_attention(attn, pos, x), rtol=0, atol=1e-5)


def test_apply_positional_attention_layout():
    a = torch.softmax(torch.randn(3, 7, 7), dim=-1)
    v = torch.randn(4, 7, 3 * 5)
    ref = torch.einsum('hnm,bmhd->bnhd', a, v.view(4, 7, 3, 5)).reshape(4, 7, 15)
    torch.testing.assert_close(apply_positional_attention(a, v, 3), ref)


def _mix_grads(attn, v, weight, bias, num_heads, recompute):
    """Output and gradients of proj(A·V) through the recompute path or plain autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (attn, v, weight)] + \
        ([] if bias is None else [bias.detach().clone().requires_grad_()])
    a, vv, w = leaves[:3]
    b = leaves[3] if bias is not None else None
    if recompute:
        out = positional_attention_proj(a, vv, w, b, num_heads)
    else:
        out = F.linear(apply_positional_attention(a, vv, num_heads), w.to(vv.dtype), None if b is None else b.to(vv.dtype))
    out.float().backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize('proj_bias', [True, False])
def test_recomputing_attention_output_gives_autograd_gradients(proj_bias):
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 9, 9, generator=g, dtype=torch.float64), -1)
    v, w = torch.randn(4, 9, 24, generator=g, dtype=torch.float64), torch.randn(24, 24, generator=g, dtype=torch.float64)
    b = torch.randn(24, generator=g, dtype=torch.float64) if proj_bias else None
    out_ref, grads_ref = _mix_grads(attn, v, w, b, 3, recompute=False)
    out, grads = _mix_grads(attn, v, w, b, 3, recompute=True)
    torch.testing.assert_close(out, out_ref)
    for g_, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g_, g_ref)


def test_recomputing_attention_output_gradcheck_and_double_backward():
    args = (torch.softmax(torch.randn(2, 5, 5, dtype=torch.float64), -1), torch.randn(3, 5, 4, dtype=torch.float64),
            torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    args = tuple(a.requires_grad_() for a in args)
    fn = lambda a, v, w, b: positional_attention_proj(a, v, w, b, 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_recomputing_attention_output_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(3, 9, 9, generator=g), -1)
    x, w, b = torch.randn(4, 9, 24, generator=g), torch.randn(24, 24, generator=g), torch.randn(24, generator=g)
    results = []
    for recompute in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            v = x.to(torch.bfloat16)  # what the value projection yields under autocast
            out, grads = _mix_grads(attn, v, w, b, 3, recompute)
        assert out.dtype == torch.bfloat16
        assert [gr.dtype for gr in grads] == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
        results.append((out, grads))
    torch.testing.assert_close(results[1][0], results[0][0])
    for g_, g_ref in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(g_.float(), g_ref.float(), rtol=0.02, atol=0.02)


def test_per_sample_gradients_with_torch_func():
    """vmap(grad(...)) (per-sample gradients, as in DP-SGD) works on the model as built (torch.func transforms run
    the plain ops: they do not support custom operators' autograd) and gives what ordinary autograd through the lean
    operators gives for each image alone."""
    from torch.func import functional_call, grad, vmap
    model = _small(depth=1, embed_dim=24, num_heads=2)
    assert model.blocks[0].attn.lean
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, msg=name)


def test_attention_maps_need_no_image():
    model = _small(pos_attn_blocks=[0, 2])
    maps = model.get_attention_maps()
    assert maps.shape == (2, 12, 65, 65)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 12, 65))
    assert model.get_attention_maps(img_size=48).shape == (2, 12, 145, 145)


def test_pos_attn_blocks_modes():
    assert _small().pos_attn_indices == [0, 1, 2]
    hybrid = _small(pos_attn_blocks=2)
    assert [type(b) for b in hybrid.blocks] == [PositionalBlock, PositionalBlock, StandardBlock]
    assert _small(pos_attn_blocks=[-1]).pos_attn_indices == [2]
    twin = _small(pos_attn_blocks='none')
    assert all(isinstance(b, StandardBlock) for b in twin.blocks)
    with pytest.raises(ValueError, match='no positional-attention blocks'):
        twin.get_attention_maps()


def test_pos_attn_layers_is_the_old_name_of_pos_attn_blocks(tmp_path):
    """Renamed in 0.3: the old kwarg works with a FutureWarning (kwargs, recipes, and 0.2 checkpoints' recorded
    args); two different values under both names are refused."""
    import warnings
    from timm_posattn.loading import load_model, make_checkpoint
    new = timm.create_model('vit_posattn_tiny_patch4_32', pos_attn_blocks=2, depth=3)
    with pytest.warns(FutureWarning, match='pos_attn_layers is now called pos_attn_blocks'):
        old = timm.create_model('vit_posattn_tiny_patch4_32', pos_attn_layers=2, depth=3)
    assert old.pos_attn_indices == new.pos_attn_indices == [0, 1]
    with pytest.raises(TypeError, match='give pos_attn_blocks only'):
        timm.create_model('vit_posattn_tiny_patch4_32', pos_attn_layers=2, pos_attn_blocks=1, depth=3)
    args = {'model_kwargs': {'depth': 3, 'pos_attn_layers': 2}, 'num_classes': new.num_classes}  # as 0.2.0 did
    path = tmp_path / 'old.pth.tar'
    torch.save(make_checkpoint('vit_posattn_tiny_patch4_32', 0, new.state_dict(), args=args), path)
    with pytest.warns(FutureWarning):
        loaded = load_model(str(path)).model
    assert loaded.pos_attn_indices == [0, 1]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        timm.create_model('vit_posattn_tiny_patch4_32', pos_attn_blocks=2, depth=3)  # the new name: no warning


def test_standard_twin_is_timm_vit():
    """pos_attn_blocks='none' must differ from timm's ViT in nothing: same weights -> same logits."""
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=3).eval()
    twin = timm.create_model('vit_posattn_tiny_patch16_224', img_size=32, patch_size=4, depth=2, num_classes=3,
                             pos_attn_blocks='none').eval()
    twin.load_state_dict(vit.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), vit(x))


def test_model_matches_manual_composition():
    """The model's forward is exactly patch embed + class token + P, blocks fed the attention from P, norm, head."""
    model = _small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1) + model.pos_embed
        pos = model.pos_embed[0]
        for blk in model.blocks:
            h = blk.norm1(tokens)
            tokens = tokens + _naive_positional_attention(blk.attn, pos, h)
            tokens = tokens + blk.mlp(blk.norm2(tokens))
        ref = model.head(model.norm(tokens)[:, 0])
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def _reference_logits(model, x):
    """The model's output recomputed from scratch: a deep copy shares no state with the model."""
    import copy
    with torch.no_grad():
        return copy.deepcopy(model)(x)


@pytest.mark.parametrize('edit', ['qk_weight', 'norm_weight', 'pos_embed', 'load_state_dict', 'optimizer_step'])
def test_attention_is_never_stale(edit):
    """Whatever changes the parameters, the next eval forward uses attention computed from the new values."""
    model = _small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        if edit == 'qk_weight':  # through .data: no version counter sees this
            model.blocks[0].attn.pos_map.qk.weight.data.copy_(torch.randn_like(model.blocks[0].attn.pos_map.qk.weight))
        elif edit == 'norm_weight':
            model.blocks[1].attn.pos_map.norm.weight.data.mul_(5.0)
        elif edit == 'pos_embed':
            model.pos_embed.data.copy_(torch.randn_like(model.pos_embed))
        elif edit == 'load_state_dict':
            model.load_state_dict(_small().state_dict())
    if edit == 'optimizer_step':  # a step taken while the model stays in eval mode (test-time tuning)
        opt = torch.optim.SGD([model.blocks[0].attn.pos_map.qk.weight], lr=10.0)
        model(x).sum().backward()
        opt.step()
    with torch.no_grad():
        after = model(x)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, _reference_logits(model, x), rtol=0, atol=0)


def test_attention_follows_dtype_and_autocast():
    model = _small(depth=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            model(x)
        full = model(x)  # leaving autocast: nothing computed under bf16 is reused
        torch.testing.assert_close(full, _reference_logits(model, x), rtol=0, atol=0)
        with torch.autocast('cpu', dtype=torch.float16):
            half = model(x)
        assert half.dtype == torch.float16
        model.to(torch.float64)
        out = model(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), full, rtol=1e-4, atol=1e-4)


def test_concurrent_eval_forwards_agree():
    """Several threads running eval forwards on one model (a serving pattern) all get the single-thread result."""
    from concurrent.futures import ThreadPoolExecutor
    model = _small(depth=2).eval()
    inputs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]

    def run(i):
        with torch.no_grad():
            return model(inputs[i % 8])
    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(run, range(64)))
    for i, out in enumerate(outputs):
        torch.testing.assert_close(out, expected[i % 8], rtol=0, atol=0)


def test_empty_batch_gives_empty_logits():
    """Like timm's ViT: a batch of 0 images is (0, classes), in eval and in training (with backward)."""
    model = _small()
    x = torch.empty(0, 3, 32, 32)
    with torch.no_grad():
        assert model.eval()(x).shape == (0, 5)
    out = model.train()(x)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert model.blocks[0].attn.v.weight.grad is not None


def test_features_only_and_intermediates():
    model = _small()
    x = torch.randn(2, 3, 32, 32)
    feats = timm.create_model(SMALL, depth=3, features_only=True, out_indices=(0, 2))(x)
    assert [f.shape for f in feats] == [(2, 192, 8, 8)] * 2
    final, inter = model.forward_intermediates(x, indices=[1, 2], norm=True, output_fmt='NLC')
    assert final.shape == (2, 65, 192) and [t.shape for t in inter] == [(2, 64, 192)] * 2
    only = model.forward_intermediates(x, indices=1, intermediates_only=True, stop_early=True)
    assert len(only) == 1 and only[0].shape == (2, 192, 8, 8)
    with_prefix = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert with_prefix[0][1].shape == (2, 1, 192)
    torch.testing.assert_close(inter[1], model.forward_features(x)[:, 1:])  # last block, normed = features
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.blocks) == 2 and model.pos_attn_indices == [0, 1]
    assert model.forward_intermediates(x, indices=[1], intermediates_only=True)[0].shape == (2, 192, 8, 8)


def test_head_api():
    model = _small(global_pool='avg')
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 192)


def test_torchscript_and_fx():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = _small(pos_attn_blocks=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), ref)
        extractor = create_feature_extractor(model, return_nodes={'blocks.1': 'mid', 'head': 'logits'})
        out = extractor(x)
    torch.testing.assert_close(out['logits'], ref)
    assert out['mid'].shape == (2, 65, 192)


def test_torch_compile_fullgraph_trains():
    """No graph breaks in training (aot_eager checks dynamo + autograd tracing without paying for codegen)."""
    model = _small(depth=2)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert model.blocks[0].attn.pos_map.qk.weight.grad is not None


def test_grad_checkpointing_same_result():
    model = _small(drop_path_rate=0.)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert model.blocks[0].attn.pos_map.qk.weight.grad is not None


def test_layer_decay_and_no_weight_decay():
    from timm.optim import create_optimizer_v2
    model = _small()
    opt = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = {g['lr_scale'] for g in opt.param_groups}
    assert len(scales) == 5  # stem, 3 blocks, head/norm
    no_decay = [g for g in opt.param_groups if g['weight_decay'] == 0]
    names = {n for n, p in model.named_parameters() for g in no_decay if any(p is q for q in g['params'])}
    assert {'pos_embed', 'cls_token'} <= names


def test_meta_device_builds_without_allocating():
    model = timm.create_model('vit_posattn_base_patch16_224', device='meta')
    assert all(p.device.type == 'meta' for p in model.parameters())


def test_img_size_override_and_dynamic_size():
    model = timm.create_model(SMALL, img_size=48, depth=2).eval()
    assert model.pos_embed.shape[1] == 1 + 12 * 12 and model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    dyn = timm.create_model(SMALL, dynamic_img_size=True, depth=2).eval()
    out = dyn(torch.randn(1, 3, 48, 40))
    maps = _collect_block_attention(dyn, torch.randn(1, 3, 48, 40))
    assert out.shape == (1, 10) and maps[0].shape == (12, 1 + 12 * 10, 1 + 12 * 10)
    assert _collect_block_attention(dyn, torch.randn(1, 3, 32, 32))[0].shape == (12, 65, 65)
    dyn.set_input_size(img_size=(40, 40))
    assert dyn.pos_embed.shape[1] == 101


def _save(state_dict, path):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return str(path)


def test_own_checkpoint_other_resolution_and_classes(tmp_path):
    src = _small()
    path = _save(src.state_dict(), tmp_path / 'model.safetensors')
    model = timm.create_model(SMALL, depth=3, img_size=48, num_classes=3, pretrained=True,
                              pretrained_cfg_overlay=dict(file=path))
    assert model.pos_embed.shape[1] == 145 and model.head.out_features == 3
    torch.testing.assert_close(model.blocks[1].attn.pos_map.qk.weight, src.blocks[1].attn.pos_map.qk.weight)
    same = timm.create_model(SMALL, depth=3, num_classes=5, pretrained=True,
                             pretrained_cfg_overlay=dict(file=path, num_classes=5))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), src.eval()(x))


def test_standard_vit_checkpoint_initializes_positional_model(tmp_path, caplog):
    vit = timm.create_model('vit_tiny_patch16_224')
    path = _save(vit.state_dict(), tmp_path / 'vit_tiny.safetensors')
    with caplog.at_level(logging.INFO, logger='timm_posattn.vit_posattn'):
        model = timm.create_model('vit_posattn_tiny_patch16_224', pretrained=True,
                                  pretrained_cfg_overlay=dict(file=path))
    blk, ref = model.blocks[3], vit.blocks[3]
    torch.testing.assert_close(blk.attn.v.weight, ref.attn.qkv.weight[2 * 192:])
    torch.testing.assert_close(blk.attn.v.bias, ref.attn.qkv.bias[2 * 192:])
    torch.testing.assert_close(blk.attn.proj.weight, ref.attn.proj.weight)
    torch.testing.assert_close(blk.mlp.fc2.weight, ref.mlp.fc2.weight)
    torch.testing.assert_close(model.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    torch.testing.assert_close(model.head.weight, vit.head.weight)
    assert 'Freshly initialized' in caplog.text and 'blocks.3.attn.pos_map.qk.weight' in caplog.text
    # and the other way round: a positional checkpoint into the standard twin keeps values and projections
    twin = timm.create_model('vit_posattn_tiny_patch16_224', pos_attn_blocks='none', pretrained=True,
                             pretrained_cfg_overlay=dict(file=_save(model.state_dict(), tmp_path / 'pos.safetensors')))
    torch.testing.assert_close(twin.blocks[3].attn.qkv.weight[2 * 192:], blk.attn.v.weight)


def test_wrong_channel_count_is_named():
    model = _small()
    with pytest.raises(Exception, match=r'expected an input of shape \(B, 3, H, W\)'):
        model(torch.randn(1, 1, 32, 32))


def test_wrong_image_size_is_named():
    model = _small()
    with pytest.raises(AssertionError, match=r"Input height \(64\) doesn't match model \(32\)"):
        model(torch.randn(1, 3, 64, 64))
    dyn = _small(dynamic_img_size=True)
    with pytest.raises(AssertionError, match='should be divisible by patch size'):
        dyn(torch.randn(1, 3, 30, 32))


def test_unknown_kwargs_are_named():
    with pytest.raises(TypeError, match=r"Unknown model kwarg 'embed_dims' for vit_posattn_tiny_patch4_32; accepted: .*'embed_dim'"):
        timm.create_model(SMALL, embed_dims=64)
    with pytest.raises(ValueError, match="pos_attn_blocks must be 'all', 'none'"):
        timm.create_model(SMALL, pos_attn_blocks='first')
    with pytest.raises(ValueError, match='outside 0..6'):
        timm.create_model(SMALL, pos_attn_blocks=[9])


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    resnet = timm.create_model('resnet18', num_classes=10)
    path = _save(resnet.state_dict(), tmp_path / 'resnet.safetensors')
    with pytest.raises(ValueError, match='not a ViT checkpoint.*expected keys'):
        timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=path))
    wide = _save(timm.create_model('vit_posattn_small_patch4_32').state_dict(), tmp_path / 'wide.safetensors')
    with pytest.raises(ValueError, match='checkpoint has width 384, this model has embed_dim=192'):
        timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=wide))
    shallow = _save(_small().state_dict(), tmp_path / 'shallow.safetensors')
    with pytest.raises(ValueError, match='checkpoint has 3 blocks, this model has depth=7'):
        timm.create_model(SMALL, pretrained=True, pretrained_cfg_overlay=dict(file=shallow))


def test_partial_checkpoint_is_not_loaded_silently(tmp_path):
    sd = _small().state_dict()
    del sd['blocks.1.mlp.fc1.weight']
    path = _save(sd, tmp_path / 'partial.safetensors')
    with pytest.raises(RuntimeError, match='Missing key.*blocks.1.mlp.fc1.weight'):
        timm.create_model(SMALL, depth=3, num_classes=5, pretrained=True,
                          pretrained_cfg_overlay=dict(file=path, num_classes=5))


def test_local_pos_attn_init_starts_near_softmax_of_beta_identity():
    """pos_attn_init='local': every positional head starts with self logit ~beta, i.e. A ~ softmax(beta·I)."""
    n = 1 + 64
    for beta in (1.0, 2.0):
        model = _small(pos_attn_init='local', pos_attn_init_scale=beta)
        maps = model.get_attention_maps()
        diag = maps.diagonal(dim1=-2, dim2=-1).mean().item()
        expected = math.exp(beta) / (math.exp(beta) + n - 1)
        assert abs(diag - expected) < 0.25 * expected, (beta, diag, expected)
        for i in model.pos_attn_indices:
            qk = model.blocks[i].attn.pos_map.qk
            assert torch.equal(qk.weight[:192], qk.weight[192:]) and (qk.bias == 0).all()
    uniform = _small().get_attention_maps().diagonal(dim1=-2, dim2=-1).mean().item()
    assert abs(uniform - 1 / n) < 0.2 / n  # the default random init starts near uniform


def test_local_pos_attn_init_leaves_everything_else_as_default():
    """The option only rewrites the positional Q/K weights; the default stays bit-identical to no option."""
    torch.manual_seed(3)
    default = _small().state_dict()
    torch.manual_seed(3)
    explicit = _small(pos_attn_init='random').state_dict()
    torch.manual_seed(3)
    local = _small(pos_attn_init='local').state_dict()
    assert all(torch.equal(default[k], explicit[k]) for k in default)
    changed = {k for k in default if not torch.equal(default[k], local[k])}
    assert changed == {f'blocks.{i}.attn.pos_map.qk.weight' for i in range(3)}  # timm's init already zeroes the bias
    standard = _small(pos_attn_init='local', pos_attn_blocks='none')  # no positional blocks: nothing to do
    assert standard.pos_attn_indices == []
    with pytest.raises(ValueError, match="'random' or 'local'"):
        _small(pos_attn_init='identity')
    with pytest.raises(ValueError, match='pos_attn_norm'):
        _small(pos_attn_init='local', pos_attn_norm=False)


def test_bf16_autocast_trains():
    model = _small(depth=2)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert model.blocks[0].attn.pos_map.qk.weight.grad.dtype == torch.float32
