"""fastflow's data: datasets, sharded resumable loaders, pixel-range helpers.

Public API
----------
Pixel ranges (:mod:`.transforms`): model space ``[-1, 1]`` is every helper's default input.

- ``normalize(x)`` ``[0,1] -> [-1,1]``; ``unnormalize(x)`` ``[-1,1] -> [0,1]`` (clamped);
  ``uint8_to_float(x)`` ``{0..255} -> [-1,1]``
- ``make_grid(images, nrow=8, padding=2, pad_value=-1.0)`` (values copied: ``[-1,1]`` in and out)
- ``save_image(tensor, path, nrow=None, *, value_range=(-1, 1))`` -> PNG via PIL
- ``to_uint8_nhwc(x, value_range=(-1, 1))`` -> numpy ``(N, H, W, C)`` uint8 for ``.npz`` export

Datasets (:mod:`.datasets`): ``ImageFolderDataset``, ``HubDataset``, ``ArrayDataset``,
``DigitsDataset``, ``create_dataset_from_config(config, split="train")``.

Loaders (:mod:`.loaders`): ``create_dataloader_from_config(config, *, rank, world_size, seed,
drop_last, device, ...)`` -> an infinite iterator of float32 ``(B, C, S, S)`` batches in
``[-1, 1]`` with ``state_dict()`` / ``load_state_dict()``; ``ResumableDataLoader`` (torch),
``DeviceCachedLoader`` (gpu_cache), ``ShardPlan`` / ``epoch_plan`` (the shared order).

``prepare_folder(src, dst, image_size)`` (:mod:`.prepare`, also ``python -m fastflow.data.prepare``)
writes a folder once as a ``.npy`` with a manifest; ``check_prepared(dst)`` says if it is stale.
"""

from .datasets import (
    ArrayDataset,
    BadImageError,
    DatasetUnavailableError,
    DigitsDataset,
    HubDataset,
    ImageDataset,
    ImageFolderDataset,
    create_dataset_from_config,
)
from .loaders import (
    DeviceCachedLoader,
    ResumableDataLoader,
    ShardPlan,
    build_uint8_cache,
    create_dataloader_from_config,
    epoch_plan,
)
from .transforms import make_grid, normalize, save_image, to_uint8_nhwc, uint8_to_float, unnormalize

__all__ = [
    "normalize",
    "unnormalize",
    "uint8_to_float",
    "make_grid",
    "save_image",
    "to_uint8_nhwc",
    "ImageDataset",
    "ImageFolderDataset",
    "HubDataset",
    "ArrayDataset",
    "DigitsDataset",
    "BadImageError",
    "DatasetUnavailableError",
    "create_dataset_from_config",
    "ShardPlan",
    "epoch_plan",
    "ResumableDataLoader",
    "DeviceCachedLoader",
    "build_uint8_cache",
    "create_dataloader_from_config",
    "prepare_folder",
    "check_prepared",
]


def __getattr__(name):
    # Imported on first use, so that `python -m fastflow.data.prepare` runs the module fresh
    # (runpy warns when the package has already imported it).
    if name in ("prepare_folder", "check_prepared"):
        from . import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
