"""Throughput accounting: FLOPs per step (torch.utils.flop_counter), device peaks, MFU, memory."""

from __future__ import annotations

from typing import Callable, Optional

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from vendor spec sheets, matched on the device name.
_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


def device_peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (the CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16:
        if key in name:
            return peak
    return None


def count_flops(fn: Callable[[], None]) -> int:
    """Total FLOPs that ``fn()`` executes (forward and backward ops alike)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    """Peak allocated memory since the last reset (CUDA), or the process's max RSS (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:  # pragma: no cover - non-POSIX
        return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
