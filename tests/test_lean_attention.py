"""The memory-lean operators (timm_posattn.lean_attention) as torch.compile sees them: opcheck, gradients equal plain
autograd's compiled and eager, no graph breaks, the same saved tensors compiled as eager, and the plain ops wherever
the operators cannot run (FX and jit tracing, torch.export)."""
import pytest
import torch
import torch.nn.functional as F
import timm

import timm_posattn  # noqa: F401  (registers the models)
from timm_posattn.flops import FlopCounter
from timm_posattn.layers import PositionalAttention, PositionalBlock
from timm_posattn.lean_attention import attend_project, mix_project, norm_attend_project
from timm_posattn.memory import cpu_allocator_peak

layer_norm_linear = torch.ops.timm_posattn.layer_norm_linear  # the operator (lean_attention.layer_norm_linear wraps it)

SMALL = 'vit_posattn_tiny_patch4_32'
OPS = ('timm_posattn.layer_norm_linear', 'timm_posattn.attend_project', 'timm_posattn.mix_project',
       'timm_posattn.norm_attend_project')


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _set_lean(model, on):
    for m in model.modules():
        if isinstance(m, PositionalAttention):
            m.lean = on
    return model


def _op_names(graph):
    """The lean operators an FX graph calls."""
    return {str(n.target).rsplit('.', 1)[0] for n in graph.nodes if str(n.target).startswith('timm_posattn.')}


def _opcheck_cases():
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()
    q, k, v, w, b = t(2, 5, 3), t(2, 5, 3), t(3, 5, 4), t(6, 4), t(6)
    attn = torch.randn(2, 5, 5, generator=g).softmax(-1).requires_grad_()
    x, nw, nb = t(3, 5, 4), t(4), t(4)
    x5, wv = torch.randn(5, 5, 4, generator=g), torch.randn(4, 4, generator=g)
    plain = [a.detach() for a in (q, k, attn, w, b, nw, nb)]  # inference only: no autograd formula to check
    return {
        'norm_attend_project': (norm_attend_project, (x5, plain[5], plain[6], 1e-6, wv, plain[5], plain[0], plain[1],
                                                      None, plain[3], plain[4], 2)),
        'norm_attend_project_given_attn_no_bias': (norm_attend_project, (x5[:3], None, None, 1e-5, wv, None, None,
                                                                         None, plain[2], plain[3], None, 2)),
        'attend_project': (attend_project, (q, k, v, w, b, 2)),
        'attend_project_one_image': (attend_project, (q, k, v[:1], w, b, 2)),
        'attend_project_tied_no_proj': (attend_project, (q, q, v, None, None, 2)),
        'mix_project': (mix_project, (attn, v, w, b, 2)),
        'mix_project_no_proj': (mix_project, (attn, v, None, None, 2)),
        'layer_norm_linear': (layer_norm_linear, (x, nw, nb, 1e-6, w, b)),
        'layer_norm_linear_no_affine_no_bias': (layer_norm_linear, (x, None, None, 1e-5, w, None)),
    }


@pytest.mark.parametrize('case', list(_opcheck_cases()))
def test_opcheck(case):
    """Schema, fake (meta) kernel, autograd registration, and forward and gradients under AOT dispatch with dynamic
    shapes (what torch.compile does) against eager."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n.removeprefix('_orig_mod.'): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('layer,batch', [('qk', 3), ('tied', 3), ('logits', 3), ('qk', 1)])
def test_compiled_training_gives_plain_autograd_gradients(layer, batch):
    """torch.compile(fullgraph=True) traces the model into one graph that calls the operators, and its loss and
    gradients are plain autograd's (eager, lean=False)."""
    model = timm.create_model(SMALL, depth=2, num_classes=5, pos_attn_layer=layer).double()
    x, y = torch.randn(batch, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (batch,))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.graph)
        return torch._dynamo.lookup_backend('aot_eager')(gm, example_inputs)
    torch._dynamo.reset()
    loss, grads = _loss_and_grads(torch.compile(model, backend=backend, fullgraph=True), x, y)
    mixing = 'timm_posattn.mix_project' if layer == 'logits' else 'timm_posattn.attend_project'
    assert len(graphs) == 1 and _op_names(graphs[0]) == {'timm_posattn.layer_norm_linear', mixing}
    ref_loss, ref_grads = _loss_and_grads(_set_lean(model, False), x, y)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while `fn` runs (compiled graphs included)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_compiled_block_saves_what_eager_saves():
    """Compiled, a block keeps for backward exactly what it keeps eagerly: the operators' choice (no A, no A·V, no
    normalized tokens), not the partitioner's; the plain ops keep 2·B·N·C + H·N² + 2·B·N numbers more either way."""
    B, N, C, H = 6, 10, 32, 4
    block = PositionalBlock(C, num_heads=H, grid_size=(3, 3))
    x, pos = torch.randn(B, N, C), torch.randn(1, N, C, requires_grad=True)
    saved = {}
    for lean in (True, False):
        block.attn.lean = lean
        torch._dynamo.reset()
        compiled = torch.compile(block, backend='aot_eager', fullgraph=True)
        compiled(x, pos, (3, 3))
        saved[lean] = (_saved_bytes(lambda: compiled(x, pos, (3, 3))), _saved_bytes(lambda: block(x, pos, (3, 3))))
    assert saved[True][0] == saved[True][1]
    assert saved[False][0] - saved[True][0] == (2 * B * N * C + H * N * N + 2 * B * N) * 4


@pytest.mark.parametrize('layer', ['qk', 'logits'])
def test_compiled_inference_allocates_at_most_one_head_of_attention(layer):
    """Compiled for inference (fullgraph), the operators still build A head by head: no allocation holds the whole
    (H, N, N) unless the layer's A is a table softmaxed whole (as in the plain forward)."""
    from torch.profiler import ProfilerActivity, profile
    model = timm.create_model(SMALL, depth=1, num_classes=5, pos_attn_layer=layer).eval()
    x = torch.randn(3, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend='aot_eager', fullgraph=True)
    with torch.inference_mode():
        compiled(x)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = compiled(x)
        ref = _set_lean(model, False)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    biggest = max(e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == '[memory]')
    whole = 12 * 65 * 65 * 4
    assert biggest == whole if layer == 'logits' else biggest < whole


def test_inductor_compiles_the_operators():
    """The default backend (inductor) runs the operators and compiles their backward formulas: the gradients of the
    attention branch equal plain autograd's."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, requires_grad=True)
    x, nw, nb, wv, bv, q, k, wp, bp = t(3, 5, 8), t(8), t(8), t(8, 8), t(8), t(2, 5, 4), t(2, 5, 4), t(8, 8), t(8)
    args = (x, nw, nb, wv, bv, q, k, wp, bp)

    def lean(x, nw, nb, wv, bv, q, k, wp, bp):
        v = layer_norm_linear(x, nw, nb, 1e-5, wv, bv)
        return attend_project(q, k, v, wp, bp, 2).square().sum()

    def plain(x, nw, nb, wv, bv, q, k, wp, bp):
        v = F.linear(F.layer_norm(x, (8,), nw, nb, 1e-5), wv, bv).view(3, 5, 2, 4).transpose(1, 2)
        mixed = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 8)
        return F.linear(mixed, wp, bp).square().sum()
    torch._dynamo.reset()
    compiled = torch.compile(lean, fullgraph=True)
    grads = torch.autograd.grad(compiled(*args), args)
    ref = torch.autograd.grad(plain(*args), args)
    for grad, ref_grad in zip(grads, ref):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


def test_attention_dropout_gives_plain_autograd_gradients():
    """With attention dropout A cannot be rebuilt in backward: it is given to mix_project (and saved), one mask for
    the whole batch drawn exactly as the plain forward draws it."""
    model = timm.create_model(SMALL, depth=2, num_classes=5, attn_drop_rate=0.3).double()
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (3,))
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, x, y)
    torch.manual_seed(1)
    ref_loss, ref_grads = _loss_and_grads(_set_lean(model, False), x, y)
    torch.testing.assert_close(loss, ref_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)
    torch.manual_seed(2)
    assert not torch.equal(_loss_and_grads(model, x, y)[0], loss)  # the mask is random: the test compares something


def test_tracing_and_export_record_the_plain_ops():
    """FX and jit tracing (ONNX export) and torch.export never see the operators: the plain ops run there."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model = timm.create_model(SMALL, depth=1, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    assert _op_names(create_feature_extractor(model, {'head': 'out'}).graph) == set()
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
    assert not any(node.kind().startswith('timm_posattn::') for node in traced.inlined_graph.nodes())
    attn = model.blocks[0].attn
    exported = torch.export.export(attn, (torch.randn(2, 65, 192), model.pos_embed, (8, 8)))
    assert _op_names(exported.graph) == set()
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x.new_ones(2, 65, 192), model.pos_embed, (8, 8)),
                                   attn(x.new_ones(2, 65, 192), model.pos_embed, (8, 8)))


@pytest.mark.parametrize('batch', [1, 3])
def test_flop_formulas_count_what_the_plain_ops_count(batch):
    """The operators' registered FLOP formulas give the forward the FLOPs of the plain ops it replaces."""
    model = timm.create_model(SMALL, depth=2, num_classes=5, pos_attn_blocks=[1]).eval()
    x = torch.randn(batch, 3, 32, 32)
    flops = []
    for lean in (True, False):
        _set_lean(model, lean)
        counter = FlopCounter()
        with torch.no_grad(), counter:
            model(x)
        flops.append(counter.flops)
    assert flops[0] == flops[1] > 0


def _branch(block, x, pos, grid_size):
    return block._attention(x, pos, grid_size)


@pytest.mark.parametrize('layer', ['qk', 'logits'])
@pytest.mark.parametrize('batch', [2, 5, 8])
def test_inference_branch_is_one_operator_computing_the_plain_ops(layer, batch):
    """Without autograd a block's attention branch (more than one image) is the one operator norm_attend_project,
    eager and compiled by inductor, and it computes what the plain ops compute, whatever the batch's slices."""
    from torch.profiler import ProfilerActivity, profile
    model = timm.create_model(SMALL, depth=1, num_classes=5, pos_attn_layer=layer).eval()
    x = torch.randn(batch, 3, 32, 32)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = model(x)
        out_compiled = compiled(x)
        ref = _set_lean(model, False)(x)
    ops = {e.key for e in prof.key_averages() if e.key.startswith('timm_posattn::')}
    assert ops == {'timm_posattn::norm_attend_project'}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_compiled, ref, rtol=1e-4, atol=1e-4)


def test_inference_branch_under_autocast_computes_in_autocast_dtype():
    """Under bf16 autocast the branch runs its linears and mixing in bf16, as the plain ops do, and says so in its
    output's dtype."""
    block = PositionalBlock(32, num_heads=4, grid_size=(3, 3)).eval()
    x, pos = torch.randn(4, 10, 32), torch.randn(1, 10, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = _branch(block, x, pos, (3, 3))
        block.attn.lean = False
        ref = _branch(block, x, pos, (3, 3))
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)


def test_inference_branch_working_memory_is_under_one_activation():
    """The branch of 32 images holds, besides its output, less than one (B, N, C) activation: values, mixed tokens and
    output share one buffer (the operators of the training path hold the three at once: 3.1 activations here)."""
    B, N, C = 32, 50, 256
    block = PositionalBlock(C, num_heads=4, grid_size=(7, 7), qkv_bias=True).eval()
    x, pos = torch.randn(B, N, C), torch.randn(1, N, C)
    activation = B * N * C * 4
    with torch.no_grad():
        _branch(block, x, pos, (7, 7))
        peak = cpu_allocator_peak(lambda: _branch(block, x, pos, (7, 7)))
    assert activation <= peak < 2 * activation
