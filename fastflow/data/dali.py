"""``data.loader=dali``: NVIDIA DALI decodes and resizes (on the GPU with ``device="mixed"``).

The order and flips come from the same :class:`~fastflow.data.loaders.ShardPlan` as every other
loader: an ``external_source`` is fed the encoded file bytes and mirror bits of each planned
batch, so the position/``state_dict`` semantics are those of the other loaders. Pixels can
differ by a few levels from the PIL path (DALI's resampling). Geometry: resize so the shorter
side is ``image_size`` (antialiased), then center-crop, like the PIL path.

Optional dependency (``pip install nvidia-dali-cuda130``, part of the ``dev`` extra on x86_64);
without it, constructing :class:`DaliLoader` raises ``ImportError`` saying so. The test suite runs
DALI's CPU decoder against the PIL path (same order and flips, pixels within a few levels) and
resume; the GPU (``mixed``) decoder is not tested (the lent GPU machine has no DALI).

An undecodable file stops the pipeline (DALI cannot substitute one image of a batch): the error
names the files of the batches in flight that PIL cannot decode either. ``data.on_bad_image=skip``
is refused with this loader; prepare the folder with ``--on-bad-image skip`` or use
``data.loader=torch``.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .datasets import BadImageError, ImageDataset, ImageFolderDataset, decode_image_file
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
        if dataset.on_bad_image != "error":
            raise ValueError(
                "data.on_bad_image=skip does not work with data.loader=dali (DALI cannot replace one image "
                "of a batch): prepare the folder with `python -m fastflow.data.prepare SRC DST.npy "
                "--on-bad-image skip`, or use data.loader=torch"
            )
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
        # Index batches handed to DALI and not yet returned (its prefetch queue holds a few).
        self._in_flight: Deque[np.ndarray] = collections.deque(maxlen=8)

    def _batches(self) -> Iterator[Tuple[List[np.ndarray], List[np.ndarray]]]:
        plan, (epoch, batch) = self.plan.copy(), (self.epoch, self.batch_in_epoch)
        while True:
            indices, flips = plan.batch(epoch, batch)
            self._in_flight.append(indices)
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
                adjust_orientation=True,  # EXIF orientation applied, as the PIL decoders do (upright)
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
        self._in_flight.clear()

    def _name_bad_files(self, error: Exception) -> None:
        """After a pipeline failure: raise BadImageError naming the in-flight files PIL cannot
        decode either (the pipeline is unusable after the error; the next call rebuilds it)."""
        self._pipe = None
        bad = []
        for indices in list(self._in_flight):
            for i in indices.tolist():
                try:
                    decode_image_file(self.dataset.files[i], self.dataset.image_size, self.dataset.channels)
                except BadImageError as exc:
                    bad.append(str(exc))
        self._in_flight.clear()
        if bad:
            raise BadImageError(
                f"DALI stopped at an undecodable file under {self.dataset.root}: {'; '.join(sorted(set(bad)))} "
                f"(remove it, or prepare the folder with --on-bad-image skip)") from error

    def __next__(self) -> Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            (output,) = self._pipe.run()
        except RuntimeError as exc:
            self._name_bad_files(exc)
            raise
        dense = output.as_tensor()
        images = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.device.type == "cuda":
            feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            feed_ndarray(dense, images)
        self._advance()
        return uint8_to_float(images)
