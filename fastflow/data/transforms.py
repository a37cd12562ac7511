"""Pixel-range conventions and image export helpers.

Two value ranges, one conversion each way:

- **model space** ``[-1, 1]``: what datasets/loaders yield and samplers return. Every helper
  here takes model-space tensors by default (``make_grid``, ``save_image``, ``to_uint8_nhwc``);
- **unit space** ``[0, 1]``: torchvision / TensorBoard's range. ``normalize`` maps unit space to
  model space, ``unnormalize`` back (clamped). Pass ``value_range=(0, 1)`` to the export helpers
  for unit-space input (the course's ``save_image(unnormalize(x), path)`` idiom needs it: without
  it a ``[0, 1]`` tensor is read as ``[-1, 1]`` and comes out washed out).

8-bit pixels ``p ∈ {0..255}`` enter model space through :func:`uint8_to_float` (``p / 127.5 - 1``,
exact at both ends) and leave it through :func:`to_uint8_nhwc` (rounded, clamped).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "normalize",
    "unnormalize",
    "uint8_to_float",
    "make_grid",
    "save_image",
    "to_uint8_nhwc",
]

ValueRange = Tuple[float, float]


def normalize(x: Tensor) -> Tensor:
    """``[0, 1] -> [-1, 1]``: ``2x - 1``. Any shape."""
    return x * 2.0 - 1.0


def unnormalize(x: Tensor) -> Tensor:
    """``[-1, 1] -> [0, 1]``: ``(x + 1) / 2``, clamped to ``[0, 1]`` (samples overshoot). Any shape."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def uint8_to_float(x: Tensor) -> Tensor:
    """uint8 pixels ``{0..255}`` -> float32 model space ``[-1, 1]`` (``p / 127.5 - 1``).

    The one conversion every loader uses, on whichever device ``x`` lives, so that loaders agree
    bit for bit.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"uint8_to_float expects a uint8 tensor, got {x.dtype}")
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def _to_unit(x: Tensor, value_range: ValueRange) -> Tensor:
    low, high = float(value_range[0]), float(value_range[1])
    if high <= low:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    x = x.detach().to(torch.float32)
    if (low, high) != (0.0, 1.0):
        x = (x - low) / (high - low)
    return x.clamp(0.0, 1.0)


def make_grid(
    images: Tensor,
    nrow: Optional[int] = 8,
    padding: int = 2,
    pad_value: float = -1.0,
) -> Tensor:
    """Tile a batch ``(B, C, H, W)`` into one image ``(C, rows*(H+p)+p, nrow*(W+p)+p)``.

    Values are copied unchanged, so the grid is in the input's range: model space ``[-1, 1]``
    by default, with black (``pad_value=-1``) borders; for ``[0, 1]`` input pass ``pad_value=0``.
    ``nrow`` images per row (``None``: a square-ish grid, ``ceil(sqrt(B))``); ``padding`` pixels
    around every tile, like ``torchvision.utils.make_grid``. A single image ``(C, H, W)`` is a
    one-tile grid.
    """
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise ValueError(f"make_grid expects (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if b == 0:
        raise ValueError("make_grid got an empty batch")
    if nrow is None:
        nrow = math.ceil(math.sqrt(b))
    ncol = min(max(int(nrow), 1), b)
    nrows = math.ceil(b / ncol)
    grid = images.new_full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for k in range(b):
        r, col = divmod(k, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def to_uint8_nhwc(x: Tensor, value_range: ValueRange = (-1.0, 1.0)) -> np.ndarray:
    """Images ``(N, C, H, W)`` (or ``(C, H, W)``) -> numpy ``(N, H, W, C)`` uint8, for ``.npz``
    export (the layout FID/IS tools read).

    ``value_range`` is the input's range (default model space ``[-1, 1]``; ``(0, 1)`` for
    unnormalized input); values are clamped to it, then rounded: ``floor(255 u + 0.5)``.
    """
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"to_uint8_nhwc expects (N, C, H, W), got shape {tuple(x.shape)}")
    u = _to_unit(x, value_range)
    return u.mul(255.0).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_image(
    tensor: Tensor,
    path: Union[str, os.PathLike],
    nrow: Optional[int] = None,
    *,
    value_range: ValueRange = (-1.0, 1.0),
    padding: int = 2,
) -> Path:
    """Write a batch ``(B, C, H, W)`` as one PNG grid (or one image ``(C, H, W)``) via PIL.

    ``tensor`` is in ``value_range``: model space ``[-1, 1]`` by default (samples as they come
    out of a sampler); ``value_range=(0, 1)`` for ``unnormalize``-d input. ``nrow`` images per
    row; ``None`` makes a square-ish grid; black borders of ``padding`` pixels. C=1 writes a
    grayscale PNG, C=3 RGB. Parent folders are created. Returns the path written.
    """
    if tensor.dim() not in (3, 4):
        raise ValueError(f"save_image expects (B, C, H, W) or (C, H, W), got shape {tuple(tensor.shape)}")
    if tensor.shape[-3] not in (1, 3):
        raise ValueError(f"save_image writes 1- or 3-channel images, got {tensor.shape[-3]} channels")
    unit = _to_unit(tensor, value_range)
    if unit.dim() == 4 and unit.shape[0] == 1:
        unit = unit[0]
    grid = unit if unit.dim() == 3 else make_grid(unit, nrow=nrow, padding=padding, pad_value=0.0)
    array = to_uint8_nhwc(grid, value_range=(0.0, 1.0))[0]
    mode = "L" if array.shape[-1] == 1 else "RGB"
    image = Image.fromarray(array[..., 0] if mode == "L" else array, mode=mode)
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _check_channels(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


def pil_to_uint8(image: Image.Image, image_size: int, channels: int) -> Tensor:
    """A decoded PIL image -> uint8 tensor ``(C, image_size, image_size)``.

    Mode: converted to RGB (channels=3) or L (channels=1); alpha is dropped (palette images with
    transparency go through RGBA first); 16-bit greyscale is scaled to 8 bits, 32-bit integer and
    float images are refused (no defined range). Geometry: a non-square image is center-cropped to its
    shorter side, then resized with PIL's bicubic filter (antialiased when shrinking) if its side
    differs from ``image_size``.
    """
    mode = _check_channels(channels)
    if image.mode.startswith("I;16"):
        # 16-bit greyscale (PNG): PIL's convert("L"/"RGB") clips at 255, which turns nearly every
        # pixel white. Scale 0..65535 to 0..255 (rounded; 257·k -> k exactly) instead.
        wide = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        raise ValueError(
            f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} image (PIL mode {image.mode}): "
            f"its value range is not defined; convert it to 8- or 16-bit first")
    if image.mode != mode:
        if image.mode in ("P", "PA", "LA") or "transparency" in image.info:
            image = image.convert("RGBA")
        image = image.convert(mode)
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size[0] != image_size:
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
