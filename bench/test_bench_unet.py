"""UNet forward (no grad, as in sampling) and forward+backward: eager vs torch.compile, reference vs
fused ops. Reports img/s, TFLOP/s, MFU and (fwd_bwd) peak memory in ``extra_info``.

On the CPU the fused path runs the C++ extension when it is built, else the reference with a
warning (``extra_info['fused_backend']`` says which ran).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import torch

from bench import utils


def _build(bench_ctx: Any, fused: bool):
    from fastflow.models import create_model_from_config

    config = bench_ctx.config("flow_matching")
    torch.manual_seed(0)
    model = create_model_from_config(config).to(bench_ctx.device)
    model.set_fused_kernels(fused)
    d = config.data
    gen = torch.Generator(device=bench_ctx.device).manual_seed(0)
    x = torch.randn(config.training.batch_size, d.channels, d.image_size, d.image_size,
                    device=bench_ctx.device, generator=gen)
    t = torch.rand(config.training.batch_size, device=bench_ctx.device, generator=gen) * 999
    return config, model, x, t


def _fused_backend(device: torch.device, fused: bool) -> str:
    if not fused:
        return "reference"
    from fastflow import ops

    return ops.fused_backend_for(device)


@pytest.mark.parametrize("mode", ["eager", pytest.param("compile", marks=pytest.mark.compile)])
@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_unet(benchmark: Any, bench_ctx: Any, pass_: str, impl: str, mode: str) -> None:
    if mode == "compile":
        # CPU (auto): only fwd_bwd-reference compiles; a cold compile costs 1-5 min on 2 busy cores.
        bench_ctx.require_compile(heavy=impl == "fused" or pass_ == "fwd")
    benchmark.group = f"unet-{pass_}"
    device = bench_ctx.device
    config, model, x, t = _build(bench_ctx, fused=impl == "fused")
    runner = torch.compile(model) if mode == "compile" else model
    autocast = lambda: utils.autocast_for(device)  # noqa: E731

    def forward(net: Callable) -> None:
        with torch.no_grad(), autocast():
            net(x, t)

    def forward_backward(net: Callable) -> None:
        with autocast():
            out = net(x, t)
        out.float().square().mean().backward()

    body = forward if pass_ == "fwd" else forward_backward

    def run() -> None:
        body(runner)
        if pass_ == "fwd_bwd":
            model.zero_grad(set_to_none=True)
        utils.sync(device)

    start = time.perf_counter()
    run()  # compiles in compile mode
    first_call_s = time.perf_counter() - start
    flops = utils.count_flops(body, model)
    model.zero_grad(set_to_none=True)
    peak_mem = None
    if pass_ == "fwd_bwd":
        with utils.peak_memory(device) as peak_mem:
            run()
    benchmark.pedantic(run, rounds=bench_ctx.rounds, warmup_rounds=bench_ctx.warmup_rounds, iterations=1)
    utils.fill_extra_info(
        benchmark, device=device, info=bench_ctx.info, images_per_step=config.training.batch_size,
        flops_per_step=flops, peak_mem=peak_mem, bench_size=bench_ctx.size, mode=mode,
        fused_backend=_fused_backend(device, impl == "fused"), first_call_s=round(first_call_s, 3),
        num_parameters=sum(p.numel() for p in model.parameters()),
        autocast="bf16" if device.type == "cuda" else "off",
    )
