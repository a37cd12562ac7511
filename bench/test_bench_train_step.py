"""One training step per method: loss (bf16 autocast on CUDA) → backward → clip → AdamW → zero_grad.

Cases: ddpm, ddpm_x0, flow_matching and flow_map_matching with each ∂_t v backend (dual,
finite_difference, jvp), eager with the reference ops; flow_matching, fmm_dual and fmm_jvp also
with the fused ops (jvp through their forward-mode rules), the first two under torch.compile.
Reports img/s, TFLOP/s, MFU (FLOPs of loss + backward, counted on the reference ops) and peak
memory of a step in ``extra_info``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from bench import utils

EAGER = [pytest.param(case, "reference", "eager", id=f"{case}-reference-eager") for case in utils.TRAIN_CASES]
FUSED = [pytest.param(case, "fused", "eager", id=f"{case}-fused-eager") for case in ("flow_matching", "fmm_dual", "fmm_jvp")]
COMPILED = [
    pytest.param("flow_matching", "reference", "compile", id="flow_matching-reference-compile",
                 marks=pytest.mark.compile),
    pytest.param("fmm_dual", "reference", "compile", id="fmm_dual-reference-compile",
                 marks=[pytest.mark.compile, pytest.mark.slow]),
]


@pytest.mark.parametrize("case, impl, mode", EAGER + FUSED + COMPILED)
def test_train_step(benchmark: Any, bench_ctx: Any, case: str, impl: str, mode: str) -> None:
    if mode == "compile":
        bench_ctx.require_compile(heavy=True)
    benchmark.group = "train_step"
    method, derivative = utils.TRAIN_CASES[case]
    config = bench_ctx.config(method, derivative=derivative, fused=impl == "fused")
    step = utils.TrainStep(config, bench_ctx.device, compile=mode == "compile")

    start = time.perf_counter()
    step()  # first step: optimizer state, cuDNN/Triton autotuning, compilation
    first_step_s = time.perf_counter() - start
    flops = step.count_flops()
    peak_mem = step.measure_peak_memory()
    benchmark.pedantic(step, rounds=bench_ctx.rounds, warmup_rounds=bench_ctx.warmup_rounds, iterations=1)
    utils.fill_extra_info(
        benchmark, device=bench_ctx.device, info=bench_ctx.info, images_per_step=step.batch_size,
        flops_per_step=flops, peak_mem=peak_mem, bench_size=bench_ctx.size, method=method,
        derivative=derivative, impl=impl, mode=mode, first_step_s=round(first_step_s, 3),
        num_parameters=step.num_parameters, autocast="bf16" if step.autocast_enabled else "off",
    )
