"""timm_posattn.attention_stats: the uniform row's distance, and every block's attention of a mixed model."""
import math

import pytest
import timm
import torch

import timm_posattn  # noqa: F401
from timm_posattn.attention_stats import (
    AttentionStatsError, attention_distance, block_attention, record_average_attention, uniform_attention_distance)


def test_uniform_row_distance():
    # 2x2 grid, no class token: from any patch the others lie at 0, 1, 1 and sqrt(2) patches
    assert uniform_attention_distance((2, 2), 0) == pytest.approx((2 + math.sqrt(2)) / 4)
    # with a class token its fifth of each row counts 0
    assert uniform_attention_distance((2, 2), 1) == pytest.approx((2 + math.sqrt(2)) / 5)
    far = torch.zeros(4, 4)
    far[[0, 1, 2, 3], [3, 2, 1, 0]] = 1  # every patch attends to the opposite corner
    assert float(attention_distance(far, (2, 2), 0)) == pytest.approx(math.sqrt(2))


def test_mixed_model_reads_positional_blocks_and_averages_the_others():
    torch.manual_seed(0)
    model = timm.create_model('vit_posattn_tiny_patch4_32', depth=3, embed_dim=24, num_heads=2,
                              pos_attn_blocks=[0, 2]).eval()
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    attention, count = block_attention(model, [images[:4], images[4:]])
    assert count == 6 and sorted(attention) == [0, 1, 2]
    maps = model.get_attention_maps()
    torch.testing.assert_close(attention[0], maps[0])
    torch.testing.assert_close(attention[2], maps[1])
    standard_only = record_average_attention(model, [images], blocks=[1]).average[0]
    torch.testing.assert_close(attention[1], standard_only)
    with pytest.raises(AttentionStatsError, match=r'blocks \[1\] compute their attention from the image'):
        block_attention(model)
