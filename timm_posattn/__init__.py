"""Positional-attention Vision Transformers for timm.

Importing this package registers the `vit_posattn_*` models with timm's registry, so that
`timm.create_model('vit_posattn_small')` (and `hf-hub:` / `local-dir:` models of these architectures) work.
"""
from .vit_posattn import (
    PositionalAttention,
    PositionalBlock,
    VisionTransformerPosAttn,
    checkpoint_filter_fn,
    resolve_pos_attn_layers,
)

__all__ = [
    'PositionalAttention', 'PositionalBlock', 'VisionTransformerPosAttn', 'checkpoint_filter_fn',
    'resolve_pos_attn_layers',
]
__version__ = '0.1.0'
