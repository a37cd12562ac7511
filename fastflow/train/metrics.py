"""Throughput accounting: FLOPs per step (torch.utils.flop_counter), device peaks, MFU, memory."""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch

# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets. A key is a run of whole words of
# the lower-cased device name (words split at anything but letters and digits), tried in order,
# most specific first: "a100" matches "NVIDIA A100-SXM4-80GB" but not "NVIDIA RTX A1000", "a10"
# not "A10G". The one table: bench/utils.py uses it too.
PEAK_BF16_FLOPS = (
    ("h200 nvl", 835.0e12),  # PCIe card at 600 W (NVIDIA H200 NVL)
    ("h200", 989.4e12),      # SXM
    ("gh200", 989.4e12),     # Grace Hopper: the H200/H100 SXM tensor cores
    ("h100 nvl", 835.0e12),
    ("h100 pcie", 756.0e12),
    ("h100", 989.4e12),      # SXM
    ("a100", 312.0e12),
    ("l40s", 362.1e12),
    ("a10g", 70.0e12),
    ("a10", 125.0e12),
    ("rtx 4090", 165.2e12),
)


def _words(text: str) -> list:
    return re.findall(r"[a-z0-9]+", text.lower())


def peak_flops_for_name(name: str) -> Optional[float]:
    """The datasheet dense bf16 peak of a GPU by its name, or None where unknown."""
    words = _words(name)
    for key, peak in PEAK_BF16_FLOPS:
        key_words = _words(key)
        if any(words[i:i + len(key_words)] == key_words for i in range(len(words) - len(key_words) + 1)):
            return peak
    return None


def device_peak_flops(device: torch.device) -> Optional[float]:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (the CPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


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
