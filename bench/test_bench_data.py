"""Data loader throughput: the built-in digits dataset (in memory) and a folder of JPEG files.

Loaders (``data.loader``): ``torch`` with 0 and 2 worker processes (decode + flip in workers,
[-1, 1] conversion and the copy to the device in the main process) and ``gpu_cache`` (the whole
uint8 dataset resident on the device; one gather + flip + normalise per batch). One round draws
``BATCHES`` batches of 128 from a running loader and ends with the batch on the bench device.

``test_folder_decode_throughput``: 512 JPEGs of 128×128 (the built-in digits, upscaled and tinted,
written once per session) decoded and resized to the bench size by PIL in 0 / 2 torch workers and
by DALI (2 threads; its CPU decoder here, ``mixed`` GPU decoding on CUDA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import utils

BATCHES = 8
BATCH_SIZE = 128

try:
    from fastflow.data import create_dataloader_from_config
    _IMPORT_ERROR = None
except ImportError as exc:  # fastflow.data is written concurrently; the lead checks this skip
    create_dataloader_from_config = None
    _IMPORT_ERROR = exc


def _bench_loader(benchmark: Any, bench_ctx: Any, data_overrides: list, *, loader: str, num_workers: int,
                  batches: int, dataset: str) -> None:
    """Time ``batches`` batches of BATCH_SIZE from a running loader, ending with one on the device."""
    if create_dataloader_from_config is None:
        pytest.skip(f"fastflow.data.create_dataloader_from_config is not importable yet: {_IMPORT_ERROR}")
    device = bench_ctx.device
    image_size = 64 if bench_ctx.size == "default" else 32
    config = bench_ctx.config(overrides=[
        *data_overrides, f"data.image_size={image_size}", f"data.loader={loader}",
        f"data.num_workers={num_workers}", f"data.pin_memory={str(device.type == 'cuda').lower()}",
        "data.augment=true", f"training.batch_size={BATCH_SIZE}",
    ])
    running = create_dataloader_from_config(config, device=device)
    iterator = iter(running)

    def run() -> None:
        batch = None
        for _ in range(batches):
            batch = next(iterator)
        batch = batch.to(device, non_blocking=True)
        utils.sync(device)

    run()  # worker / pipeline start-up, cache upload
    benchmark.pedantic(run, rounds=bench_ctx.rounds, warmup_rounds=1, iterations=1)
    utils.fill_extra_info(
        benchmark, device=device, info=bench_ctx.info, images_per_step=batches * BATCH_SIZE,
        loader=loader, num_workers=num_workers, image_size=image_size, dataset=dataset,
        batches_per_epoch=getattr(running, "batches_per_epoch", None),
    )


@pytest.mark.parametrize("loader, num_workers", [
    pytest.param("torch", 0, id="torch-w0"),
    pytest.param("torch", 2, id="torch-w2"),
    pytest.param("gpu_cache", 0, id="gpu_cache"),
])
def test_loader_throughput(benchmark: Any, bench_ctx: Any, loader: str, num_workers: int) -> None:
    benchmark.group = "data"
    _bench_loader(benchmark, bench_ctx, ["data.dataset=digits"], loader=loader, num_workers=num_workers,
                  batches=BATCHES, dataset="digits")


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory: Any) -> Path:
    from PIL import Image

    from fastflow.data import DigitsDataset

    root = tmp_path_factory.mktemp("jpegs")
    digits = DigitsDataset(image_size=128, channels=3, augment=False).as_uint8_tensor()
    tint = np.random.default_rng(0).uniform(0.6, 1.0, (512, 1, 1, 3))
    for i in range(512):
        pixels = (digits[i % len(digits)].permute(1, 2, 0).numpy() * tint[i]).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:04d}.jpg", quality=90)
    return root


@pytest.mark.parametrize("loader, num_workers", [
    pytest.param("torch", 0, id="torch-w0"),
    pytest.param("torch", 2, id="torch-w2"),
    pytest.param("dali", 2, id="dali-t2"),
])
def test_folder_decode_throughput(benchmark: Any, bench_ctx: Any, jpeg_folder: Path, loader: str,
                                  num_workers: int) -> None:
    if loader == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (pip install nvidia-dali-cuda130)")
    benchmark.group = "data-folder"
    _bench_loader(benchmark, bench_ctx, ["data.dataset=folder", f"data.root={jpeg_folder}"], loader=loader,
                  num_workers=num_workers, batches=BATCHES // 2, dataset="jpeg-folder-128")
