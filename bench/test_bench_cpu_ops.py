"""Micro-benchmarks of the C++ CPU ops (``csrc/``, :mod:`fastflow.ops.cpu`) against the eager
PyTorch reference and ``torch.compile(reference)`` (inductor), plus ATen baselines.

    pytest bench/test_bench_cpu_ops.py --benchmark-only                    # all cases
    pytest bench/test_bench_cpu_ops.py --benchmark-only -m "not compile"   # skip the compiled reference

Cases (float32, the shapes the task set):
- ``gn_film_silu`` forward and forward+backward on x (8, 128, 32, 32), 32 groups, FiLM, SiLU:
  ``cpp`` | ``reference`` (eager) | ``reference-compiled`` | ``aten`` (F.group_norm → FiLM → F.silu,
  the unfused eager composite a model would otherwise use).
- ``gn_film_silu_dual`` forward (FMM's jvp path): ``cpp`` | ``reference``.
- ``attention`` forward on q, k, v (8, 4, 256, 32): ``cpp`` | ``reference`` | ``reference-compiled`` |
  ``sdpa`` (ATen's flash-attention CPU kernel, no forward-mode AD).
- ``attention_dual`` forward: ``cpp`` | ``reference``.

``extra_info`` records the shapes, the bytes each call must move at least (inputs read once, outputs
written once) and bytes/s against that, FLOP/s for attention, the measured copy bandwidth as the
memory ceiling, min/median, threads, load average and ``cpu.build_info()`` (ISA clone, GEMM).

Noise: on the shared 2-core development VMs timings swing by 2-10x with other processes' load
(``loadavg_1m`` is recorded). Fresh tensor allocations are also slow there: glibc returns freed
multi-MB buffers to the kernel and the next first touch page-faults (~8 µs per 4 KiB page), which
penalises every implementation by how many large temporaries it allocates per call (eager the
most). ``MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment removes that effect.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict

import pytest
import torch
import torch.nn.functional as F

from bench import utils
from fastflow.ops import cpu
from fastflow.ops.reference import (
    attention_dual_reference,
    attention_reference,
    gn_film_silu_dual_reference,
    gn_film_silu_reference,
)

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason=f"C++ extension unavailable: {cpu.unavailable_reason()}")

GN_SHAPE, GN_GROUPS, EPS = (8, 128, 32, 32), 32, 1e-5
ATTN_SHAPE = (8, 4, 256, 32)
MIN_ROUNDS = 20


@pytest.fixture(scope="module")
def cpu_ctx(bench_ctx: Any) -> Any:
    if bench_ctx.device.type != "cpu":
        pytest.skip("the C++ ops are CPU kernels (--bench-device cpu)")
    return bench_ctx


def _aten_gn_film_silu(x, weight, bias, scale, shift, groups, eps, silu):
    y = F.group_norm(x, groups, weight, bias, eps) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(y) if silu else y


_COMPILED: Dict[str, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    """One torch.compile wrapper per function for the whole session (compiles on first call)."""
    key = fn.__name__
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, fullgraph=True)
    return _COMPILED[key]


def _impl(name: str, impls: Dict[str, Callable], ctx: Any) -> Callable:
    if name == "reference-compiled":
        ctx.require_compile(heavy=False)
        return _compiled(impls["reference"])
    return impls[name]


def _run_and_record(benchmark: Any, ctx: Any, run: Callable[[], Any], *, bytes_moved: int,
                    flops: int = 0, **extra: Any) -> None:
    start = time.perf_counter()
    run()  # warm-up (compiles in the compiled cases)
    first_call_s = time.perf_counter() - start
    benchmark.pedantic(run, rounds=max(MIN_ROUNDS, ctx.rounds), warmup_rounds=2, iterations=1)
    median = utils.benchmark_median(benchmark)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    info = benchmark.extra_info
    info.update(
        torch=torch.__version__, torch_threads=torch.get_num_threads(), cpu_model=ctx.info.get("cpu_model"),
        loadavg_1m=round(os.getloadavg()[0], 2), build_info=cpu.build_info(),
        malloc_trim_threshold=os.environ.get("MALLOC_TRIM_THRESHOLD_"), first_call_s=round(first_call_s, 3),
        bytes_moved=bytes_moved, copy_bandwidth_bytes_per_s=utils.copy_bandwidth(torch.device("cpu"), 64 << 20),
    )
    if median:
        info.update(median_s=median, bytes_per_s=bytes_moved / median)
        if flops:
            info.update(flops=flops, flops_per_s=flops / median)
    if stats is not None:
        info.update(min_s=float(stats.min))
    info.update(extra)


def _gn_inputs(requires_grad: bool = False):
    gen = torch.Generator().manual_seed(0)
    n, c = GN_SHAPE[:2]
    x = torch.randn(GN_SHAPE, generator=gen).requires_grad_(requires_grad)
    params = {
        "weight": torch.randn(c, generator=gen) * 0.5 + 1,
        "bias": torch.randn(c, generator=gen) * 0.5,
        "scale": torch.randn(n, c, generator=gen) * 0.3,
        "shift": torch.randn(n, c, generator=gen),
    }
    return x, params, torch.randn(GN_SHAPE, generator=gen)


GN_IMPLS = {"cpp": cpu.gn_film_silu_cpp, "reference": gn_film_silu_reference, "aten": _aten_gn_film_silu}


@pytest.mark.parametrize("impl", ["cpp", "reference", pytest.param("reference-compiled", marks=pytest.mark.compile),
                                  "aten"])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_gn_film_silu(benchmark: Any, cpu_ctx: Any, pass_: str, impl: str) -> None:
    benchmark.group = f"gn_film_silu-{pass_}"
    fn = _impl(impl, GN_IMPLS, cpu_ctx)
    x, p, grad_y = _gn_inputs(requires_grad=pass_ == "fwd_bwd")
    args = (p["weight"], p["bias"], p["scale"], p["shift"], GN_GROUPS, EPS, True)

    def forward() -> None:
        with torch.no_grad():
            fn(x, *args)

    def forward_backward() -> None:
        (dx,) = torch.autograd.grad(fn(x, *args), (x,), grad_y)

    numel_bytes = x.numel() * x.element_size()
    # fwd: read x, write y. fwd+bwd: that, then read x and dy, write dx.
    moved = 2 * numel_bytes if pass_ == "fwd" else 5 * numel_bytes
    _run_and_record(benchmark, cpu_ctx, forward if pass_ == "fwd" else forward_backward, bytes_moved=moved,
                    shape=list(GN_SHAPE), groups=GN_GROUPS, dtype="float32", impl=impl, pass_=pass_)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_gn_film_silu_dual(benchmark: Any, cpu_ctx: Any, impl: str) -> None:
    benchmark.group = "gn_film_silu_dual-fwd"
    fn = {"cpp": cpu.gn_film_silu_dual_cpp, "reference": gn_film_silu_dual_reference}[impl]
    x, p, x_dot = _gn_inputs()
    gen = torch.Generator().manual_seed(1)
    scale_dot, shift_dot = torch.randn(p["scale"].shape, generator=gen), torch.randn(p["shift"].shape, generator=gen)

    def run() -> None:
        fn(x, x_dot, p["weight"], p["bias"], p["scale"], scale_dot, p["shift"], shift_dot, GN_GROUPS, EPS, True)

    # read x, ẋ; write y, ẏ
    _run_and_record(benchmark, cpu_ctx, run, bytes_moved=4 * x.numel() * x.element_size(),
                    shape=list(GN_SHAPE), groups=GN_GROUPS, dtype="float32", impl=impl)


def _attention_inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(ATTN_SHAPE, generator=gen) for _ in range(6)]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


ATTN_IMPLS = {"cpp": cpu.attention_cpp, "reference": attention_reference, "sdpa": _sdpa}


def _attention_flops() -> int:
    b, h, seqlen, d = ATTN_SHAPE
    return 4 * b * h * seqlen * seqlen * d  # QKᵀ and PV, 2 FLOPs per multiply-add


@pytest.mark.parametrize("impl", ["cpp", "reference", pytest.param("reference-compiled", marks=pytest.mark.compile),
                                  "sdpa"])
def test_attention(benchmark: Any, cpu_ctx: Any, impl: str) -> None:
    benchmark.group = "attention-fwd"
    fn = _impl(impl, ATTN_IMPLS, cpu_ctx)
    q, k, v = _attention_inputs()[:3]

    def run() -> None:
        with torch.no_grad():
            fn(q, k, v)

    _run_and_record(benchmark, cpu_ctx, run, bytes_moved=4 * q.numel() * q.element_size(),
                    flops=_attention_flops(), shape=list(ATTN_SHAPE), dtype="float32", impl=impl)


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_attention_dual(benchmark: Any, cpu_ctx: Any, impl: str) -> None:
    benchmark.group = "attention_dual-fwd"
    fn = {"cpp": cpu.attention_dual_cpp, "reference": attention_dual_reference}[impl]
    q, q_dot, k, k_dot, v, v_dot = _attention_inputs()

    def run() -> None:
        with torch.no_grad():
            fn(q, q_dot, k, k_dot, v, v_dot)

    # S, Ṡ (two products), O, Ȯ (two products): 3x the plain forward's matmul FLOPs
    _run_and_record(benchmark, cpu_ctx, run, bytes_moved=8 * q.numel() * q.element_size(),
                    flops=3 * _attention_flops(), shape=list(ATTN_SHAPE), dtype="float32", impl=impl)
