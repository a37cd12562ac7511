"""Infinite, sharded, exactly resumable batch loaders.

All loaders share one plan (:class:`ShardPlan`): for epoch ``e`` a permutation of the ``N``
samples and a flip bit per position are drawn from ``numpy.random.default_rng([seed, e])`` —
the same on every rank — then trimmed to a multiple of ``world_size`` (``drop_last``; or padded
by wrapping, like ``DistributedSampler``) and dealt round-robin: rank ``r`` takes positions
``r, r + W, r + 2W, ...``. Its shard is cut into batches of ``batch_size`` (the last partial batch
dropped when ``drop_last``). Every rank therefore has the same number of batches per epoch, and a
batch is a pure function of ``(seed, epoch, batch index, rank, world_size)``.

A loader's position is ``(epoch, batch_in_epoch)``: the next batch it will return. Its
``state_dict()`` holds that position (plus the plan's parameters, checked on load), so a loader
restored with ``load_state_dict()`` returns exactly the batches an uninterrupted one would have,
flips included. Ranks move in lockstep, so rank 0's state serves every rank.

Loaders (``data.loader``):

- ``torch`` (:class:`ResumableDataLoader`): a ``torch.utils.data.DataLoader`` over the plan's
  index stream; workers decode and flip uint8 images; the main process converts to
  ``[-1, 1]`` float32 (on ``device`` when given, after a pinned non-blocking copy).
- ``gpu_cache`` (:class:`DeviceCachedLoader`): the whole dataset as a uint8 ``(N, C, S, S)``
  tensor on the device (CelebA-64: 2.5 GB); each batch is one ``index_select`` plus flip and
  normalisation on the device, no host work besides uploading the epoch's plan once per epoch.
- ``dali``: :mod:`fastflow.data.dali` (needs NVIDIA DALI).

Both yield float32 ``(B, C, S, S)`` in ``[-1, 1]``; given the same uint8 images they yield the
same batches bit for bit.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .datasets import ImageDataset, create_dataset_from_config, warn_skipped
from .transforms import uint8_to_float

__all__ = [
    "ShardPlan",
    "epoch_plan",
    "ResumableDataLoader",
    "DeviceCachedLoader",
    "build_uint8_cache",
    "create_dataloader_from_config",
    "LOADER_BUILDERS",
]

Device = Union[str, torch.device, None]


# ------------------------------------------------------------------------------------- plan
def epoch_plan(
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    augment: bool = False,
    drop_last: bool = True,
) -> Tuple[np.ndarray, np.ndarray]:
    """Rank ``rank``'s sample indices (int64) and flip bits (bool) for ``epoch``, in order."""
    rng = np.random.default_rng([seed % 2**63, epoch])
    order = rng.permutation(num_samples) if shuffle else np.arange(num_samples)
    flips = rng.random(num_samples) < 0.5 if augment else np.zeros(num_samples, dtype=bool)
    if drop_last:
        usable = (num_samples // world_size) * world_size
        order, flips = order[:usable], flips[:usable]
    else:
        pad = (-num_samples) % world_size
        if pad:
            order = np.concatenate([order, np.resize(order, pad)])
            flips = np.concatenate([flips, np.resize(flips, pad)])
    return order[rank::world_size].astype(np.int64), flips[rank::world_size]


class ShardPlan:
    """The batches one rank sees: see the module docstring. Caches the latest epoch's plan."""

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = True,
    ):
        if num_samples <= 0:
            raise ValueError("cannot build a loader over an empty dataset")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.drop_last = bool(drop_last)
        if drop_last:
            self.shard_size = num_samples // world_size
            self.batches_per_epoch = self.shard_size // batch_size
        else:
            self.shard_size = math.ceil(num_samples / world_size)
            self.batches_per_epoch = math.ceil(self.shard_size / batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} samples give each of {world_size} rank(s) {self.shard_size}, fewer than "
                f"one batch of {batch_size} (drop_last): lower training.batch_size or use more data"
            )
        self._cached: Optional[Tuple[int, np.ndarray, np.ndarray]] = None

    def epoch(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        if self._cached is None or self._cached[0] != epoch:
            indices, flips = epoch_plan(
                self.num_samples, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                shuffle=self.shuffle, augment=self.augment, drop_last=self.drop_last,
            )
            self._cached = (epoch, indices, flips)
        return self._cached[1], self._cached[2]

    def batch(self, epoch: int, batch: int) -> Tuple[np.ndarray, np.ndarray]:
        indices, flips = self.epoch(epoch)
        window = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        return indices[window], flips[window]

    def params(self) -> Dict[str, Any]:
        return {
            "num_samples": self.num_samples, "batch_size": self.batch_size, "seed": self.seed,
            "world_size": self.world_size, "shuffle": self.shuffle, "augment": self.augment,
            "drop_last": self.drop_last,
        }

    def copy(self) -> "ShardPlan":
        return ShardPlan(rank=self.rank, **self.params())


# ------------------------------------------------------------------------------ base loader
# The config key behind each plan parameter (shuffle and drop_last are the caller's arguments).
_PLAN_CONFIG_KEYS = {"batch_size": "training.batch_size", "seed": "infrastructure.seed", "augment": "data.augment"}


def _restore_hint(param: str, saved: Any) -> str:
    """What to set back for a plan parameter that differs from the checkpoint's."""
    if param == "num_samples":
        return f"the dataset under data.root to its {saved} images"
    value = str(saved).lower() if isinstance(saved, bool) else saved  # as a key=value override takes it
    return f"{_PLAN_CONFIG_KEYS.get(param, param)}={value}"


class _ResumableLoader:
    """Position bookkeeping, state dict and the infinite-iterator protocol."""

    def __init__(self, plan: ShardPlan):
        self.plan = plan
        self.epoch = 0
        self.batch_in_epoch = 0

    # position ------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def __len__(self) -> int:
        """Batches per epoch (iteration itself never ends)."""
        return self.plan.batches_per_epoch

    @property
    def fingerprint(self) -> Optional[str]:
        """The dataset's fingerprint (which files, in which order), for comparing ranks; None for
        a loader over bare tensors."""
        dataset = getattr(self, "dataset", None)
        return dataset.fingerprint if dataset is not None else None

    @property
    def batches_seen(self) -> int:
        """Batches this rank has returned since the start of training."""
        return self.epoch * self.plan.batches_per_epoch + self.batch_in_epoch

    @property
    def images_seen(self) -> int:
        """Images all ranks together have returned (exact with drop_last)."""
        return self.batches_seen * self.plan.batch_size * self.plan.world_size

    def _advance(self) -> None:
        self.batch_in_epoch += 1
        if self.batch_in_epoch == self.plan.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0

    def state_dict(self) -> Dict[str, Any]:
        """Plain ints/bools (safe for ``torch.load(weights_only=True)``): the position of the
        next batch plus the plan parameters it is only valid for."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self.plan.params()}

    def load_state_dict(self, state: Dict[str, Any], strict: bool = True) -> None:
        """Resume at ``state``'s position. ``strict``: the plan (dataset size, batch size, world
        size, seed, shuffle/augment/drop_last) must match, else ``ValueError``. Non-strict: the
        epoch is kept and the in-epoch position rescaled by samples seen (not exact)."""
        ours = self.plan.params()
        differ = {k: (state.get(k), v) for k, v in ours.items() if state.get(k) != v}
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if differ:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in differ.items())
            if strict:
                restore = ", ".join(_restore_hint(k, a) for k, (a, _) in differ.items() if k != "world_size")
                raise ValueError(
                    f"data loader state does not fit this loader ({detail}); to resume exactly, set back "
                    f"{restore or 'the world size'}; a change of world size is the only change resumed "
                    f"approximately")
            warnings.warn(f"data loader resumed approximately ({detail})", RuntimeWarning, stacklevel=2)
            seen = batch * int(state.get("batch_size", self.batch_size)) * int(state.get("world_size", 1))
            batch = min(seen // (self.batch_size * self.plan.world_size), self.plan.batches_per_epoch - 1)
        if not 0 <= batch < self.plan.batches_per_epoch or epoch < 0:
            raise ValueError(f"data loader state position (epoch {epoch}, batch {batch}) is out of range "
                             f"for {self.plan.batches_per_epoch} batches per epoch")
        self._reset()
        self.epoch, self.batch_in_epoch = epoch, batch

    def _reset(self) -> None:
        """Drop anything prefetched for the old position."""

    # iteration -----------------------------------------------------------------------------
    def __iter__(self) -> "_ResumableLoader":
        return self

    def __next__(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def next_batch(self) -> Tensor:
        return self.__next__()

    def close(self) -> None:
        self._reset()


# ------------------------------------------------------------------------------ torch loader
class _PlanBatchSampler:
    """Infinite stream of batches ``[(index, flip), ...]`` starting at a position."""

    def __init__(self, plan: ShardPlan, epoch: int, batch: int):
        self.plan, self.start = plan, (epoch, batch)

    def __iter__(self):
        epoch, batch = self.start
        while True:
            indices, flips = self.plan.batch(epoch, batch)
            yield list(zip(indices.tolist(), flips.tolist()))
            batch += 1
            if batch == self.plan.batches_per_epoch:
                epoch, batch = epoch + 1, 0


class _WorkerView(Dataset):
    """What DataLoader workers see: ``(index, flip)`` -> (uint8 image, newly found bad files)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, bool]) -> Tuple[Tensor, Tuple[str, ...]]:
        index, flip = item
        image, bad = self.dataset.load_with_report(int(index))
        return (image.flip(-1) if flip else image), bad


def _collate(items: Sequence[Tuple[Tensor, Tuple[str, ...]]]) -> Tuple[Tensor, Tuple[str, ...]]:
    return torch.stack([image for image, _ in items]), tuple(name for _, names in items for name in names)


class _SkipReporter:
    """Collects unreadable files reported by workers into ``dataset.bad_files`` and warns."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset
        self.seen: set = set()

    def note(self, names: Sequence[str]) -> None:
        new = [n for n in names if n not in self.seen]
        if not new:
            return
        before = len(self.seen)
        self.seen.update(new)
        self.dataset.bad_files.update(new)
        warn_skipped(before, len(self.seen), new, self.dataset.source)


def _as_device(device: Device) -> Optional[torch.device]:
    return None if device is None else torch.device(device)


class ResumableDataLoader(_ResumableLoader):
    """``data.loader=torch``: DataLoader workers decode; infinite; sharded; exactly resumable.

    Yields float32 ``(B, C, S, S)`` in ``[-1, 1]`` on ``device`` (CPU when None). ``num_workers=0``
    loads in this process. ``pin_memory`` applies only when ``device`` is CUDA.
    """

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
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        device: Device = None,
    ):
        super().__init__(ShardPlan(
            len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
            augment=dataset.augment, drop_last=drop_last,
        ))
        self.dataset = dataset
        self.device = _as_device(device)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory) and self.device is not None and self.device.type == "cuda"
        self.prefetch_factor = prefetch_factor
        self._skips = _SkipReporter(dataset)
        self._iterator: Optional[Any] = None

    @property
    def num_skipped(self) -> int:
        return self.dataset.num_skipped

    def _make_iterator(self) -> Any:
        extra: Dict[str, Any] = {}
        if self.num_workers > 0:
            extra["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(
            _WorkerView(self.dataset),
            batch_sampler=_PlanBatchSampler(self.plan.copy(), self.epoch, self.batch_in_epoch),
            num_workers=self.num_workers,
            collate_fn=_collate,
            pin_memory=self.pin_memory,
            **extra,
        )
        return iter(loader)

    def _reset(self) -> None:
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:  # now, not whenever a reference cycle happens to be collected
            shutdown()

    def __next__(self) -> Tensor:
        if self._iterator is None:
            self._iterator = self._make_iterator()
        try:
            images, bad = next(self._iterator)
        except BaseException:
            self._reset()  # a worker error (e.g. BadImageError) ends this iterator; stop its workers
            raise
        if bad:
            self._skips.note(bad)
        self._advance()
        if self.device is not None:
            images = images.to(self.device, non_blocking=self.pin_memory)
        return uint8_to_float(images)


# ------------------------------------------------------------------------------ device cache
def build_uint8_cache(
    dataset: ImageDataset,
    *,
    device: Device = None,
    num_workers: int = 0,
    chunk_size: int = 512,
) -> Tensor:
    """Decode the whole dataset once into uint8 ``(N, C, S, S)`` on ``device`` (CPU when None).

    Uses DataLoader workers for decoding and fills a preallocated tensor chunk by chunk (no
    second full-size host copy). Unreadable files follow ``dataset.on_bad_image`` (``skip``: the
    entry holds the substitute image, as in the ``torch`` loader).
    """
    fast = dataset.as_uint8_tensor()
    if fast is not None:
        return fast.to(device) if device is not None else fast
    n, size = len(dataset), dataset.image_size
    target = torch.device(device) if device is not None else torch.device("cpu")
    cache = torch.empty((n, dataset.channels, size, size), dtype=torch.uint8, device=target)
    reporter = _SkipReporter(dataset)
    chunks = [[(i, False) for i in range(start, min(start + chunk_size, n))] for start in range(0, n, chunk_size)]
    loader = DataLoader(
        _WorkerView(dataset), batch_sampler=chunks, num_workers=num_workers, collate_fn=_collate,
        pin_memory=target.type == "cuda",
    )
    start = 0
    for images, bad in loader:
        if bad:
            reporter.note(bad)
        cache[start : start + images.shape[0]].copy_(images, non_blocking=True)
        start += images.shape[0]
    return cache


class DeviceCachedLoader(_ResumableLoader):
    """``data.loader=gpu_cache``: the whole dataset resident on ``device`` as uint8.

    Batches are gathered, flipped and normalised on the device (no host work per batch, no
    sync). Same plan, same ``state_dict`` and the same batches as :class:`ResumableDataLoader`
    given the same uint8 images. Every rank holds the full dataset (sharding is by index), so on
    several GPUs prefer a prepared ``.npy`` (``prepare_folder``) over decoding on every rank.
    """

    def __init__(
        self,
        images: Tensor,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = True,
        device: Device = None,
        dataset: Optional[ImageDataset] = None,
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"DeviceCachedLoader needs uint8 (N, C, H, W) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        super().__init__(ShardPlan(
            images.shape[0], batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
            augment=augment, drop_last=drop_last,
        ))
        self.device = _as_device(device) or images.device
        self.images = images.to(self.device)
        self.dataset = dataset
        self._device_plan: Optional[Tuple[int, Tensor, Tensor]] = None

    @classmethod
    def from_dataset(
        cls,
        dataset: ImageDataset,
        *,
        batch_size: int,
        device: Device = None,
        num_workers: int = 0,
        **kwargs: Any,
    ) -> "DeviceCachedLoader":
        images = build_uint8_cache(dataset, device=device, num_workers=num_workers)
        return cls(images, batch_size=batch_size, augment=dataset.augment, device=device, dataset=dataset, **kwargs)

    @property
    def num_skipped(self) -> int:
        return self.dataset.num_skipped if self.dataset is not None else 0

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def _epoch_on_device(self, epoch: int) -> Tuple[Tensor, Tensor]:
        if self._device_plan is None or self._device_plan[0] != epoch:
            indices, flips = self.plan.epoch(epoch)
            self._device_plan = (
                epoch,
                torch.from_numpy(indices).to(self.device),
                torch.from_numpy(flips).to(self.device),
            )
        return self._device_plan[1], self._device_plan[2]

    def __next__(self) -> Tensor:
        indices, flips = self._epoch_on_device(self.epoch)
        window = slice(self.batch_in_epoch * self.batch_size, (self.batch_in_epoch + 1) * self.batch_size)
        images = uint8_to_float(self.images.index_select(0, indices[window]))
        if self.plan.augment:
            images = torch.where(flips[window].view(-1, 1, 1, 1), images.flip(-1), images)
        self._advance()
        return images


# ----------------------------------------------------------------------------------- config
def _default_device(device: Device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _make_torch(dataset: ImageDataset, data: Any, common: Dict[str, Any], device: Device) -> _ResumableLoader:
    return ResumableDataLoader(
        dataset, num_workers=data.num_workers, pin_memory=data.pin_memory, device=device, **common,
    )


def _make_gpu_cache(dataset: ImageDataset, data: Any, common: Dict[str, Any], device: Device) -> _ResumableLoader:
    return DeviceCachedLoader.from_dataset(
        dataset, device=_default_device(device), num_workers=data.num_workers, **common,
    )


def _make_dali(dataset: ImageDataset, data: Any, common: Dict[str, Any], device: Device) -> _ResumableLoader:
    from .dali import DaliLoader  # raises ImportError naming nvidia-dali when it is missing

    return DaliLoader(dataset, num_threads=max(1, data.num_workers), device=device, **common)


LOADER_BUILDERS: Dict[str, Callable[[ImageDataset, Any, Dict[str, Any], Device], _ResumableLoader]] = {
    "torch": _make_torch,
    "gpu_cache": _make_gpu_cache,
    "dali": _make_dali,
}


def create_dataloader_from_config(
    config: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: Optional[int] = None,
    drop_last: bool = True,
    device: Device = None,
    batch_size: Optional[int] = None,
    shuffle: bool = True,
    dataset: Optional[ImageDataset] = None,
    split: str = "train",
) -> _ResumableLoader:
    """The loader named by ``config.data.loader`` over ``config.data``'s dataset.

    Infinite iterator of float32 ``(B, C, S, S)`` batches in ``[-1, 1]``, ``B`` =
    ``batch_size`` or ``config.training.batch_size`` (per rank). ``seed`` defaults to
    ``config.infrastructure.seed`` and must be the same on every rank. ``device``: where batches
    are delivered (``torch``: CPU when None; ``gpu_cache``: CUDA when available, else CPU).
    Pass ``dataset`` to reuse one already built.
    """
    data = config.data
    if dataset is None:
        dataset = create_dataset_from_config(config, split=split)
    common = {
        "batch_size": int(batch_size if batch_size is not None else config.training.batch_size),
        "rank": rank,
        "world_size": world_size,
        "seed": int(seed if seed is not None else config.infrastructure.seed),
        "shuffle": shuffle,
        "drop_last": drop_last,
    }
    try:
        builder = LOADER_BUILDERS[data.loader]
    except KeyError:
        raise ValueError(f"data.loader={data.loader!r} is not one of {', '.join(LOADER_BUILDERS)}") from None
    return builder(dataset, data, common, device)
