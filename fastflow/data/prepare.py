"""Prepare an image folder once into a uint8 ``.npy`` array (the fast local format).

``data.root=<file>.npy`` then loads it memory-mapped (:class:`~fastflow.data.datasets.ArrayDataset`):
no decoding at start-up or per batch, and the ``gpu_cache`` loader uploads it directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .datasets import ImageFolderDataset
from .loaders import build_uint8_cache

__all__ = ["prepare_folder"]


def prepare_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    image_size: int = 64,
    channels: int = 3,
    *,
    num_workers: int = 0,
    on_bad_image: str = "error",
) -> Path:
    """Decode every image under ``src`` (as :class:`ImageFolderDataset` does: sorted, center crop,
    bicubic resize) into ``dst`` (``.npy``, uint8 ``(N, S, S, C)``), written atomically.

    ``on_bad_image='skip'`` leaves unreadable files out (and warns); ``'error'`` stops at the
    first, naming it. Returns ``dst``.
    """
    dst = Path(dst).expanduser()
    if dst.suffix != ".npy":
        raise ValueError(f"prepare_folder writes a .npy file, got {dst}")
    dataset = ImageFolderDataset(src, image_size, channels, augment=False, on_bad_image=on_bad_image)
    cache = build_uint8_cache(dataset, num_workers=num_workers)
    keep = [i for i, path in enumerate(dataset.files) if str(path) not in dataset.bad_files]
    if len(keep) < len(dataset):
        cache = cache[keep]
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial.npy")
    np.save(partial, cache.permute(0, 2, 3, 1).contiguous().numpy())
    os.replace(partial, dst)
    return dst
