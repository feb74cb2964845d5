""" FLOP counting that sees through fused kernels

`torch.utils.flop_counter.FlopCounterMode` counts only the ops in its formula registry. On the CPU, timm's fused
attention and our batch-1 path (`F.scaled_dot_product_attention`) dispatch to kernels the registry does not know, so
their Q·Kᵀ and A·V would count as zero and a model would look cheaper than it is. `FlopCounter` decomposes every op
without a formula into the ops it is made of (SDPA into matmuls and a softmax) and counts those. One counter for the
model cards (`publish`) and the benchmarks, so their GMACs agree.
"""
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

__all__ = ['FlopCounter', 'forward_gmacs']


def _cpu_flash_attention_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


# fused CPU attention (what F.scaled_dot_product_attention runs on CPU tensors): no formula in torch's registry, and no
# decomposition either; it computes exactly what the registered CUDA flash kernel does
_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu'):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops


class FlopCounter(TorchDispatchMode):
    """Sum of torch.utils.flop_counter's formulas (matmuls, convs, attention) over the ops a region runs.

    Like FlopCounterMode, but ops without a formula are decomposed and their parts counted, the fused CPU attention
    kernel is counted like the CUDA one, and there is no module tracker (which rejects no-grad and inference-mode
    forwards).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        formula = flop_registry.get(packet, _EXTRA_FORMULAS.get(packet))
        if formula is None and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)  # e.g. SDPA -> bmm/softmax, counted below
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def forward_gmacs(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> float:
    """Multiply-adds (GMACs, FLOPs / 2) per image of one no-grad forward of a `batch_size` batch of `input_size`."""
    x = torch.randn(batch_size, *input_size)
    counter = FlopCounter()
    with torch.no_grad(), counter:
        model(x)
    return counter.flops / 2 / 1e9 / batch_size
