"""FMM training step per ∂_t v backend, against Flow Matching (the unit) and the course's vmap(jvp) loss.

    pytest bench/test_bench_fmm.py --benchmark-only                  # CPU: small config, eager only
    pytest bench/test_bench_fmm.py --benchmark-only --bench-compile=all   # + compiled dual / finite_difference
    pytest bench/test_bench_fmm.py --benchmark-only -m "not compile"
    python bench/test_bench_fmm.py --report [--size small|tiny|default] [--rounds N] [--compile]

A step is loss → backward → clip → AdamW → zero_grad (``bench.utils.TrainStep``: bf16 autocast on
CUDA, float32 on the CPU). Cases:

- ``fm``: Flow Matching, one forward + backward: the unit of the FMM/FM ratio;
- ``fmm-<backend>``: FlowMapMatching with derivative = dual | finite_difference | jvp (eager), and
  dual | finite_difference under ``torch.compile`` (marked ``compile``);
- ``course-baseline``: bench/course_baseline.py, the course's loss with per-sample ``vmap(jvp)``
  (eager, float32 — as the course ran it).

``--report`` times every case in ONE process, round-robin (one step of each case per round, so
machine-load drift hits all cases alike), and prints img/s, peak memory and the ratios FMM/FM and
case/baseline. ``extra_info`` of the pytest cases carries img/s, MFU, peak memory, the backend and
the versions (bench.utils.fill_extra_info).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make ``bench`` and ``fastflow`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

from bench import utils  # noqa: E402
from bench.course_baseline import CourseFlowMapMatching  # noqa: E402

# case id -> (method, derivative backend or None, course baseline?)
CASES: Dict[str, tuple] = {
    "fm": ("flow_matching", None, False),
    "fmm-dual": ("flow_map_matching", "dual", False),
    "fmm-finite_difference": ("flow_map_matching", "finite_difference", False),
    "fmm-jvp": ("flow_map_matching", "jvp", False),
    "course-baseline": ("flow_map_matching", "jvp", True),
}
COMPILED_CASES = ("fmm-dual", "fmm-finite_difference")


def make_step(case: str, size: str, device: torch.device, compile: bool = False,
              batch_size: Optional[int] = None) -> utils.TrainStep:
    """A ``TrainStep`` for ``case``; the course baseline wraps the same network (and seed) as fmm-jvp."""
    method, derivative, course = CASES[case]
    config = utils.bench_config(method, size, derivative=derivative, batch_size=batch_size)
    step = utils.TrainStep(config, device, compile=compile)
    if course:
        if compile:
            raise ValueError("the course baseline is eager only")
        c = config.flow_map_matching
        baseline = CourseFlowMapMatching(step.method.model, sigma_min=c.sigma_min, initial_gap=c.initial_gap,
                                         warmup_steps=c.warmup_steps,
                                         reconstruction_weight=c.reconstruction_weight).train()
        # Same parameters and optimizer; the loss (and the FLOP count) become the course's.
        step.method = step.loss_fn = baseline
        # Outer bf16 autocast stays on, as in the course; its jvp part turns autocast off itself.
    return step


PARAMS = [pytest.param(case, "eager", id=f"{case}-eager") for case in CASES] + [
    pytest.param(case, "compile", id=f"{case}-compile", marks=pytest.mark.compile) for case in COMPILED_CASES
]


@pytest.mark.parametrize("case, mode", PARAMS)
def test_fmm_train_step(benchmark: Any, bench_ctx: Any, case: str, mode: str) -> None:
    if mode == "compile":
        bench_ctx.require_compile(heavy=True)
    benchmark.group = f"fmm_train_step-{bench_ctx.size}"
    method, derivative, course = CASES[case]
    step = make_step(case, bench_ctx.size, bench_ctx.device, compile=mode == "compile")
    start = time.perf_counter()
    step()  # optimizer state, cuDNN algorithm trials, compilation
    first_step_s = time.perf_counter() - start
    # The steady step's peak: the first one's also holds cuDNN's trial workspaces (eager) or the
    # compiler's own memory, neither of which a training run keeps paying.
    peak_mem = step.measure_peak_memory()
    flops = step.count_flops() if bench_ctx.cuda else None  # FlopCounterMode costs a step; skipped on CPU
    benchmark.pedantic(step, rounds=bench_ctx.rounds, warmup_rounds=bench_ctx.warmup_rounds, iterations=1)
    utils.fill_extra_info(
        benchmark, device=bench_ctx.device, info=bench_ctx.info, images_per_step=step.batch_size,
        flops_per_step=flops, peak_mem=peak_mem, bench_size=bench_ctx.size, case=case, method=method,
        backend="course_vmap_jvp" if course else (derivative or "none"), mode=mode,
        first_step_s=round(first_step_s, 3), num_parameters=step.num_parameters,
        autocast="bf16" if step.autocast_enabled else "off",
    )


# ------------------------------------------------------------------------------------ --report
def report(size: str, device: torch.device, rounds: int, compile: bool, batch_size: Optional[int]) -> List[Dict]:
    """Time every case round-robin in this process; print and return one row per case."""
    names = [(case, "eager") for case in CASES] + ([(case, "compile") for case in COMPILED_CASES] if compile else [])
    steps: Dict[tuple, utils.TrainStep] = {}
    first: Dict[tuple, float] = {}
    for key in names:
        start = time.perf_counter()
        steps[key] = make_step(key[0], size, device, compile=key[1] == "compile", batch_size=batch_size)
        steps[key]()
        steps[key]()
        first[key] = time.perf_counter() - start
        print(f"  built + 2 warm-up steps: {key[0]}-{key[1]} ({first[key]:.1f} s)", flush=True)
    peak = {key: steps[key].measure_peak_memory() for key in names}
    times: Dict[tuple, List[float]] = {key: [] for key in names}
    for _ in range(rounds):
        for key in names:
            times[key] += utils.time_fn(steps[key], device, warmup=0, reps=1)
    rows = []
    batch = steps[names[0]].batch_size
    fm = utils.summarize(times[("fm", "eager")])["median"]
    base = utils.summarize(times[("course-baseline", "eager")])["median"]
    for key in names:
        stats = utils.summarize(times[key])
        rows.append(dict(case=key[0], mode=key[1], median_s=stats["median"], iqr_s=stats["iqr"],
                         img_per_s=batch / stats["median"], vs_fm=stats["median"] / fm,
                         vs_baseline=stats["median"] / base, peak_mem_delta_mb=peak[key].delta_bytes / 2**20))
    info = utils.device_info(device)
    config = steps[names[0]].config
    print(f"\nFMM train step, {size} config (base {config.model.base_channels}, mult {config.model.channel_mult}, "
          f"{config.data.image_size}×{config.data.image_size}, batch {batch}), {info['device_name']}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load {info['loadavg_1m']}, "
          f"{rounds} rounds round-robin")
    print("| case | mode | median s (IQR) | img/s | × FM step | × course baseline | peak mem Δ MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['mode']} | {r['median_s']:.4f} ({r['iqr_s']:.4f}) | {r['img_per_s']:.1f} "
              f"| {r['vs_fm']:.2f} | {r['vs_baseline']:.2f} | {r['peak_mem_delta_mb']:.0f} |")
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="FMM train-step ratios (FMM/FM, backend/course baseline)")
    parser.add_argument("--report", action="store_true", help="time every case side by side (required)")
    parser.add_argument("--size", default=None, choices=sorted(utils.BENCH_SIZES),
                        help="config size (default: default on CUDA, small on CPU)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also the compiled dual / finite_difference steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if not args.report:
        parser.error("nothing to do: pass --report (pytest runs the benchmark cases)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = utils.resolve_device(args.device)
    size = args.size or ("default" if device.type == "cuda" else "small")
    report(size, device, args.rounds or (20 if device.type == "cuda" else 5), args.compile, args.batch_size)


if __name__ == "__main__":
    main()
