"""Shared benchmark helpers: device and versions, timing, FLOP counts, MFU, peak memory, result files.

Used by the pytest-benchmark suites (``bench/test_bench_*.py``, through ``bench/conftest.py``) and
by the one-shot GPU suite (``bench/gpu_suite.py``); result files are written here and read by
``bench/compare.py`` (torch-free, so the tracking scripts start fast). Importing this module
imports torch but not fastflow; the helpers that build models import fastflow lazily.

Conventions
-----------
- Times are seconds; a "step" is one call of the benchmarked function; ``img/s`` = images per
  step / median step time.
- FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` on the exact config (matmul,
  conv and attention ops, 2 FLOPs per multiply-add), counted on the PyTorch reference ops so a
  fused kernel does not change the model's FLOP count.
- MFU = FLOPs per step / step time / peak. Two peaks: the datasheet's dense bf16 rate
  (:func:`peak_bf16_flops`) and the matmul rate measured on this device
  (:func:`matmul_ceiling`); CPUs have no datasheet peak here, only the measured float32 one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
RESULTS_SCHEMA = "fastflow-bench/1"

__all__ = [
    "BENCH_SIZES",
    "RESULTS_DIR",
    "TRAIN_CASES",
    "PeakMemory",
    "TrainStep",
    "autocast_for",
    "bench_config",
    "benchmark_median",
    "copy_bandwidth",
    "count_flops",
    "cpu_model",
    "device_info",
    "device_slug",
    "fill_extra_info",
    "matmul_ceiling",
    "mfu",
    "peak_bf16_flops",
    "peak_flops",
    "peak_memory",
    "records_from_pytest",
    "resolve_device",
    "results_path",
    "summarize",
    "sync",
    "throughput_metrics",
    "time_fn",
    "write_results",
]


# ----------------------------------------------------------------------------- device and versions
def resolve_device(name: Optional[str] = None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: Any = None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    device = torch.device(device) if device is not None else None
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return (out.stdout.strip() or None) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(info: Dict[str, Any]) -> str:
    """File-name form of a device: ``nvidia-h200``; CPUs add the thread count (``cpu-amd-epyc-2t``)."""
    if info.get("device_type") == "cuda":
        return _slugify(info["device_name"])
    return f"cpu-{_slugify(info.get('cpu_model') or 'unknown')}-{info.get('torch_threads', os.cpu_count())}t"


def device_info(device: Any = None) -> Dict[str, Any]:
    """Device name, torch/triton/python/CUDA/cuDNN versions, CPU model, load, date and commit."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    now = _dt.datetime.now().astimezone()
    info: Dict[str, Any] = {
        "device_type": device.type,
        "device_name": cpu_model(),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cudnn": None,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": now.strftime("%Y-%m-%d"),
        "datetime": now.isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    try:
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 - some builds raise instead of returning None
        info["cudnn"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
            cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        )
    info["slug"] = device_slug(info)
    return info


# ----------------------------------------------------------------------------------------- timing
def time_fn(fn: Callable[[], Any], device: Any, *, warmup: int = 2, reps: int = 10,
            max_seconds: Optional[float] = None, calls_per_sample: int = 1) -> List[float]:
    """Seconds per call of ``fn`` (``reps`` samples after ``warmup`` calls); CUDA events on GPUs.

    Each sample times ``calls_per_sample`` calls back to back and divides: with 1, a sample starts
    on an idle GPU and includes the launch latency of the call; with more, the CPU queues the next
    launches while the GPU runs, so a GPU-bound call is timed by its kernels alone (a call whose
    dispatch is slower than its kernels is timed by its dispatch either way).
    ``max_seconds`` stops early (after at least 2 samples) once the samples exceed it.
    """
    if calls_per_sample < 1:
        raise ValueError(f"time_fn: calls_per_sample must be >= 1, got {calls_per_sample}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    for i in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls_per_sample):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / calls_per_sample)
        else:
            t0 = time.perf_counter()
            for _ in range(calls_per_sample):
                fn()
            times.append((time.perf_counter() - t0) / calls_per_sample)
        if max_seconds is not None and i >= 1 and time.perf_counter() - start_all > max_seconds:
            break
    return times


def summarize(times: Sequence[float]) -> Dict[str, float]:
    """Median and spread of a list of seconds, in pytest-benchmark's stat names."""
    ts = sorted(times)
    n = len(ts)
    if n == 0:
        return {}
    q1, q3 = (ts[n // 4], ts[(3 * n) // 4]) if n >= 4 else (ts[0], ts[-1])
    return {
        "median": statistics.median(ts),
        "mean": statistics.fmean(ts),
        "min": ts[0],
        "max": ts[-1],
        "stddev": statistics.stdev(ts) if n > 1 else 0.0,
        "iqr": q3 - q1,
        "rounds": n,
        "iterations": 1,
    }


# ------------------------------------------------------------------------------- FLOPs and peaks
def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call ``fn(*args, **kwargs)`` (it runs once), by ``FlopCounterMode``.

    Pass a closure that does forward + backward to count both. Fused ops are counted through the
    PyTorch reference (``fastflow.ops.reference_only``) when fastflow is importable.
    """
    from torch.utils.flop_counter import FlopCounterMode

    ctx: Any = contextlib.nullcontext()
    try:
        from fastflow import ops

        if hasattr(ops, "reference_only"):
            ctx = ops.reference_only()
    except ImportError:
        pass
    with ctx, FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def peak_bf16_flops(device: Any = None) -> Optional[float]:
    """Datasheet dense bf16 FLOP/s of a known GPU (H200: 989 TFLOP/s); None for CPUs/unknown GPUs.

    Leads, not readings (see :func:`matmul_ceiling`); the table is ``fastflow.train.metrics``'s.
    """
    from fastflow.train.metrics import device_peak_flops

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    return device_peak_flops(device)


_CEILING_CACHE: Dict[Any, float] = {}


def matmul_ceiling(device: Any = None, dtype: Optional[torch.dtype] = None, n: Optional[int] = None,
                   reps: int = 10) -> float:
    """Measured FLOP/s of an n×n×n product on random data (bf16 8192³ on GPUs, float32 1024³ on CPUs).

    Cached per (device, dtype, n, threads) for the process.
    """
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 1024)
    key = (str(device), dtype, n, torch.get_num_threads())
    if key not in _CEILING_CACHE:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        times = time_fn(lambda: torch.mm(a, b), device, warmup=3, reps=reps if cuda else max(3, reps // 2))
        _CEILING_CACHE[key] = 2.0 * n**3 / statistics.median(times)
        del a, b
    return _CEILING_CACHE[key]


_BANDWIDTH_CACHE: Dict[Any, float] = {}


def copy_bandwidth(device: Any = None, nbytes: Optional[int] = None, reps: int = 10) -> float:
    """Measured bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    nbytes = nbytes or ((4 << 30) if device.type == "cuda" else (256 << 20))
    key = (str(device), nbytes)
    if key not in _BANDWIDTH_CACHE:
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        times = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=reps)
        _BANDWIDTH_CACHE[key] = 2.0 * nbytes / statistics.median(times)
        del src, dst
    return _BANDWIDTH_CACHE[key]


def peak_flops(device: Any = None, measure: bool = True) -> Dict[str, Optional[float]]:
    """{'spec': datasheet bf16 FLOP/s or None, 'measured': measured matmul FLOP/s or None}."""
    measured = None
    if measure:
        try:
            measured = matmul_ceiling(device)
        except RuntimeError:  # out of memory or no kernel for the dtype
            measured = None
    return {"spec": peak_bf16_flops(device), "measured": measured}


def mfu(flops_per_step: Optional[float], step_time: Optional[float], peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: FLOPs per step / step time / peak FLOP/s (None if any is missing)."""
    if not flops_per_step or not step_time or not peak:
        return None
    return flops_per_step / step_time / peak


# ------------------------------------------------------------------------------------ peak memory
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.lru_cache(maxsize=1)
def _mallinfo2() -> Optional[Callable[[], int]]:
    """glibc's ``mallinfo2()`` as a function returning the bytes malloc has handed out and not
    freed (heap chunks in use + mmapped chunks); None where unavailable (glibc < 2.33, musl, macOS)."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = Mallinfo2

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


class PeakMemory:
    """Peak memory of the enclosed code: ``with PeakMemory(device) as pm: ...; pm.peak_bytes``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (``peak_bytes``; ``delta_bytes`` is the
    peak above what was allocated on entry). CPU: PyTorch's CPU allocator has no peak counter, so a
    thread samples every ``interval`` seconds the bytes glibc malloc has in use (``mallinfo2``:
    what the tensors hold, like CUDA's allocated bytes, unlike the resident set, which keeps freed
    memory) — kind ``cpu_malloc_sampled``; without glibc, the resident set (``cpu_rss_sampled``,
    whose growth is ~0 once the allocator has warmed up).
    """

    def __init__(self, device: Any = None, interval: float = 0.002):
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.interval = interval
        self._probe: Callable[[], int] = _rss_bytes
        if self.device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif _mallinfo2() is not None:
            self.kind, self._probe = "cpu_malloc_sampled", _mallinfo2()
        else:
            self.kind = "cpu_rss_sampled"
        self.baseline_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._probe())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.baseline_bytes = self.peak_bytes = self._probe()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._probe())

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "peak_mem_mb": round(self.peak_bytes / 2**20, 1),
            "peak_mem_delta_mb": round(self.delta_bytes / 2**20, 1),
            "peak_mem_kind": self.kind,
        }


def peak_memory(device: Any = None) -> PeakMemory:
    """Context manager measuring peak memory on ``device`` (see :class:`PeakMemory`)."""
    return PeakMemory(device)


# ------------------------------------------------------------------------------ benchmark configs
_COMMON = ["model.dropout=0.0", "data.channels=3"]  # same network for every method (FD needs dropout 0)
BENCH_SIZES: Dict[str, List[str]] = {
    # The real config: Config() defaults (base 128, [1,2,2,4], 2 ResBlocks, attention at 16 and 8, 64×64).
    "default": ["training.batch_size=128"],
    # CPU-sized (the digits demo's network at 16×16): seconds per case on 2 cores.
    "small": [
        "model.base_channels=32", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[8]", "model.num_heads=2", "model.num_groups=8",
        "data.image_size=16", "training.batch_size=8",
    ],
    # Smoke-test size (gpu_suite --cpu).
    "tiny": [
        "model.base_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1",
        "model.attention_resolutions=[8]", "model.num_heads=2", "model.num_groups=4",
        "data.image_size=16", "training.batch_size=4",
    ],
}

# Train-step cases: id -> (method, FMM derivative backend or None).
TRAIN_CASES: Dict[str, tuple] = {
    "ddpm": ("ddpm", None),
    "ddpm_x0": ("ddpm_x0", None),
    "flow_matching": ("flow_matching", None),
    "fmm_dual": ("flow_map_matching", "dual"),
    "fmm_finite_difference": ("flow_map_matching", "finite_difference"),
    "fmm_jvp": ("flow_map_matching", "jvp"),
}


def bench_config(method: str = "flow_matching", size: str = "small", derivative: Optional[str] = None,
                 fused: bool = False, batch_size: Optional[int] = None, overrides: Sequence[str] = ()) -> Any:
    """A :class:`fastflow.config.Config` for a benchmark: ``size`` in :data:`BENCH_SIZES`."""
    from fastflow.config import load_config

    items = [f"method={method}", *_COMMON, *BENCH_SIZES[size], f"model.fused_kernels={str(bool(fused)).lower()}"]
    if derivative is not None:
        items.append(f"flow_map_matching.derivative={derivative}")
    if batch_size is not None:
        items.append(f"training.batch_size={batch_size}")
    items.extend(overrides)
    return load_config(None, items)


def autocast_for(device: torch.device, enabled: Optional[bool] = None) -> Any:
    """bf16 autocast on CUDA (the real config's precision), nothing on the CPU (float32)."""
    if enabled is None:
        enabled = device.type == "cuda"
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class TrainStep:
    """One training step as fastflow.train.Trainer runs it: loss (autocast) → backward → clip →
    AdamW (fused on CUDA) → zero_grad → EMA update.

    ``step()`` queues the work; ``__call__`` also syncs (what a benchmark times). ``compile``
    compiles the method as one module (``torch.compile(method)``, whose forward is
    ``compute_loss``: the Trainer's ``infrastructure.compile=step``); FLOPs are always counted on
    the eager method. ``method`` replaces the config's method (e.g. the course baseline).
    """

    def __init__(self, config: Any, device: Any, *, compile: bool = False, compile_mode: str = "default",
                 seed: int = 0, autocast: Optional[bool] = None, method: Optional[torch.nn.Module] = None,
                 ema: bool = True):
        from fastflow.methods import create_method_from_config

        self.config = config
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        torch.manual_seed(seed)
        self.method = (method if method is not None else create_method_from_config(config)).to(self.device)
        self.method.train()
        self.batch_size = config.training.batch_size
        d = config.data
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.x = torch.rand(self.batch_size, d.channels, d.image_size, d.image_size, device=self.device,
                            generator=gen) * 2 - 1  # images live in [-1, 1]
        if config.infrastructure.channels_last:  # as the Trainer does: weights and batch, once
            self.method.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        t = config.training
        kwargs: Dict[str, Any] = dict(lr=t.learning_rate, betas=tuple(t.betas), weight_decay=t.weight_decay)
        if self.device.type == "cuda":
            kwargs["fused"] = True
        self.params = [p for p in self.method.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, **kwargs)
        self.clip = t.gradient_clip_norm
        self.ema = None
        if ema:
            try:
                from fastflow.train.ema import EMA

                self.ema = EMA(self.method.model, decay=t.ema_decay, warmup_steps=t.ema_start)
            except ImportError:
                self.ema = None
        self.autocast_enabled = self.device.type == "cuda" if autocast is None else autocast
        self.compiled = compile
        self.loss_fn = torch.compile(self.method, mode=compile_mode) if compile else self.method

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def forward_backward(self, loss_fn: Optional[Callable] = None) -> torch.Tensor:
        with autocast_for(self.device, self.autocast_enabled):
            loss, _ = (loss_fn or self.loss_fn)(self.x)
        loss.backward()
        return loss

    def step(self) -> torch.Tensor:
        loss = self.forward_backward()
        if self.clip and self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return loss

    def __call__(self) -> None:
        self.step()
        sync(self.device)

    def count_flops(self) -> int:
        """FLOPs of loss + backward of one step (eager, reference ops); gradients are dropped after."""
        flops = count_flops(self.forward_backward, self.method)
        self.optimizer.zero_grad(set_to_none=True)
        return flops

    def measure_peak_memory(self) -> PeakMemory:
        with PeakMemory(self.device) as pm:
            self()
        return pm


# ------------------------------------------------------------------------ pytest-benchmark glue
def benchmark_median(benchmark: Any) -> Optional[float]:
    """The median seconds of a finished pytest-benchmark fixture (None when benchmarks are disabled)."""
    meta = getattr(benchmark, "stats", None)
    stats = getattr(meta, "stats", None)
    try:
        return float(stats.median) if stats is not None and stats.rounds else None
    except (AttributeError, TypeError, statistics.StatisticsError):
        return None


def throughput_metrics(device: Any, step_time: Optional[float], *, images_per_step: Optional[int] = None,
                       flops_per_step: Optional[float] = None, peak_mem: Optional[PeakMemory] = None,
                       peaks: Optional[Dict[str, Optional[float]]] = None) -> Dict[str, Any]:
    """img/s, TFLOP/s, MFU (vs datasheet and vs measured matmul peak) and peak memory, as a dict."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    out: Dict[str, Any] = {}
    if step_time:
        out["step_time_median_s"] = step_time
    if images_per_step:
        out["images_per_step"] = images_per_step
        if step_time:
            out["img_per_s"] = images_per_step / step_time
    if flops_per_step:
        peaks = peaks if peaks is not None else peak_flops(device)
        out["flops_per_step"] = flops_per_step
        out["peak_flops_spec"] = peaks.get("spec")
        out["peak_flops_measured"] = peaks.get("measured")
        if step_time:
            out["tflops_per_s"] = flops_per_step / step_time / 1e12
            out["mfu"] = mfu(flops_per_step, step_time, peaks.get("spec"))
            out["mfu_vs_measured"] = mfu(flops_per_step, step_time, peaks.get("measured"))
    if peak_mem is not None:
        out.update(peak_mem.as_dict())
    return out


def fill_extra_info(benchmark: Any, *, device: Any, images_per_step: Optional[int] = None,
                    flops_per_step: Optional[float] = None, peak_mem: Optional[PeakMemory] = None,
                    info: Optional[Dict[str, Any]] = None, **extra: Any) -> Dict[str, Any]:
    """Put img/s, MFU, peak memory, device and versions (plus ``extra``) into ``benchmark.extra_info``.

    Call after the benchmark ran (it reads the median from ``benchmark.stats``).
    """
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    info = info or device_info(device)
    extra_info = benchmark.extra_info
    extra_info.update(
        device=info["device_name"], device_slug=info["slug"], torch=info["torch"], triton=info["triton"],
        cuda=info["cuda"], python=info["python"], torch_threads=torch.get_num_threads(),
    )
    extra_info.update(throughput_metrics(device, benchmark_median(benchmark), images_per_step=images_per_step,
                                         flops_per_step=flops_per_step, peak_mem=peak_mem))
    extra_info.update(extra)
    return extra_info


# ----------------------------------------------------------------------------------- result files
def results_path(info: Dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """``bench/results/<device-slug>_<YYYY-MM-DD>.json``."""
    return Path(results_dir) / f"{info['slug']}_{info['date']}.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def records_from_pytest(benchmarks: Iterable[Any]) -> List[Dict[str, Any]]:
    """pytest-benchmark's per-test ``Metadata`` objects -> plain result records."""
    records = []
    for bench in benchmarks:
        stats = getattr(bench, "stats", None)
        if stats is None or not getattr(stats, "rounds", 0):
            continue
        record_stats = {}
        for key in ("median", "mean", "min", "max", "stddev", "iqr", "rounds", "iterations"):
            try:
                record_stats[key] = getattr(stats, key)
            except (AttributeError, statistics.StatisticsError, ZeroDivisionError):
                record_stats[key] = None
        if record_stats.get("iterations") is None:
            record_stats["iterations"] = getattr(bench, "iterations", 1)
        records.append({
            "name": bench.name,
            "fullname": bench.fullname,
            "group": bench.group,
            "params": bench.params,
            "stats": record_stats,
            "extra_info": dict(bench.extra_info),
        })
    return records


def write_results(records: Sequence[Dict[str, Any]], info: Dict[str, Any], *, path: Optional[Path] = None,
                  merge: bool = True, source: str = "pytest", meta: Optional[Dict[str, Any]] = None) -> Path:
    """Write records to ``results_path(info)`` (or ``path``); with ``merge`` keep the same-day file's
    records whose ``fullname`` is not among the new ones (so suites run separately accumulate)."""
    path = Path(path) if path is not None else results_path(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_names = {r.get("fullname") or r["name"] for r in records}
    kept: List[Dict[str, Any]] = []
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text())
            kept = [r for r in old.get("benchmarks", []) if (r.get("fullname") or r["name"]) not in new_names]
        except (OSError, ValueError, KeyError):
            kept = []
    doc = {
        "schema": RESULTS_SCHEMA,
        "source": source,
        "device": info,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        **(meta or {}),
        "benchmarks": kept + list(records),
    }
    text = json.dumps(_jsonable(doc), indent=1, sort_keys=False) + "\n"
    # Atomically: the GPU suite and dist_step rewrite their file after every case and may be
    # killed at a time limit mid-write.
    from fastflow.io import atomic_write

    atomic_write(path, lambda handle: handle.write(text.encode()))
    return path
