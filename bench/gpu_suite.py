"""The one-shot GPU suite: what is worth measuring on a lent H200, in one command, in under 8 minutes.

    bash bench/gpu_suite.sh                    # the device tool's `run` with command `bash bench/gpu_suite.sh`
    GPU_SUITE_QUICK=1 bash bench/gpu_suite.sh  # ~3-minute smoke (small network, fewer cases)
    bash bench/gpu_suite.sh --cpu              # dry run on a CPU with tiny sizes (kernel tests skip)
    python bench/gpu_suite.py --sections env,ceilings --cpu   # a subset

Sections run one after another, each in its own process with its own time budget (a crash, hang or
out-of-memory in one loses nothing else), under one deadline for the whole suite:

- ``env``: versions, nvidia-smi, which fused-op backends load.
- ``ceilings``: device-to-device copy bandwidth (bytes read + written) and bf16 / tf32 matmul
  FLOP/s on random data — the roofs every later number is compared with.
- ``train_eager``: one train step (loss, backward, clip, fused AdamW, EMA) at the real config
  (base 128, 64×64, batch 128, bf16 autocast): flow_matching, flow_map_matching per ∂_t v backend
  (dual, finite_difference, jvp), the course baseline (``bench/course_baseline.py``: per-sample
  vmap(jvp)), then FM and FMM dual with the fused ops in NCHW and in channels_last weights and
  batch (``_cl``: the layout question, by measurement; the fused GroupNorm kernels run
  channels_last in place), then FMM fd / jvp fused and FM / FMM dual reference in channels_last.
  img/s, MFU (datasheet and measured peak), peak memory.
- ``kernel_tests``: ``pytest tests/test_kernels_*.py -x -q`` on the GPU (``TRITON_INTERPRET=0``),
  including the fused-vs-reference loss-curve test on CUDA.
- ``kernels_micro``: gn_film_silu fwd and fwd+bwd (bytes/s against the copy bandwidth; NCHW, and
  channels_last fused vs compiled reference) and
  attention fwd / fwd+bwd at seq 64 and 256: fused kernel vs torch.compile(reference) vs eager vs
  SDPA; attention dual (primal + tangent, and backward through both) vs ``torch.func.jvp``
  through SDPA's math backend.
- ``train_compiled``: the train steps under ``torch.compile`` (the Trainer's compile=step). A
  background process compiles them from the start of the suite into a shared Inductor cache (it
  is paused with SIGSTOP whenever something is being timed), so here they load warm.
- ``train_dist``: with the time left, the FMM dual step under parallelism none / ddp / fsdp
  (``bench/dist_step.py`` under torchrun, one device: the wrappers' own cost).

Files under ``--out`` ($OUT on the device): ``gpu_suite.json`` (every section's raw results),
``<device-slug>_<date>.json`` (bench/results format: copy it into ``bench/results/``),
``gpu_suite.log`` (written by gpu_suite.sh), ``kernel_tests.log``, ``precompile.log``, ``train_dist.log``.
The summary table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SECTIONS = ("env", "ceilings", "train_eager", "kernel_tests", "kernels_micro", "train_compiled", "train_dist")
RESERVE_S = 12.0  # kept back from the deadline for the summary and the files


# ------------------------------------------------------------------------------------- profiles
@dataclass
class Profile:
    name: str
    size: str  # bench.utils.BENCH_SIZES key
    total_s: float
    budgets: Dict[str, float]
    train_warmup: int
    train_reps: int
    train_max_s: float  # per case, timed part
    train_eager: List[Tuple[str, str]]  # (case, impl) in priority order
    precompile: List[str]  # train cases compiled in the background, in order
    micro_reps: int
    gn_shapes: List[Tuple[int, int, int, int]]
    gn_groups: int
    attn_shapes: List[Tuple[int, int, int, int]]  # (B, heads, L, D)
    micro_compile: bool
    copy_bytes: int
    matmul_sizes: List[int]
    kernel_test_workers: int
    precompile_memory_fraction: float = 0.45
    # The slow kernel tests (inductor compiles, opcheck, bigger shapes) get at most this long, so
    # that they cannot eat the compiled train steps' time.
    kernel_slow_pass_s: float = 30.0
    notes: List[str] = field(default_factory=list)


_FULL_TRAIN = [
    ("flow_matching", "reference"), ("fmm_dual", "reference"), ("fmm_finite_difference", "reference"),
    ("fmm_jvp", "reference"), ("course_fmm", "reference"),
    ("flow_matching", "fused"), ("fmm_dual", "fused"),
    # memory layout, decided by measurement (issue: kernels): channels_last weights and batch, the
    # fused GroupNorm kernels running it in place. Right after the fused NCHW rows, as the shipped
    # configs use fused kernels: a spent budget drops the cases below first.
    ("flow_matching", "fused_cl"), ("fmm_dual", "fused_cl"),
    ("fmm_finite_difference", "fused"), ("fmm_jvp", "fused"),
    ("flow_matching", "reference_cl"), ("fmm_dual", "reference_cl"),
]
PROFILES: Dict[str, Profile] = {
    "full": Profile(
        name="full", size="default", total_s=450.0,
        budgets={"env": 20, "ceilings": 30, "train_eager": 110, "kernel_tests": 70, "kernels_micro": 80,
                 "train_compiled": 128, "train_dist": 60},
        train_warmup=3, train_reps=10, train_max_s=8.0, train_eager=_FULL_TRAIN,
        precompile=["flow_matching", "fmm_dual", "fmm_finite_difference", "fmm_jvp"],
        micro_reps=40, gn_shapes=[(128, 128, 64, 64), (128, 256, 32, 32)], gn_groups=32,
        attn_shapes=[(128, 4, 64, 128), (128, 4, 256, 64)], micro_compile=True,
        copy_bytes=4 << 30, matmul_sizes=[8192, 4096], kernel_test_workers=4,
    ),
    "quick": Profile(
        name="quick", size="small", total_s=180.0,
        budgets={"env": 12, "ceilings": 12, "train_eager": 30, "kernels_micro": 24, "kernel_tests": 40,
                 "train_compiled": 50, "train_dist": 25},
        train_warmup=1, train_reps=3, train_max_s=2.0,
        train_eager=[("flow_matching", "reference"), ("fmm_dual", "reference"), ("fmm_dual", "fused"),
                     ("course_fmm", "reference")],
        precompile=["flow_matching"], micro_reps=10, gn_shapes=[(32, 128, 32, 32)], gn_groups=32,
        attn_shapes=[(32, 4, 64, 64), (32, 4, 256, 64)], micro_compile=True,
        copy_bytes=1 << 30, matmul_sizes=[4096], kernel_test_workers=4,
    ),
    "cpu": Profile(
        name="cpu", size="tiny", total_s=420.0,
        budgets={"env": 30, "ceilings": 30, "train_eager": 100, "kernels_micro": 80, "kernel_tests": 40,
                 "train_compiled": 128, "train_dist": 60},
        train_warmup=1, train_reps=2, train_max_s=3.0,
        train_eager=[("flow_matching", "reference"), ("fmm_dual", "reference"),
                     ("fmm_finite_difference", "reference"), ("fmm_jvp", "reference"),
                     ("course_fmm", "reference"), ("fmm_dual", "fused"), ("flow_matching", "reference_cl"),
                     ("fmm_dual", "fused_cl")],
        precompile=["flow_matching"], micro_reps=3, gn_shapes=[(4, 32, 16, 16)], gn_groups=8,
        attn_shapes=[(4, 2, 64, 16)], micro_compile=False, copy_bytes=64 << 20, matmul_sizes=[512],
        kernel_test_workers=0, precompile_memory_fraction=0.0,
        notes=["CPU dry run: tiny sizes, one thread, no kernel compiles; numbers test the plumbing, not the hardware"],
    ),
}


# ----------------------------------------------------------------------------- section context
class Ctx:
    """What a section process knows: profile, device, deadline, scratch dir, earlier sections."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.profile = PROFILES[args.profile]
        self.tmp = Path(args.tmp)
        self.out = Path(args.out)
        self.deadline = float(args.deadline)
        self.device = torch.device("cpu" if self.profile.name == "cpu" else "cuda")
        self.results: Dict[str, Any] = {}
        self.name = args.section
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            torch.backends.cudnn.benchmark = True

    def left(self) -> float:
        return self.deadline - time.time()

    def load(self, section: str) -> Dict[str, Any]:
        path = self.tmp / f"{section}.json"
        try:
            return json.loads(path.read_text()).get("results", {})
        except (OSError, ValueError):
            return {}

    def save(self, status: str = "running") -> None:
        """Write this section's results so far (a section killed at its budget keeps them)."""
        from bench.utils import _jsonable

        doc = {"section": self.name, "status": status, "results": self.results}
        tmp = self.tmp / f"{self.name}.json.part"
        tmp.write_text(json.dumps(_jsonable(doc), indent=1))
        tmp.replace(self.tmp / f"{self.name}.json")

    def peaks(self) -> Dict[str, Optional[float]]:
        from bench.utils import peak_bf16_flops

        ceil = self.load("ceilings")
        measured = ceil.get("matmul_bf16_flops") if self.device.type == "cuda" else ceil.get("matmul_fp32_flops")
        return {"spec": peak_bf16_flops(self.device), "measured": measured}

    def copy_bandwidth(self) -> Optional[float]:
        return self.load("ceilings").get("copy_bytes_per_s")


PAUSE_SETTLE_S = 0.05       # the CPU: the stopped process has nothing queued
PAUSE_MAX_WAIT_S = 3.0      # CUDA: the longest wait for kernels the stopped process had queued
PROBE_BYTES = 16 << 20      # the idle probe: one 16 MiB device-to-device copy


def wait_until_idle(probe: Callable[[], float], expected_s: Optional[float], *, max_wait_s: float,
                    clock: Callable[[], float] = time.perf_counter,
                    sleep: Callable[[float], None] = time.sleep) -> Dict[str, Any]:
    """Probe until the GPU runs our work at idle speed; the stopped process's queued kernels keep
    running after SIGSTOP (a compile step queues up to a whole train step, hundreds of ms), and
    CUDA time-slices contexts, so a probe that shares the GPU waits out the other's time slices
    (~ms) instead of taking its ~10 µs.

    ``probe()`` returns the seconds one PROBE_BYTES copy took (CUDA events). Idle: three probes in
    a row within 1.5x ``expected_s`` + 20 µs, ``expected_s`` being the copy at the measured copy
    bandwidth or, before that is known, at 500 GB/s (slower than any HBM GPU, far faster than a
    time-sliced probe). Gives up after ``max_wait_s``. Returns {'waited_s', 'probes', 'idle'}."""
    if expected_s is None:
        expected_s = 2 * PROBE_BYTES / 500e9
    limit = 1.5 * expected_s + 20e-6
    start = clock()
    probes = 0
    fast_in_a_row = 0
    while True:
        probes += 1
        fast_in_a_row = fast_in_a_row + 1 if probe() <= limit else 0
        waited = clock() - start
        if fast_in_a_row >= 3 or waited >= max_wait_s:
            return {"waited_s": waited, "probes": probes, "idle": fast_in_a_row >= 3}
        sleep(0.002)


_PROBE_BUFFERS: Dict[str, Any] = {}


def _copy_probe(device: Any) -> Callable[[], float]:
    import torch

    key = str(device)
    if key not in _PROBE_BUFFERS:
        src = torch.empty(PROBE_BYTES // 4, dtype=torch.float32, device=device)
        _PROBE_BUFFERS[key] = (src, torch.empty_like(src))
    src, dst = _PROBE_BUFFERS[key]

    def probe() -> float:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3

    return probe


def _drain_gpu(ctx: "Ctx") -> None:
    """After the SIGSTOP: wait for the background's queued GPU work (see wait_until_idle) and
    keep a tally in the section's results (``background_drain``)."""
    if ctx.device.type != "cuda":
        time.sleep(PAUSE_SETTLE_S)
        return
    bandwidth = ctx.copy_bandwidth() or ctx.results.get("copy_bytes_per_s")
    expected = 2 * PROBE_BYTES / bandwidth if bandwidth else None  # read + write
    tally = ctx.results.setdefault("background_drain", {"pauses": 0, "not_idle": 0, "max_wait_s": 0.0})
    # A section whose GPU never looked idle (a threshold that does not fit this GPU?) stops
    # paying the full wait at every pause.
    max_wait = PAUSE_MAX_WAIT_S if tally["not_idle"] == 0 else 0.3
    try:
        got = wait_until_idle(_copy_probe(ctx.device), expected, max_wait_s=max_wait)
    except RuntimeError as exc:  # e.g. out of memory for the probe: fall back to a fixed wait
        print(f"  [pause] idle probe failed ({type(exc).__name__}); fixed {PAUSE_SETTLE_S}s wait", flush=True)
        time.sleep(PAUSE_SETTLE_S)
        return
    tally["pauses"] += 1
    tally["not_idle"] += 0 if got["idle"] else 1
    tally["max_wait_s"] = round(max(tally["max_wait_s"], got["waited_s"]), 4)
    if not got["idle"]:
        print(f"  [pause] GPU not idle after {got['waited_s']:.1f}s ({got['probes']} probes): timing anyway",
              flush=True)


@contextlib.contextmanager
def paused_background(ctx: Ctx):
    """SIGSTOP the background compile process group while timing; SIGCONT after."""
    pgid = None
    try:
        pgid = int((ctx.tmp / "bg.pgid").read_text().strip())
    except (OSError, ValueError):
        pgid = None
    stopped = False
    if pgid and pgid != os.getpgrp():
        try:
            os.killpg(pgid, signal.SIGSTOP)
            stopped = True
        except (ProcessLookupError, PermissionError):
            stopped = False
    try:
        if stopped:
            _drain_gpu(ctx)  # kernels it queued before the stop still run
        yield stopped
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGCONT)


def _spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """Start a child in its own process group (so it and its workers can be killed together) but in
    our session (so whoever ends our command also ends it)."""
    if sys.version_info >= (3, 11):
        kwargs["process_group"] = 0
    else:  # pragma: no cover - the device has 3.12, this machine 3.11
        kwargs["start_new_session"] = True
    return subprocess.Popen(list(cmd), **kwargs)


def _kill_group(proc: Optional[subprocess.Popen]) -> None:
    """Kill the child's whole process group: its workers (xdist, compile workers) too, also when
    the child itself has already exited."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _stop_launcher(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop a torchrun launcher: SIGTERM first, which it forwards to its workers and waits for
    (some torch versions start the workers in a session of their own, out of reach of a kill of
    the launcher's group), then the whole group for good."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
    _kill_group(proc)


def _write_status(path: Path, status: Dict[str, Any]) -> None:
    """Written whole, then renamed: another process polls for it and reads it at once."""
    part = path.with_suffix(".part")
    part.write_text(json.dumps(status))
    os.replace(part, path)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> Dict[str, Any]:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return {"status": "error", "error": text[-800:]}


# ---------------------------------------------------------------------------------- env section
def section_env(ctx: Ctx) -> None:
    import torch

    from bench.utils import _package_version, device_info

    info = device_info(ctx.device)
    info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    ctx.results["device"] = info
    ctx.results["packages"] = {name: _package_version(name) for name in (
        "numpy", "pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout", "einops", "pyyaml",
        "tensorboard", "pillow", "scikit-learn", "tqdm")}
    missing = sorted(name for name, version in ctx.results["packages"].items() if version is None)
    if ctx.device.type == "cuda":
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
                 "clocks.mem,temperature.gpu,power.draw,power.limit", "--format=csv"],
                capture_output=True, text=True, timeout=20)
            ctx.results["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            ctx.results["nvidia_smi"] = f"unavailable: {exc}"
    try:
        from fastflow import ops

        ctx.results["ops_backends"] = ops.available_backends()
        ctx.results["fused_backend"] = ops.fused_backend_for(ctx.device)
        if ctx.results["ops_backends"].get("triton"):
            from kernels import attention

            # float32 attention dots at matmul precision "highest" (the kernel tests run there)
            ctx.results["fp32_highest_dot"] = attention.FP32_HIGHEST_DOT
    except Exception as exc:  # noqa: BLE001 - report, don't fail the suite
        ctx.results["ops_backends"] = _error(exc)
    for key in ("device_name", "torch", "triton", "cuda", "cudnn", "python"):
        print(f"  {key}: {info.get(key)}")
    # The suite installs nothing: what is missing here explains sections that skip or fail below.
    print(f"  packages missing: {', '.join(missing) if missing else 'none'}")
    print(f"  fused backend: {ctx.results.get('fused_backend')}  ({ctx.results.get('ops_backends')}); "
          f"fp32 'highest' attention dots: {ctx.results.get('fp32_highest_dot', '-')}")
    if "nvidia_smi" in ctx.results:
        print("  " + ctx.results["nvidia_smi"].replace("\n", "\n  "))


# ----------------------------------------------------------------------------- ceilings section
def section_ceilings(ctx: Ctx) -> None:
    import torch

    from bench.utils import copy_bandwidth, matmul_ceiling

    p = ctx.profile
    with paused_background(ctx):
        bw = copy_bandwidth(ctx.device, nbytes=p.copy_bytes)
    ctx.results.update(copy_bytes_per_s=bw, copy_nbytes=p.copy_bytes)
    print(f"  copy: {bw / 1e9:,.0f} GB/s (read + write, {p.copy_bytes >> 20} MiB)")
    ctx.save()
    dtypes = [("bf16", torch.bfloat16), ("tf32", torch.float32)] if ctx.device.type == "cuda" else [("fp32", torch.float32)]
    for label, dtype in dtypes:
        for n in p.matmul_sizes:
            with paused_background(ctx):
                flops = matmul_ceiling(ctx.device, dtype=dtype, n=n)
            ctx.results[f"matmul_{label}_{n}_flops"] = flops
            print(f"  matmul {label} {n}³: {flops / 1e12:,.1f} TFLOP/s")
            ctx.save()
        ctx.results[f"matmul_{label}_flops"] = max(ctx.results[f"matmul_{label}_{n}_flops"] for n in p.matmul_sizes)


# ------------------------------------------------------------------------------- train sections
def _build_train_step(ctx: Ctx, case: str, impl: str, compile: bool) -> Any:
    """``impl``: reference | fused, with ``_cl`` for channels_last weights and batch."""
    from bench.utils import TRAIN_CASES, TrainStep, bench_config

    layout = ["infrastructure.channels_last=true"] if impl.endswith("_cl") else []
    impl = impl[:-3] if impl.endswith("_cl") else impl
    if case == "course_fmm":
        from bench.course_baseline import CourseFlowMapMatching  # noqa: WPS433 (written by another engineer)
        from fastflow.methods import build_network

        config = bench_config("flow_map_matching", ctx.profile.size, fused=impl == "fused")
        c = config.flow_map_matching
        method = CourseFlowMapMatching(build_network(config), sigma_min=c.sigma_min, initial_gap=c.initial_gap,
                                       warmup_steps=c.warmup_steps, reconstruction_weight=c.reconstruction_weight)
        return TrainStep(config, ctx.device, compile=compile, method=method)
    method, derivative = TRAIN_CASES[case]
    config = bench_config(method, ctx.profile.size, derivative=derivative, fused=impl == "fused", overrides=layout)
    return TrainStep(config, ctx.device, compile=compile)


def _run_train_case(ctx: Ctx, case: str, impl: str, compile: bool, flops_hint: Optional[int] = None) -> Dict[str, Any]:
    from bench.utils import PeakMemory, summarize, throughput_metrics, time_fn

    p = ctx.profile
    rec: Dict[str, Any] = {"case": case, "impl": impl, "mode": "compile" if compile else "eager"}
    t0 = time.perf_counter()
    step = _build_train_step(ctx, case, impl, compile)
    rec["batch_size"] = step.batch_size
    rec["num_parameters"] = step.num_parameters
    t1 = time.perf_counter()
    step()
    rec["first_step_s"] = time.perf_counter() - t1
    flops = flops_hint
    if flops is None:
        try:
            flops = step.count_flops()
        except Exception as exc:  # noqa: BLE001 - FLOPs are best effort (vmap/jvp under the counter)
            rec["flops_error"] = _error(exc)["error"]
    with paused_background(ctx) as paused:
        with PeakMemory(ctx.device) as pm:
            step()
        times = time_fn(step, ctx.device, warmup=p.train_warmup, reps=p.train_reps, max_seconds=p.train_max_s)
    rec["background_paused"] = paused
    rec["stats"] = summarize(times)
    rec.update(throughput_metrics(ctx.device, rec["stats"]["median"], images_per_step=step.batch_size,
                                  flops_per_step=flops, peak_mem=pm, peaks=ctx.peaks()))
    rec["total_s"] = time.perf_counter() - t0
    rec["status"] = "ok"
    del step
    _free_memory()
    return rec


def _print_train(key: str, rec: Dict[str, Any]) -> None:
    if rec.get("status") != "ok":
        print(f"  {key}: {rec.get('status')} {rec.get('error', rec.get('reason', ''))[:300]}")
        return
    mfu = rec.get("mfu") if rec.get("mfu") is not None else rec.get("mfu_vs_measured")
    print(f"  {key}: {rec['stats']['median'] * 1e3:,.1f} ms/step  {rec.get('img_per_s', 0):,.0f} img/s  "
          f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}  peak {rec.get('peak_mem_mb', 0) / 1024:.2f} GiB  "
          f"(first step {rec['first_step_s']:.1f}s)")


def section_train_eager(ctx: Ctx) -> None:
    for case, impl in ctx.profile.train_eager:
        key = f"{case}-{impl}-eager"
        if ctx.left() < 15:
            ctx.results[key] = {"status": "skipped", "reason": "section budget spent"}
            continue
        try:
            ctx.results[key] = _run_train_case(ctx, case, impl, compile=False)
        except Exception as exc:  # noqa: BLE001 - one case must not lose the others
            ctx.results[key] = _error(exc)
            _free_memory()
        _print_train(key, ctx.results[key])
        ctx.save()


def section_precompile(ctx: Ctx, case: str) -> None:
    """Background: compile one train case into the shared Inductor cache (1 step + 1 more)."""
    import torch

    with contextlib.suppress(OSError):
        os.nice(5)
    if ctx.device.type == "cuda" and ctx.profile.precompile_memory_fraction > 0:
        torch.cuda.set_per_process_memory_fraction(ctx.profile.precompile_memory_fraction)
    status: Dict[str, Any] = {"case": case}
    try:
        step = _build_train_step(ctx, case, "reference", compile=True)
        t0 = time.perf_counter()
        step()
        status["compile_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        step()
        status["second_step_s"] = time.perf_counter() - t1
        status["status"] = "ok"
    except torch.cuda.OutOfMemoryError as exc:
        # The background's memory cap, not the case: the foreground (the whole device) tries it.
        status.update(_error(exc))
        status["status"] = "oom_in_background"
    except Exception as exc:  # noqa: BLE001
        status.update(_error(exc))
        traceback.print_exc()
    _write_status(ctx.tmp / f"precompile_{case}.json", status)
    print(f"[precompile] {case}: {status}", flush=True)


def _wait_precompile(ctx: Ctx, case: str, need_s: float) -> Optional[Dict[str, Any]]:
    path = ctx.tmp / f"precompile_{case}.json"
    while not path.exists():
        if ctx.left() < need_s:
            return None
        time.sleep(1.0)
    return json.loads(path.read_text())


def section_train_compiled(ctx: Ctx) -> None:
    eager = ctx.load("train_eager")
    for case in ctx.profile.precompile:
        key = f"{case}-reference-compile"
        status = _wait_precompile(ctx, case, need_s=35 if ctx.device.type == "cuda" else 60)
        if status is None:
            ctx.results[key] = {"status": "skipped", "reason": "background compile not finished in the budget"}
        elif status.get("status") == "skipped":
            ctx.results[key] = {"status": "skipped", "reason": f"background compile: {status.get('error')}"}
        elif status.get("status") not in ("ok", "oom_in_background"):
            ctx.results[key] = {"status": "compile_failed", "error": status.get("error", "?"), "precompile": status}
        else:
            flops = (eager.get(f"{case}-reference-eager") or {}).get("flops_per_step")
            try:
                rec = _run_train_case(ctx, case, "reference", compile=True, flops_hint=flops)
                rec["cold_compile_s"] = status.get("compile_s")
                if status["status"] != "ok":
                    rec["precompile"] = "out of memory under the background's cap; compiled (partly cold) here"
                ctx.results[key] = rec
            except Exception as exc:  # noqa: BLE001
                ctx.results[key] = _error(exc)
                _free_memory()
        _print_train(key, ctx.results[key])
        ctx.save()


# ------------------------------------------------------------------------- kernel microbenchmarks
# Kernel micro-benchmarks time this much GPU work per sample at least, as back-to-back calls.
MICRO_SAMPLE_S = 2e-3
MICRO_MAX_CALLS = 64


def _time_micro(ctx: Ctx, fn: Callable[[], Any]) -> Tuple[Dict[str, Any], int, float]:
    """(stats of the per-call seconds, calls per sample, lone-call median) of ``fn``, timed as
    back-to-back calls, enough that a sample spans ≥ MICRO_SAMPLE_S: the UNet's kernels run for
    microseconds to tens of microseconds, which a lone call timed from an idle GPU would mix with
    its launch latency. The lone-call median is what eager pays per call, launch included."""
    from bench.utils import summarize, time_fn

    fn()  # first call: compile / autotune / JIT outside the pause
    with paused_background(ctx):
        single = time_fn(fn, ctx.device, warmup=3, reps=5, max_seconds=1.0)
        per_call = statistics.median(single)
        calls = int(min(MICRO_MAX_CALLS, max(1, math.ceil(MICRO_SAMPLE_S / max(per_call, 1e-9)))))
        times = time_fn(fn, ctx.device, warmup=1, reps=ctx.profile.micro_reps, max_seconds=3.0,
                        calls_per_sample=calls)
    return {**summarize(times), "iterations": calls}, calls, per_call  # pytest-benchmark's name for it


def _micro_case(ctx: Ctx, key: str, fn: Callable[[], Any], *, nbytes: Optional[float] = None,
                flops: Optional[float] = None) -> None:
    if ctx.left() < 8:
        ctx.results[key] = {"status": "skipped", "reason": "section budget spent"}
        return
    try:
        stats, calls, per_call = _time_micro(ctx, fn)
        rec: Dict[str, Any] = {"status": "ok", "calls_per_sample": calls, "single_call_median_s": per_call,
                               "stats": stats}
        median = stats["median"]
        if nbytes:
            rec["bytes"] = nbytes
            rec["bytes_per_s"] = nbytes / median
            bw = ctx.copy_bandwidth()
            rec["fraction_of_copy_bw"] = nbytes / median / bw if bw else None
        if flops:
            rec["flops"] = flops
            rec["tflops_per_s"] = flops / median / 1e12
        ctx.results[key] = rec
        extra = f"  {rec['bytes_per_s'] / 1e9:,.0f} GB/s" if nbytes else ""
        extra += f"  {rec['tflops_per_s']:,.1f} TFLOP/s" if flops else ""
        print(f"  {key}: {median * 1e3:.3f} ms{extra}  (x{rec['calls_per_sample']} back to back; "
              f"lone call {rec['single_call_median_s'] * 1e3:.3f} ms)")
    except Exception as exc:  # noqa: BLE001
        ctx.results[key] = _error(exc)
        print(f"  {key}: error {ctx.results[key]['error'][:200]}")
        _free_memory()
    ctx.save()


def _compiled(ctx: Ctx, fn: Callable) -> Optional[Callable]:
    import torch

    return torch.compile(fn, dynamic=False) if ctx.profile.micro_compile else None


def _gn_micro(ctx: Ctx, shape: Tuple[int, int, int, int], channels_last: bool = False) -> None:
    """gn_film_silu fwd and fwd+bwd: fused vs torch.compile(reference) vs eager; bytes/s.

    ``channels_last``: x and dy in channels_last, which the fused kernels run in place (tag
    ``-cl``; the fused kernels only, so no second compile eats the budget), for the layout decision
    next to the NCHW rows: bytes/s against the copy bandwidth and against the NCHW kernels.
    """
    import torch
    import torch.nn.functional as F

    from fastflow import ops
    from fastflow.ops.reference import gn_film_silu_reference

    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    groups = ctx.profile.gn_groups
    n, c, h, w = shape
    tag = "x".join(map(str, shape)) + ("-cl" if channels_last else "")
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=ctx.device, dtype=dtype, generator=gen)  # noqa: E731
    x, weight, bias, scale, shift = mk(*shape), mk(c), mk(c), 0.1 * mk(n, c), 0.1 * mk(n, c)
    dy = mk(*shape)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    inputs = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]

    def native(x, weight, bias, scale, shift):
        y = F.group_norm(x, groups, weight, bias, 1e-5)
        return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])

    def reference(x, weight, bias, scale, shift):
        return gn_film_silu_reference(x, weight, bias, scale, shift, groups, 1e-5, True)

    def fused(x, weight, bias, scale, shift):
        return ops.gn_film_silu(x, weight, bias, scale, shift, groups=groups, eps=1e-5, silu=True, fused=True)

    impls = {"fused": fused} if channels_last else {
        "fused": fused, "compiled_reference": _compiled(ctx, reference), "eager_native": native,
        "eager_reference": reference}
    elem = x.element_size() * x.numel()
    for pass_ in ("fwd", "fwd_bwd"):
        for label, impl in impls.items():
            if impl is None:
                continue
            if pass_ == "fwd":
                def fn(impl=impl):
                    with torch.no_grad():
                        return impl(*inputs)
                nbytes = 2 * elem  # read x, write y (per-channel parameters are negligible)
            else:
                def fn(impl=impl):
                    return torch.autograd.grad(impl(*inputs), inputs, dy)
                nbytes = 5 * elem  # fwd: read x, write y; bwd: read x and dy, write dx
            _micro_case(ctx, f"gn_film_silu[{pass_}-{tag}-{label}]", fn, nbytes=nbytes)
    del x, weight, bias, scale, shift, dy, inputs
    _free_memory()


def _attention_inputs(ctx: Ctx, shape: Tuple[int, int, int, int]):
    import torch

    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    t = [torch.randn(*shape, device=ctx.device, dtype=dtype, generator=gen) for _ in range(8)]
    prim = [x.requires_grad_() for x in t[0:3]]  # q, k, v
    tang = [x.requires_grad_() for x in t[3:6]]  # q̇, k̇, v̇
    return prim, tang, t[6], t[7]  # upstream gradients G, Ġ


def _attention_micro(ctx: Ctx, shape: Tuple[int, int, int, int]) -> None:
    """attention fwd (fused, SDPA) and fwd+bwd (fused, SDPA, compiled and eager reference)."""
    import torch
    import torch.nn.functional as F

    from fastflow import ops
    from fastflow.ops.reference import attention_reference

    b, heads, length, dim = shape
    tag = f"B{b}-H{heads}-L{length}-D{dim}"
    prim, _, g, _ = _attention_inputs(ctx, shape)
    fwd_flops = 4.0 * b * heads * length * length * dim  # QKᵀ and PV
    fused = lambda q, k, v: ops.attention(q, k, v, fused=True)  # noqa: E731
    for label, impl in (("fused", fused), ("sdpa", F.scaled_dot_product_attention)):
        def fn(impl=impl):
            with torch.no_grad():
                return impl(*prim)
        _micro_case(ctx, f"attention[fwd-{tag}-{label}]", fn, flops=fwd_flops)
    impls = {"fused": fused, "sdpa": F.scaled_dot_product_attention,
             "compiled_reference": _compiled(ctx, attention_reference), "eager_reference": attention_reference}
    for label, impl in impls.items():
        if impl is None:
            continue

        def fn(impl=impl):
            return torch.autograd.grad(impl(*prim), prim, g)
        # backward = 2.5× forward (FlashAttention's count)
        _micro_case(ctx, f"attention[fwd_bwd-{tag}-{label}]", fn, flops=3.5 * fwd_flops)
    del prim, g
    _free_memory()


def _attention_dual_micro(ctx: Ctx, shape: Tuple[int, int, int, int], with_compile: bool) -> None:
    """(O, Ȯ) and the backward through both (FMM's dual backend): fused kernel vs torch.func.jvp
    through SDPA's math backend (the course's way) vs torch.compile of the dual reference."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastflow import ops
    from fastflow.ops.reference import attention_dual_reference

    b, heads, length, dim = shape
    tag = f"B{b}-H{heads}-L{length}-D{dim}"
    prim, tang, g, gd = _attention_inputs(ctx, shape)
    args6 = prim + tang
    fwd_flops = 12.0 * b * heads * length * length * dim  # six L×L×D products: QKᵀ, Q̇Kᵀ, QK̇ᵀ, PV, (P⊙Ṡ)V, PV̇

    def fused_dual(q, k, v, qd, kd, vd):
        return ops.attention_dual(q, qd, k, kd, v, vd, fused=True)

    def jvp_sdpa_math(q, k, v, qd, kd, vd):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (qd, kd, vd))

    def dual_reference(q, k, v, qd, kd, vd):
        return attention_dual_reference(q, qd, k, kd, v, vd)

    for label, impl in (("fused_dual", fused_dual), ("jvp_sdpa_math", jvp_sdpa_math)):
        def fn(impl=impl):
            with torch.no_grad():
                return impl(*args6)
        _micro_case(ctx, f"attention_dual[fwd-{tag}-{label}]", fn, flops=fwd_flops)
    impls = {"fused_dual": fused_dual, "jvp_sdpa_math": jvp_sdpa_math,
             "compiled_dual_reference": _compiled(ctx, dual_reference) if with_compile else None}
    for label, impl in impls.items():
        if impl is None:
            continue

        def fn(impl=impl):
            o, o_dot = impl(*args6)
            return torch.autograd.grad((o, o_dot), args6, (g, gd))
        _micro_case(ctx, f"attention_dual[fwd_bwd-{tag}-{label}]", fn)
    del prim, tang, g, gd, args6
    _free_memory()


def section_train_dist(ctx: Ctx) -> None:
    """FMM dual train step under parallelism none / ddp / fsdp (eager) through ``bench/dist_step.py``
    with torchrun on one device: what the DDP and FSDP2 wrappers cost by themselves (world size 1,
    wrapped anyway over a process group of one: hooks, buckets and collectives without a peer; the
    CPU results hold the 2-rank ratios). Runs last, with what time is left."""
    out = ctx.tmp / "dist_step.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO_ROOT / "bench" / "dist_step.py"), "--size", ctx.profile.size, "--case", "fmm_dual",
           "--parallelism", "none,ddp,fsdp", "--compile", "none", "--steps", "5",
           "--warmup", "2", "--wrap-single-rank", "--out", str(out)]
    timeout = ctx.left() - 3
    if timeout < 25:
        ctx.results.update(status="skipped", reason="section budget spent")
        return
    log_path = ctx.out / "train_dist.log"
    with paused_background(ctx), open(log_path, "w") as log:
        proc = _spawn(cmd, cwd=REPO_ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
        try:
            ctx.results["returncode"] = proc.wait(timeout=max(timeout - 10, 5))  # 10 s to stop it
        except subprocess.TimeoutExpired:
            ctx.results["returncode"] = "timeout"
        finally:
            _stop_launcher(proc)
    try:  # dist_step.py rewrites it after every case: a timed-out run keeps its finished ones
        doc = json.loads(out.read_text())
    except (OSError, ValueError):
        ctx.results.update(status="error", reason=f"no results (exit {ctx.results['returncode']}); see {log_path.name}")
        return
    for bench in doc.get("benchmarks", []):
        params, extra = bench["params"], bench.get("extra_info", {})
        key = f"fmm_dual-{params['parallelism']}-eager-w{params['world_size']}"
        ctx.results[key] = {"status": "ok", "case": "fmm_dual", "parallelism": params["parallelism"],
                            "world_size": params["world_size"], "stats": bench["stats"],
                            **{k: extra.get(k) for k in ("img_per_s", "first_step_s", "ratio_vs_none_eager",
                                                         "peak_mem_mb", "images_per_step", "wrapper")}}
        print(f"  {key}: {_fmt_ms(bench['stats']['median'])} ms/step  {extra.get('img_per_s', 0):,.0f} img/s  "
              f"x{extra.get('ratio_vs_none_eager') or float('nan'):.2f} vs none", flush=True)
        ctx.save()


def section_kernels_micro(ctx: Ctx) -> None:
    """In priority order, so that a spent budget drops the least important cases."""
    p = ctx.profile
    parts: List[Tuple[str, Callable[[], None]]] = []
    if p.gn_shapes:
        parts.append(("gn_film_silu", lambda: _gn_micro(ctx, p.gn_shapes[0])))
    for shape in p.attn_shapes:
        parts.append(("attention", lambda shape=shape: _attention_micro(ctx, shape)))
    for i, shape in enumerate(reversed(p.attn_shapes)):  # the longest sequence first
        parts.append(("attention_dual", lambda shape=shape, i=i: _attention_dual_micro(ctx, shape, i == 0)))
    if p.gn_shapes:
        parts.append(("gn_film_silu", lambda: _gn_micro(ctx, p.gn_shapes[0], channels_last=True)))
    for shape in p.gn_shapes[1:]:
        parts.append(("gn_film_silu", lambda shape=shape: _gn_micro(ctx, shape)))
    for name, part in parts:
        if ctx.left() < 8:
            break
        try:
            part()
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory building the inputs
            ctx.results[f"{name}_error"] = _error(exc)
            print(f"  {name}: error {ctx.results[f'{name}_error']['error'][:300]}")
            ctx.save()
            _free_memory()
        # After every part, so a section killed at its budget still leaves the record.
        _record_device_kernels(ctx, quiet=True)
    _record_device_kernels(ctx)


def _record_device_kernels(ctx: Ctx, quiet: bool = False) -> None:
    """Registers / spills / shared memory of every Triton kernel this section loaded, as the driver
    reports them: the device's answer to bench/kernel_resources.py's compile-only prediction."""
    if ctx.device.type != "cuda":
        return
    try:
        from bench.kernel_resources import device_kernel_records
        from kernels import attention, gn_film_silu

        records = device_kernel_records([attention, gn_film_silu])
        ctx.results["device_kernels"] = {"status": "ok", "records": records}
        if not quiet:
            print("  " + _device_kernels_line(records))
    except Exception as exc:  # noqa: BLE001 - a record, never a reason to lose the section
        ctx.results["device_kernels"] = {"status": "error", **_error(exc)}
    ctx.save()


def _device_kernels_line(records: List[Dict[str, Any]]) -> str:
    local = [f"{r['kernel']}({r.get('local_bytes')} B)" for r in records if r.get("local_bytes")]
    return (f"device kernels: {len(records)} loaded, max {max((r['registers'] or 0 for r in records), default=0)} "
            f"registers; local memory (spills + stack, per thread): {', '.join(local) or 'none'}")


# --------------------------------------------------------------------------------- kernel tests
def section_kernel_tests(ctx: Ctx) -> None:
    """The kernels' own tests on the GPU: the default selection, then (time left) the ``slow`` ones,
    which are slow only in the interpreter (bigger shapes, opcheck, inductor)."""
    import importlib.util

    files = sorted(glob.glob(str(REPO_ROOT / "tests" / "test_kernels_*.py")))
    if not files:
        ctx.results.update(status="skipped", reason="no tests/test_kernels_*.py yet")
        print("  no tests/test_kernels_*.py: skipped")
        return
    # addopts cleared so the selection below is ours (the project's adds -q and -m 'not slow').
    # -v: a pass stopped at its time limit shows in the log which test it was in.
    base = [sys.executable, "-m", "pytest", "-o", "addopts=", "-x", "-v", "-p", "no:cacheprovider", "-rfEs"]
    if ctx.profile.kernel_test_workers > 1 and importlib.util.find_spec("xdist") is not None:
        base += ["-n", str(ctx.profile.kernel_test_workers)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        base += ["--timeout", "120"]
    env = dict(os.environ, TRITON_INTERPRET="0")  # the tests default to the interpreter when it is unset
    log = ctx.out / "kernel_tests.log"
    log.write_text("")
    # The training-length convergence test (hundreds of UNet steps) runs last, on its own, so that
    # it cannot take the kernels' own tests down with it at the time limit. Its CPU (C++) leg is
    # CI's; here only CUDA counts.
    convergence = [f for f in files if f.endswith("test_kernels_convergence.py")]
    unit = [f for f in files if f not in convergence]
    passes = [("default", unit, ["-m", "not slow"]), ("slow", unit, ["-m", "slow"]),
              ("convergence", convergence, ["-m", "slow or not slow", "-k", "not cpu-cpp"])]
    for name, pass_files, selection in passes:
        if not pass_files:
            continue
        timeout = ctx.left() - 4
        if name == "slow":
            timeout = min(timeout, ctx.profile.kernel_slow_pass_s)
        if timeout < (10 if name == "default" else 30):
            ctx.results[name] = {"status": "skipped", "reason": "section budget spent"}
            continue
        cmd = base[:3] + pass_files + base[3:] + selection
        rec: Dict[str, Any] = {"command": " ".join(cmd[2:])}
        t0 = time.perf_counter()
        with open(log, "a") as fh:
            fh.write(f"\n===== {name}: {rec['command']}\n")
            fh.flush()
            proc = _spawn(cmd, cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            try:
                rec["returncode"] = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rec["returncode"] = None
                rec["timed_out_after_s"] = round(timeout, 1)
            finally:
                _kill_group(proc)  # xdist workers left behind, or we are being stopped
        rec["elapsed_s"] = round(time.perf_counter() - t0, 1)
        text = log.read_text(errors="replace").split(f"===== {name}:")[-1]
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        summary = next((ln for ln in reversed(lines) if re.search(r"\b(passed|failed|skipped|error|no tests ran)", ln)
                        and re.search(r" in [\d.]+s", ln)), "")
        rec["summary"] = summary.strip("= ")
        rec["counts"] = {("errors" if w.startswith("error") else w): int(n) for n, w in
                         re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", summary)}
        rec["status"] = {0: "passed", 5: "no tests ran", None: "timeout"}.get(rec["returncode"], "FAILED")
        rec["failures"] = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:10]
        ctx.results[name] = rec
        ctx.save()
        print(f"  {name}: {rec['status']} ({rec['summary'] or 'no summary line'}) in {rec['elapsed_s']}s")
        for line in rec["failures"]:
            print(f"    {line[:300]}")
        if rec["status"] not in ("passed", "no tests ran"):
            break  # -x semantics across passes too


# ------------------------------------------------------------------------------ section runner
def run_section(args: argparse.Namespace) -> int:
    ctx = Ctx(args)
    t0 = time.time()
    try:
        if args.section == "precompile":
            section_precompile(ctx, args.case)
            return 0
        globals()[f"section_{args.section}"](ctx)
        ctx.results["elapsed_s"] = time.time() - t0
        ctx.save("ok")
        return 0
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        ctx.results["section_error"] = _error(exc)["error"]
        ctx.save("error")
        return 1


# ----------------------------------------------------------------------------- orchestration
class Background(threading.Thread):
    """Compiles the train cases one after another in child processes (own process group each)."""

    def __init__(self, suite: "Suite", cases: Sequence[str]):
        super().__init__(daemon=True)
        self.suite, self.cases = suite, list(cases)
        self._stop_event = threading.Event()
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = suite.out / "precompile.log"

    def run(self) -> None:
        with open(self.log_path, "a") as log:
            for case in self.cases:
                status_path = self.suite.tmp / f"precompile_{case}.json"
                timeout = self.suite.deadline - time.time() - 40
                if self._stop_event.is_set() or timeout < 20:
                    _write_status(status_path, {"case": case, "status": "skipped", "error": "no time left"})
                    continue
                log.write(f"=== precompile {case} (timeout {timeout:.0f}s) ===\n")
                log.flush()
                self.proc = _spawn(self.suite.child_cmd("precompile", case=case), cwd=REPO_ROOT,
                                   env=self.suite.env, stdout=log, stderr=subprocess.STDOUT)
                (self.suite.tmp / "bg.pgid").write_text(str(self.proc.pid))
                try:
                    rc = self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._kill()
                    rc = "timeout"
                with contextlib.suppress(OSError):
                    (self.suite.tmp / "bg.pgid").unlink()
                if not status_path.exists():
                    _write_status(status_path, {"case": case, "status": "error", "error": f"exit {rc}"})
                self.proc = None

    def _kill(self) -> None:
        _kill_group(self.proc)

    def resume(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self._stop_event.set()
        self._kill()
        self.join(timeout=10)


class Suite:
    def __init__(self, args: argparse.Namespace, profile: Profile):
        self.args, self.profile = args, profile
        self.t0 = time.time()
        self.deadline = self.t0 + (args.budget or profile.total_s)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="fastflow_gpu_suite_"))
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        # A fresh cache per run, shared by the background compiles and the timed sections: a
        # compile killed at the deadline can leave a truncated artifact behind that a later run
        # would load (seen: "main.so: file too short").
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.tmp / "inductor"))
        if profile.name == "cpu":  # plumbing test: one thread avoids OpenMP spin-waits on shared cores
            env.setdefault("OMP_NUM_THREADS", os.environ.get("GPU_SUITE_CPU_THREADS", "1"))
        self.env = env
        self.status: Dict[str, Dict[str, Any]] = {}
        self.current: Optional[subprocess.Popen] = None

    def child_cmd(self, section: str, case: Optional[str] = None) -> List[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", section, "--profile", self.profile.name,
               "--tmp", str(self.tmp), "--out", str(self.out), "--deadline", str(self.deadline - RESERVE_S)]
        return cmd + (["--case", case] if case else [])

    def run_child(self, section: str, background: Optional[Background]) -> None:
        left = self.deadline - RESERVE_S - time.time()
        budget = min(self.profile.budgets[section] * self.args.scale_budgets, left)
        if budget < 8:
            self.status[section] = {"status": "skipped", "reason": "suite deadline", "elapsed_s": 0.0}
            print(f"--- {section}: skipped (suite deadline)", flush=True)
            return
        print(f"--- {section} (budget {budget:.0f}s, t={time.time() - self.t0:.0f}s)", flush=True)
        cmd = self.child_cmd(section)
        cmd[cmd.index("--deadline") + 1] = str(time.time() + budget - 2)
        t0 = time.time()
        proc = self.current = _spawn(cmd, cwd=REPO_ROOT, env=self.env)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = "timeout"
        finally:
            _kill_group(proc)  # its stray workers, or we are being stopped
            self.current = None
        if background is not None:
            background.resume()  # in case the section died while the background was paused
        elapsed = time.time() - t0
        doc = self.section_doc(section)
        state = "timeout" if rc == "timeout" else doc.get("status", "error" if rc else "ok")
        if rc not in (0, "timeout") and state == "ok":
            state = "error"
        if rc not in (0, "timeout") and not doc:
            state = f"crashed (exit {rc})"
        self.status[section] = {"status": state, "elapsed_s": round(elapsed, 1), "returncode": rc}
        print(f"--- {section}: {state} in {elapsed:.0f}s", flush=True)

    def section_doc(self, section: str) -> Dict[str, Any]:
        try:
            return json.loads((self.tmp / f"{section}.json").read_text())
        except (OSError, ValueError):
            return {}

    def results(self, section: str) -> Dict[str, Any]:
        return self.section_doc(section).get("results", {})

    def run(self) -> int:
        p = self.profile
        sections = [s for s in SECTIONS if not self.args.sections or s in self.args.sections]
        print(f"=== fastflow GPU suite: profile {p.name} (size {p.size}), budget {self.deadline - self.t0:.0f}s, "
              f"out {self.out}", flush=True)
        for note in p.notes:
            print(f"    {note}")
        def stop(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, stop)  # e.g. gpu_suite.sh's timeout: end the children too
        background = None
        if "train_compiled" in sections and p.precompile:
            background = Background(self, p.precompile)
            background.start()
        stopped: Optional[BaseException] = None
        try:
            for section in sections:
                self.run_child(section, background)
        except (SystemExit, KeyboardInterrupt) as exc:
            stopped = exc
            print(f"--- stopped ({type(exc).__name__}); writing what was measured", flush=True)
        finally:
            _kill_group(self.current)
            if background is not None:
                background.stop()
        try:
            self.finish(sections)
        finally:
            if not self.args.keep_tmp:
                shutil.rmtree(self.tmp, ignore_errors=True)
        return 0 if stopped is None else 1

    # ------------------------------------------------------------------------- summary + files
    def finish(self, sections: Sequence[str]) -> int:
        from bench.utils import _jsonable, write_results

        data = {s: self.results(s) for s in sections}
        env = data.get("env", {})
        device = env.get("device")
        if device is None:
            from bench.utils import device_info
            import torch

            device = device_info(torch.device("cpu" if self.profile.name == "cpu" else "cuda"))
        summary = render_summary(self.profile, device, data, self.status, time.time() - self.t0)
        doc = {"profile": self.profile.name, "size": self.profile.size, "device": device,
               "elapsed_s": time.time() - self.t0, "sections": self.status, "results": data, "summary": summary}
        (self.out / "gpu_suite.json").write_text(json.dumps(_jsonable(doc), indent=1) + "\n")
        records = bench_records(self.profile, data)
        if records:
            path = write_results(records, device, path=self.out / f"{device['slug']}_{device['date']}.json",
                                 merge=False, source=f"gpu_suite:{self.profile.name}",
                                 meta={"bench_size": self.profile.size})
            print(f"results: {path}")
        print(f"files: {', '.join(sorted(p.name for p in self.out.iterdir() if p.is_file()))}")
        print(summary, flush=True)
        return 0


# ------------------------------------------------------------------------------------ reporting
def _fmt_ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:,.2f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _median(rec: Optional[Dict[str, Any]]) -> Optional[float]:
    if not rec or rec.get("status") != "ok":
        return None
    return (rec.get("stats") or {}).get("median")


def render_summary(profile: Profile, device: Dict[str, Any], data: Dict[str, Dict[str, Any]],
                   status: Dict[str, Dict[str, Any]], elapsed: float) -> str:
    lines = [
        "",
        "=" * 100,
        f"fastflow GPU suite summary | {device.get('device_name')} | torch {device.get('torch')} | triton "
        f"{device.get('triton')} | CUDA {device.get('cuda')} | profile {profile.name} ({profile.size}) | "
        f"{device.get('datetime', device.get('date'))} | {elapsed:.0f}s",
        "sections: " + ", ".join(f"{k} {v['status']} {v.get('elapsed_s', 0):.0f}s" for k, v in status.items()),
    ]
    ceil = data.get("ceilings", {})
    if ceil:
        parts = [f"copy {ceil.get('copy_bytes_per_s', 0) / 1e9:,.0f} GB/s"]
        parts += [f"{k[7:-6]} {v / 1e12:.3g} TFLOP/s" for k, v in ceil.items()
                  if k.startswith("matmul_") and k.endswith("_flops") and k.count("_") == 3]
        lines.append("ceilings: " + "; ".join(parts))
    kt = data.get("kernel_tests", {})
    if kt:
        parts = [kt["reason"]] if kt.get("reason") else []
        for name in ("default", "slow"):
            rec = kt.get(name)
            if isinstance(rec, dict):
                parts.append(f"{name} selection {rec.get('status')}"
                             + (f" ({rec['summary']})" if rec.get("summary") else f" ({rec.get('reason', '')})"))
                parts += [f"  {line[:150]}" for line in rec.get("failures", [])[:3]]
        lines.append("kernel tests: " + "; ".join(parts))

    train = {**data.get("train_eager", {}), **data.get("train_compiled", {})}
    fm_eager = _median(train.get("flow_matching-reference-eager"))
    fm_comp = _median(train.get("flow_matching-reference-compile"))
    if train:
        lines += ["", f"train step ({profile.size} config; times in ms)",
                  f"{'case':<42}{'ms/step':>10}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'MFU/meas':>9}{'GiB':>7}{'/FM':>7}"]
        for key, rec in train.items():
            if not isinstance(rec, dict) or "status" not in rec:
                continue
            if rec["status"] != "ok":
                lines.append(f"{key:<42}{rec['status']}: {str(rec.get('error', rec.get('reason', '')))[-56:]}")
                continue
            med = _median(rec)
            fm = fm_comp if rec.get("mode") == "compile" and fm_comp else fm_eager
            mfu, mfu_m = rec.get("mfu"), rec.get("mfu_vs_measured")
            tflops = rec.get("tflops_per_s")
            # CPU: growth of the bytes in use over the step; CUDA: max allocated
            mem = rec.get("peak_mem_delta_mb" if str(rec.get("peak_mem_kind", "")).startswith("cpu_") else "peak_mem_mb") or 0
            lines.append(
                f"{key:<42}{_fmt_ms(med):>10}{rec.get('img_per_s', 0):>9,.0f}"
                f"{'-' if tflops is None else f'{tflops:.3g}':>9}"
                f"{'-' if mfu is None else f'{100 * mfu:.1f}%':>7}{'-' if mfu_m is None else f'{100 * mfu_m:.1f}%':>9}"
                f"{mem / 1024:>7.2f}{_ratio(med, fm):>7}")
        lines.append("ratios (step time):")
        for mode, fm in (("eager", fm_eager), ("compile", fm_comp)):
            parts = [f"{b} {_ratio(_median(train.get(f'fmm_{b}-reference-{mode}')), fm)}"
                     for b in ("dual", "finite_difference", "jvp")]
            lines.append(f"  FMM/FM {mode}: " + ", ".join(parts))
        layout = []
        for case in ("flow_matching", "fmm_dual"):
            for impl in ("reference", "fused"):
                nchw, cl = (_median(train.get(f"{case}-{impl}{sfx}-eager")) for sfx in ("", "_cl"))
                if nchw and cl:
                    layout.append(f"{case} {impl} {_ratio(cl, nchw)}")
        if layout:
            lines.append("  channels_last / NCHW (eager step time; < 1: channels_last faster): " + ", ".join(layout))
        course = _median(train.get("course_fmm-reference-eager"))
        if course:
            fmm = {k: _median(v) for k, v in train.items() if k.startswith("fmm_") and _median(v)}
            best = min(fmm.items(), key=lambda kv: kv[1]) if fmm else None
            parts = [f"{k} {_ratio(course, v)}" for k, v in sorted(fmm.items(), key=lambda kv: kv[1])]
            lines.append("  course baseline / FMM (speedup over the course): " + ", ".join(parts)
                         + (f"; best {best[0]}" if best else ""))
        elif "course_fmm-reference-eager" in train:
            lines.append(f"  course baseline: {train['course_fmm-reference-eager'].get('status')}")
        fm_rec = train.get("flow_matching-reference-compile") or train.get("flow_matching-reference-eager")
        if fm_rec and fm_rec.get("status") == "ok":
            pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
            lines.append(f"  FM step MFU ({fm_rec['mode']}): {pct(fm_rec.get('mfu'))} of the datasheet bf16 peak, "
                         f"{pct(fm_rec.get('mfu_vs_measured'))} of the measured matmul rate")

    dist = {k: v for k, v in data.get("train_dist", {}).items() if isinstance(v, dict) and v.get("stats")}
    if dist:
        lines += ["", "parallelism, one device (FMM dual step; DDP/FSDP2 wrappers without peers)"]
        for key, rec in dist.items():
            ratio = rec.get("ratio_vs_none_eager")
            lines.append(f"  {key}: {_fmt_ms(rec['stats']['median'])} ms  {rec.get('img_per_s') or 0:,.0f} img/s"
                         + ("" if ratio is None else f"  x{ratio:.2f} vs none"))

    micro = data.get("kernels_micro", {})
    if micro:
        lines += ["", "kernels (median ms; speedup = other / fused)"]
        groups: Dict[str, Dict[str, Dict[str, Any]]] = {}
        for key, rec in micro.items():
            m = re.match(r"(\w+)\[(.*)-(\w+)\]$", key)
            if not m or not isinstance(rec, dict):
                continue
            groups.setdefault(f"{m.group(1)}[{m.group(2)}]", {})[m.group(3)] = rec
        for name, impls in groups.items():
            base = _median(impls.get("fused") or impls.get("fused_dual"))
            parts = []
            for label, rec in impls.items():
                med = _median(rec)
                if med is None:
                    parts.append(f"{label} {rec.get('status')}")
                    continue
                extra = ""
                if rec.get("fraction_of_copy_bw"):
                    extra = f" ({100 * rec['fraction_of_copy_bw']:.0f}% copy bw)"
                elif rec.get("tflops_per_s"):
                    extra = f" ({rec['tflops_per_s']:.3g} TF/s)"
                speed = "" if label.startswith("fused") else f" [{_ratio(med, base)}]"
                parts.append(f"{label} {_fmt_ms(med)}{extra}{speed}")
            lines.append(f"  {name}: " + " | ".join(parts))
        device_kernels = micro.get("device_kernels", {})
        if device_kernels.get("status") == "ok":
            lines.append("  " + _device_kernels_line(device_kernels["records"]))
        elif device_kernels:
            lines.append(f"  device kernels: {device_kernels.get('status')} {str(device_kernels.get('error', ''))[:200]}")
    lines.append("=" * 100)
    return "\n".join(lines)


def bench_records(profile: Profile, data: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Results in bench/results format (records like pytest-benchmark's)."""
    records = []

    def add(group: str, name: str, rec: Dict[str, Any], params: Dict[str, Any]) -> None:
        if not isinstance(rec, dict) or rec.get("status") != "ok" or not rec.get("stats"):
            return
        extra = {k: v for k, v in rec.items() if k not in ("stats", "status")}
        extra["bench_size"] = profile.size
        records.append({"name": name, "fullname": f"gpu_suite::{name}", "group": group, "params": params,
                        "stats": rec["stats"], "extra_info": extra})

    for section in ("train_eager", "train_compiled"):
        for key, rec in data.get(section, {}).items():
            if isinstance(rec, dict) and "case" in rec:
                add("train_step", f"train_step[{key}]", rec, {"case": rec["case"], "impl": rec["impl"], "mode": rec["mode"]})
    for key, rec in data.get("kernels_micro", {}).items():
        add(f"kernels-{key.split('[')[0]}", key, rec, {})
    for key, rec in data.get("train_dist", {}).items():
        if isinstance(rec, dict) and "parallelism" in rec:
            add("dist_step", f"dist_step[{key}]", rec, {"case": rec["case"], "parallelism": rec["parallelism"],
                                                         "world_size": rec["world_size"]})
    ceil = data.get("ceilings", {})
    if ceil.get("copy_bytes_per_s"):
        seconds = 2 * ceil["copy_nbytes"] / ceil["copy_bytes_per_s"]
        add("ceilings", "copy", {"status": "ok", "stats": {"median": seconds, "rounds": 1},
                                 "bytes_per_s": ceil["copy_bytes_per_s"]}, {"nbytes": ceil["copy_nbytes"]})
    return records


# ------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "fastflow_gpu_suite"))
    parser.add_argument("--quick", action="store_true", default=os.environ.get("GPU_SUITE_QUICK") == "1",
                        help="~3-minute smoke (also GPU_SUITE_QUICK=1)")
    parser.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budget", type=float, default=None, help="whole-suite seconds (default: the profile's)")
    parser.add_argument("--scale-budgets", type=float, default=1.0,
                        help="multiply every section's budget (a slow or busy machine)")
    parser.add_argument("--sections", type=lambda s: [x for x in s.split(",") if x], default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the scratch folder (section JSON, Inductor cache)")
    # internal: one section in a child process
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.section:
        return run_section(args)
    if args.sections:
        unknown = set(args.sections) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA device; running the CPU dry run (--cpu)", flush=True)
            args.cpu = True
    profile = PROFILES["cpu" if args.cpu else "quick" if args.quick else "full"]
    return Suite(args, profile).run()


if __name__ == "__main__":
    sys.exit(main())
