"""``data.loader=dali``: NVIDIA DALI decodes and resizes (on the GPU with ``device="mixed"``).

The order and flips come from the same :class:`~fastflow.data.loaders.ShardPlan` as every other
loader: an ``external_source`` is fed the encoded file bytes and mirror bits of each planned
batch, so the position/``state_dict`` semantics are those of the other loaders. Pixels can
differ by a few levels from the PIL path (DALI's resampling). Geometry: resize so the shorter
side is ``image_size`` (antialiased), then center-crop, like the PIL path.

Optional dependency (``pip install nvidia-dali-cuda130``); without it, constructing
:class:`DaliLoader` raises ``ImportError`` saying so. Experimental: not exercised by the test
suite where DALI is not installed (it is not, on the project's dev machines by default).
"""

from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .datasets import ImageDataset, ImageFolderDataset
from .loaders import Device, ShardPlan, _ResumableLoader
from .transforms import uint8_to_float

__all__ = ["DaliLoader", "dali_available"]

_MISSING = (
    "data.loader=dali needs NVIDIA DALI, which is not installed (pip install nvidia-dali-cuda130); "
    "use data.loader=torch or data.loader=gpu_cache instead"
)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _import_dali() -> Any:
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return dali


class DaliLoader(_ResumableLoader):
    """DALI-decoded batches of an :class:`ImageFolderDataset`; float32 ``[-1, 1]`` on ``device``."""

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_threads: int = 4,
        device: Device = None,
    ):
        self._dali = _import_dali()
        if not isinstance(dataset, ImageFolderDataset):
            raise ValueError("data.loader=dali reads image files: use data.dataset=folder/celeba with data.root")
        super().__init__(ShardPlan(
            len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
            augment=dataset.augment, drop_last=drop_last,
        ))
        self.dataset = dataset
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.num_threads = num_threads
        self._pipe: Optional[Any] = None

    def _batches(self) -> Iterator[Tuple[List[np.ndarray], List[np.ndarray]]]:
        plan, (epoch, batch) = self.plan.copy(), (self.epoch, self.batch_in_epoch)
        while True:
            indices, flips = plan.batch(epoch, batch)
            encoded = [np.fromfile(self.dataset.files[i], dtype=np.uint8) for i in indices.tolist()]
            yield encoded, [np.array(int(f), dtype=np.int32) for f in flips.tolist()]
            batch += 1
            if batch == plan.batches_per_epoch:
                epoch, batch = epoch + 1, 0

    def _build(self) -> Any:
        dali = self._dali
        fn, types = dali.fn, dali.types
        on_gpu = self.device.type == "cuda"
        stream = self._batches()
        size = self.dataset.image_size

        @dali.pipeline_def(
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=(self.device.index or 0) if on_gpu else None, prefetch_queue_depth=2,
        )
        def pipeline():
            encoded, mirror = fn.external_source(source=lambda: next(stream), num_outputs=2, batch=True)
            images = fn.decoders.image(
                encoded, device="mixed" if on_gpu else "cpu",
                output_type=types.GRAY if self.dataset.channels == 1 else types.RGB,
            )
            images = fn.resize(images, size=[size, size], mode="not_smaller", antialias=True)
            return fn.crop_mirror_normalize(
                images, crop=[size, size], mirror=mirror, dtype=types.UINT8, output_layout="CHW",
            )

        pipe = pipeline()
        if hasattr(pipe, "build"):
            pipe.build()
        return pipe

    def _reset(self) -> None:
        self._pipe = None

    def __next__(self) -> Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        (output,) = self._pipe.run()
        dense = output.as_tensor()
        images = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.device.type == "cuda":
            feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            feed_ndarray(dense, images)
        self._advance()
        return uint8_to_float(images)
