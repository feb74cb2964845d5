"""One measure of CPU peak memory, for the benchmarks and the memory tests: what the tensor allocator holds."""
from typing import Callable

import torch

__all__ = ['cpu_allocator_peak']


def cpu_allocator_peak(fn: Callable[[], None]) -> int:
    """Highest net bytes the CPU tensor allocator held above its starting point while `fn` ran.

    Replays the allocation/free events torch.profiler records with profile_memory=True (every c10 CPU allocation,
    scratch buffers inside ops included). It does not see memory that bypasses the tensor allocator (e.g. the
    oneDNN primitive cache) nor allocator fragmentation, so it is a lower bound on RSS growth.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError as e:  # private profiler API; fail loudly rather than report zeros
        raise RuntimeError(f'this torch ({torch.__version__}) does not expose profiler memory events: {e}') from e
    allocations = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == '[memory]' and e.device_type().name == 'CPU')
    live = peak = 0
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return peak
