"""Softmax attention computed by hand from each block's input: what the tests compare recorded attention with."""
import torch


def attention_by_hand(model, images, mean=True):
    """Each block's softmax(q·kᵀ·scale) computed by hand from the block's input: (blocks, [images,] H, N, N)."""
    inputs = []
    hooks = [blk.norm1.register_forward_hook(lambda m, i, o: inputs.append(o)) for blk in model.blocks]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    maps = []
    for blk, x in zip(model.blocks, inputs):
        B, N, C = x.shape
        q, k, _ = blk.attn.qkv(x).reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        maps.append(attn.mean(0) if mean else attn)
    return torch.stack(maps)
