"""FLOP counting (timm_posattn.flops): fused attention on CPU tensors is counted, not skipped."""
import torch
import torch.nn.functional as F
import timm

import timm_posattn  # noqa: F401  (registers the models)
from timm_posattn.flops import FlopCounter, forward_gmacs


def test_cpu_fused_attention_counts_its_two_matmuls():
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 12, 4), torch.randn(2, 3, 12, 5)
    counter = FlopCounter()
    with torch.no_grad(), counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.flops == 2 * (2 * 3 * 10 * 12 * 4) + 2 * (2 * 3 * 10 * 12 * 5)  # Q·Kᵀ and A·V, 2 FLOPs per MAC


def test_timm_vit_gmacs_match_the_formula():
    """Per block 12·N·C² + 2·N²·C multiply-adds, whether timm runs its fused kernel or not."""
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=2, num_classes=0).eval()
    N, C = 1 + 16, 192
    blocks = 2 * (12 * N * C * C + 2 * N * N * C)
    patch_embed = 16 * (3 * 8 * 8) * C
    assert forward_gmacs(model, (3, 32, 32)) * 1e9 == blocks + patch_embed


def test_positional_batch_one_costs_its_attention_too():
    """At batch 1 the positional block runs SDPA on the positional q, k: counted, so the model as loaded costs more
    than the reparameterized one by exactly the q/k projections and the logits."""
    from timm.utils import reparameterize_model
    model = timm.create_model('vit_posattn_tiny_patch4_32', depth=1).eval()
    N, C, H = 65, 192, model.blocks[0].attn.num_heads
    extra = N * C * 2 * C + H * N * N * (C // H)
    diff = forward_gmacs(model, (3, 32, 32)) - forward_gmacs(reparameterize_model(model), (3, 32, 32))
    assert abs(diff * 1e9 - extra) < 1e-3 * extra
