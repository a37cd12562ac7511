"""pytest options, markers and fixtures shared by the benchmark suites.

    pytest bench/ --benchmark-only                      # CPU-sized configs here, the real config on CUDA
    pytest bench/ --benchmark-only --bench-size default # force the real config (base 128, 64×64, batch 128)
    pytest bench/ --benchmark-only -m "not compile"     # skip the torch.compile cases
    pytest bench/ --benchmark-only --bench-save         # also write bench/results/<device>_<date>.json

Options: ``--bench-size auto|small|default`` (auto: default on CUDA, small otherwise),
``--bench-device auto|cpu|cuda``, ``--bench-compile auto|all|none`` (auto: every compile case on
CUDA, only the UNet fwd_bwd reference one on the CPU, where a cold compile costs 1-5 min),
``--bench-rounds N``, ``--bench-threads N`` (torch.set_num_threads), ``--bench-save``.
Markers: ``compile`` (torch.compile cases), ``slow`` (minutes on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import pytest
import torch

from bench import utils


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("fastflow-bench", "fastflow benchmark suites")
    group.addoption("--bench-size", choices=("auto", "small", "default", "tiny"), default="auto",
                    help="config size: auto = default on CUDA, small otherwise")
    group.addoption("--bench-device", default="auto", help="auto | cpu | cuda")
    group.addoption("--bench-compile", choices=("auto", "all", "none"), default="auto",
                    help="which torch.compile cases run (auto: all on CUDA, only unet[fwd_bwd-reference-compile] on CPU)")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per case")
    group.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads for the session")
    group.addoption("--bench-save", action="store_true", default=False,
                    help="write the results to bench/results/<device-slug>_<YYYY-MM-DD>.json (merging that day's file)")


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "compile: a torch.compile benchmark case (deselect with -m 'not compile')")
    config.addinivalue_line("markers", "slow: takes minutes on a CPU")


@dataclass
class BenchContext:
    """What every suite needs to size and label its cases."""

    device: torch.device
    size: str
    compile_policy: str  # all | cpu-reduced | none
    rounds: int
    warmup_rounds: int
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def require_compile(self, heavy: bool = False) -> None:
        """Skip a compile case the policy excludes (``heavy``: skipped on the CPU under auto)."""
        if self.compile_policy == "none":
            pytest.skip("--bench-compile=none")
        if heavy and self.compile_policy == "cpu-reduced":
            pytest.skip("CPU: only unet[fwd_bwd-reference-compile] compiles under --bench-compile=auto "
                        "(a cold compile costs 1-5 min here); --bench-compile=all runs this one")

    def config(self, method: str = "flow_matching", **kwargs: Any) -> Any:
        return utils.bench_config(method, self.size, **kwargs)


@pytest.fixture(scope="session")
def bench_ctx(pytestconfig: Any) -> BenchContext:
    device = utils.resolve_device(pytestconfig.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device=cuda but CUDA is not available")
    threads: Optional[int] = pytestconfig.getoption("--bench-threads")
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":  # recorded in device_info; the GPU suite sets the same
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    size = pytestconfig.getoption("--bench-size")
    if size == "auto":
        size = "default" if device.type == "cuda" else "small"
    policy = pytestconfig.getoption("--bench-compile")
    if policy == "auto":
        policy = "all" if device.type == "cuda" else "cpu-reduced"
    rounds = pytestconfig.getoption("--bench-rounds") or (10 if device.type == "cuda" else 3)
    info = utils.device_info(device)
    info["bench_size"] = size
    pytestconfig._fastflow_bench_info = info
    return BenchContext(device=device, size=size, compile_policy=policy, rounds=rounds,
                        warmup_rounds=2 if device.type == "cuda" else 1, info=info)


def pytest_benchmark_update_machine_info(config: Any, machine_info: Dict[str, Any]) -> None:
    """``--benchmark-json`` / ``--benchmark-save`` files carry our device info too."""
    info = getattr(config, "_fastflow_bench_info", None)
    if info is None:
        try:
            info = utils.device_info(utils.resolve_device(config.getoption("--bench-device")))
        except Exception:  # noqa: BLE001 - never break pytest-benchmark's report
            return
    machine_info["fastflow_device"] = info


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    config = session.config
    try:
        save = config.getoption("--bench-save")
    except ValueError:
        return
    bench_session = getattr(config, "_benchmarksession", None)
    if not save or bench_session is None:
        return
    records = utils.records_from_pytest(bench_session.benchmarks)
    if not records:
        return
    info = getattr(config, "_fastflow_bench_info", None) or utils.device_info()
    path = utils.write_results(records, info, source="pytest", meta={"bench_size": info.get("bench_size")})
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"fastflow bench: {len(records)} results written to {path}")
