"""Data loader throughput over the built-in digits dataset (no files, no downloads).

Loaders (``data.loader``): ``torch`` with 0 and 2 worker processes (decode + flip in workers,
[-1, 1] conversion and the copy to the device in the main process) and ``gpu_cache`` (the whole
uint8 dataset resident on the device; one gather + flip + normalise per batch). One round draws
``BATCHES`` batches of 128 from a running loader and ends with the batch on the bench device.
"""

from __future__ import annotations

from typing import Any

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


@pytest.mark.parametrize("loader, num_workers", [
    pytest.param("torch", 0, id="torch-w0"),
    pytest.param("torch", 2, id="torch-w2"),
    pytest.param("gpu_cache", 0, id="gpu_cache"),
])
def test_loader_throughput(benchmark: Any, bench_ctx: Any, loader: str, num_workers: int) -> None:
    if create_dataloader_from_config is None:
        pytest.skip(f"fastflow.data.create_dataloader_from_config is not importable yet: {_IMPORT_ERROR}")
    benchmark.group = "data"
    device = bench_ctx.device
    image_size = 64 if bench_ctx.size == "default" else 32
    config = bench_ctx.config(overrides=[
        "data.dataset=digits", f"data.image_size={image_size}", f"data.loader={loader}",
        f"data.num_workers={num_workers}", f"data.pin_memory={str(device.type == 'cuda').lower()}",
        "data.augment=true", f"training.batch_size={BATCH_SIZE}",
    ])
    batches = create_dataloader_from_config(config, device=device)
    iterator = iter(batches)

    def run() -> None:
        batch = None
        for _ in range(BATCHES):
            batch = next(iterator)
        batch = batch.to(device, non_blocking=True)
        utils.sync(device)

    run()  # worker start-up, cache upload
    benchmark.pedantic(run, rounds=bench_ctx.rounds, warmup_rounds=1, iterations=1)
    utils.fill_extra_info(
        benchmark, device=device, info=bench_ctx.info, images_per_step=BATCHES * BATCH_SIZE,
        loader=loader, num_workers=num_workers, image_size=image_size, dataset="digits",
        batches_per_epoch=getattr(batches, "batches_per_epoch", None),
    )
