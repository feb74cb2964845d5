"""What positional attention keeps in memory: no (H, N, N) attention without autograd, none stored for backward,
and the normalized tokens recomputed rather than stored; all of it computing what the plain ops compute."""
import pytest
import torch
import torch.nn.functional as F
import timm

import timm_posattn  # noqa: F401  (registers the models)
from timm_posattn.layers import PositionalAttention, PositionalBlock
from timm_posattn.memory import cpu_allocator_peak
from timm_posattn.lean_attention import layer_norm_linear, positional_attention_proj

SMALL = 'vit_posattn_tiny_patch4_32'


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _plain(model):
    """Turn the memory-lean operators off: the plain autograd ops (the reference)."""
    for attn in model.modules():
        if isinstance(attn, PositionalAttention):
            attn.lean = False
    return model


def _loss_and_grads(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('layer', ['qk', 'tied', 'logits'])
@pytest.mark.parametrize('batch', [1, 3])
def test_lean_training_gives_plain_autograd_gradients(layer, batch):
    """Batch 1 runs the operator's SDPA forward, larger batches its head-by-head one."""
    model = timm.create_model(SMALL, depth=2, num_classes=5, pos_attn_layer=layer).double()
    x, y = torch.randn(batch, 3, 32, 32, dtype=torch.float64), torch.randint(0, 5, (batch,))
    loss, grads = _loss_and_grads(model, x, y)
    ref_loss, ref_grads = _loss_and_grads(_plain(model), x, y)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], msg=name)


def test_attention_from_query_key_gradcheck_and_double_backward():
    """Gradients flow to q and k (A is rebuilt from them in backward), with and without the projection."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, w, b):
        attn = (q @ k.transpose(-2, -1)).softmax(-1).detach()  # what the layer passes: used forward only
        return positional_attention_proj(attn, v, w, b, 2, (q, k))

    def mix_only(q, k, v):
        return positional_attention_proj((q @ k.transpose(-2, -1)).softmax(-1).detach(), v, None, None, 2, (q, k))
    for f, args in ((fn, (q, k, v, w, b)), (mix_only, (q, k, v))):
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)


def test_layer_norm_linear_gradcheck_double_backward_and_bf16():
    norm, linear = torch.nn.LayerNorm(6).double(), torch.nn.Linear(6, 5).double()
    for p in list(norm.parameters()) + list(linear.parameters()):
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    def fn(x, nw, nb, w, b):
        return layer_norm_linear(x, type('N', (), dict(weight=nw, bias=nb, eps=norm.eps))(),
                                 type('L', (), dict(weight=w, bias=b))())
    args = (x, norm.weight, norm.bias, linear.weight, linear.bias)
    torch.testing.assert_close(fn(*args), linear(norm(x)))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    # under bf16 autocast: the norm in fp32, the linear in bf16, gradients in the parameters' dtype, as autograd does
    norm, linear = norm.float(), linear.float()
    xf = x.detach().float()
    results = []
    for fused in (True, False):
        for m in (norm, linear):
            m.zero_grad(set_to_none=True)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = layer_norm_linear(xf, norm, linear) if fused else linear(norm(xf))
        out.float().square().sum().backward()
        results.append((out, [p.grad for p in (*norm.parameters(), *linear.parameters())]))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == ref_grad.dtype == torch.float32
        torch.testing.assert_close(grad, ref_grad, rtol=0.02, atol=0.02)


def _saved_storages(fn):
    """{storage: (bytes, shape)} of the tensors autograd keeps for backward while `fn` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return storages


def test_training_block_stores_no_attention_matrix_nor_normalized_tokens():
    B, N, C, H = 6, 10, 32, 4
    block = PositionalBlock(C, num_heads=H, grid_size=(3, 3))
    x, pos = torch.randn(B, N, C), torch.randn(1, N, C, requires_grad=True)
    lean = _saved_storages(lambda: block(x, pos, (3, 3)))
    plain = _saved_storages(lambda: _plain(block)(x, pos, (3, 3)))
    assert (H, N, N) in {shape for _, shape in plain.values()}
    assert (H, N, N) not in {shape for _, shape in lean.values()}  # A: rebuilt from q and k in backward
    # less: the normalized tokens and A·V (one (B, N, C) activation each), A, and norm1's mean and rstd
    saved = sum(n for n, _ in plain.values()) - sum(n for n, _ in lean.values())
    assert saved == (2 * B * N * C + H * N * N + 2 * B * N) * 4


@pytest.mark.parametrize('layer', ['qk', 'tied', 'logits'])
@pytest.mark.parametrize('batch', [1, 3])
def test_inference_allocates_at_most_one_head_of_attention(layer, batch):
    """Without autograd a positional block never allocates the (H, N, N) attention: one head's at most (a single
    image through SDPA, none); the output is the plain ops' output."""
    from torch.profiler import ProfilerActivity, profile
    model = timm.create_model(SMALL, depth=1, num_classes=5, pos_attn_layer=layer).eval()
    x = torch.randn(batch, 3, 32, 32)
    heads, tokens = 12, 65
    with torch.no_grad():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = model(x)
        ref = _plain(model)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    allocations = [e.nbytes() for e in prof.profiler.kineto_results.events()
                   if e.name() == '[memory]' and e.nbytes() > 0]
    biggest = max(allocations)
    if layer == 'logits':  # a free logit table: its softmax is one (H, N, N) tensor, as in the plain forward
        assert biggest == heads * tokens * tokens * 4
    else:
        assert biggest < heads * tokens * tokens * 4


@pytest.mark.parametrize('batch', [1, 4])
def test_inference_block_peak_is_not_above_timm_block(batch):
    """Without autograd a positional block needs no more memory than timm's block of the same size: its attention
    is built head by head, and nothing of it (A, the attention output) is alive while the MLP runs."""
    from timm.models.vision_transformer import Block
    dim, heads, tokens = 64, 4, 17
    ours = PositionalBlock(dim, num_heads=heads, grid_size=(4, 4), qkv_bias=True).eval()
    theirs = Block(dim, num_heads=heads, qkv_bias=True).eval()
    x, pos = torch.randn(batch, tokens, dim), torch.randn(1, tokens, dim)
    with torch.no_grad():
        ours(x, pos, (4, 4)), theirs(x)  # first calls out of the way
        peak = cpu_allocator_peak(lambda: ours(x, pos, (4, 4)))
        timm_peak = cpu_allocator_peak(lambda: theirs(x))
    assert peak <= timm_peak
