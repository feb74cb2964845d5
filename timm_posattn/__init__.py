"""Positional-attention Vision Transformers for timm.

Importing this package registers the `vit_posattn_*` models with timm's registry, so that
`timm.create_model('vit_posattn_small')` (and `hf-hub:` / `local-dir:` models of these architectures) work.
"""
from .layers import (
    FixedAttentionMap,
    LogitsAttentionMap,
    PositionalAttention,
    PositionalAttentionMap,
    PositionalBlock,
    QKAttentionMap,
    TiedAttentionMap,
    get_pos_attn_layer,
    list_pos_attn_layers,
    register_pos_attn_layer,
)
from .vit_posattn import VisionTransformerPosAttn, checkpoint_filter_fn, resolve_pos_attn_blocks

__all__ = [
    'FixedAttentionMap', 'LogitsAttentionMap', 'PositionalAttention', 'PositionalAttentionMap', 'PositionalBlock',
    'QKAttentionMap', 'TiedAttentionMap', 'VisionTransformerPosAttn', 'checkpoint_filter_fn', 'get_pos_attn_layer',
    'list_pos_attn_layers', 'register_pos_attn_layer', 'resolve_pos_attn_blocks',
]
__version__ = '0.2.0'
