"""Peak memory of a call on the CPU, where torch keeps no allocator statistics.

The profiler (with profile_memory=True) records every allocation and free of torch's CPU allocator;
summing them in time order gives the peak of memory allocated during the call above what was
allocated before it. It reads torch's profiler event tree (`torch._C._profiler`), which is not a
stable API: `peak_allocated_bytes` raises RuntimeError when that tree has no allocation events.
"""
from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def _allocations(node, out: list) -> None:
    from torch._C._profiler import _EventType

    if node.tag == _EventType.Allocation:
        out.append((node.start_time_ns, node.extra_fields.alloc_size, str(node.extra_fields.device)))
    for child in node.children:
        _allocations(child, out)


def peak_allocated_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated on `device` while fn() runs, above the allocation at its start.

    Memory that fn() allocates and keeps (its result, gradients) counts at its peak like the rest.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list = []
    for root in prof.profiler.kineto_results.experimental_event_tree():
        _allocations(root, events)
    events = sorted(e for e in events if e[2].startswith(device))
    if not events:
        raise RuntimeError("the profiler recorded no allocations; cannot measure memory with this torch")
    current = peak = 0
    for _, size, _ in events:
        current += size
        peak = max(peak, current)
    return peak
