"""Every Triton kernel a training step launches compiles for sm_90 (H100/H200) and fits it.

The interpreter (how CI runs the kernels' numerics) has no registers, no shared memory and no
minimum tile, so it accepts kernels that a real compile rejects or that spill. These tests run
``bench/kernel_resources.py``: the real training step at the shipped CelebA-64 config, every Triton
launch compiled by Triton's bundled LLVM + ptxas for sm_90 instead of launched, and fail on a
compile error, shared memory over the per-block limit, or a register spill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernel_resources.py"


def run_report(tmp_path: Path, *args: str, timeout: int = 1200) -> dict:
    out = tmp_path / "resources.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, str(SCRIPT), "--check", "--no-spills", "--json", str(out), *args],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_shipped_fmm_step_kernels_fit_sm90(tmp_path):
    """configs/fmm.yaml's step (bf16 autocast, dual derivative): every GroupNorm and attention
    kernel, forward, backward, dual and dual backward, at the real shapes, NCHW and (the grouped
    GroupNorm kernels) channels_last."""
    report = run_report(tmp_path, "--cases", "fmm_dual", "--precision", "bf16", "--layouts", "nchw,channels_last")
    kernels = {r["kernel"] for r in report["records"]}
    assert {"_gn_film_silu_fwd_kernel", "_gn_film_silu_bwd_kernel", "_gn_film_silu_dual_kernel",
            "_gn_film_silu_dual_bwd_kernel", "_attention_dual_kernel", "_attention_dual_bwd_dkdv_kernel",
            "_attention_dual_bwd_dq_kernel", "_attention_bwd_preprocess_kernel"} <= kernels
    assert {"_gn_film_silu_cl_fwd_kernel", "_gn_film_silu_cl_bwd_kernel", "_gn_film_silu_cl_dual_kernel",
            "_gn_film_silu_cl_dual_bwd_kernel"} <= kernels
    # The UNet's attention runs at head dims 64 (16x16) and 128 (8x8).
    head_dims = {r["constexprs"].get("HEAD_DIM") for r in report["records"] if r["kernel"] == "_attention_dual_kernel"}
    assert head_dims == {64, 128}
    for r in report["records"]:
        assert r["ok"] and r["registers"] <= 255, r
    assert not report["problems"]


@pytest.mark.slow
def test_every_training_kernel_fits_sm90(tmp_path):
    """FM, FMM dual and FMM jvp (whose derivative pass runs in float32) in bf16 and float32, and
    attention alone at head dims 32/64/128 in bf16, fp16 and float32."""
    report = run_report(tmp_path, "--cases", "fm,fmm_dual,fmm_jvp", "--precision", "bf16,fp32",
                        "--head-dims", "32,64,128", "--attention-dtypes", "bf16,fp16,fp32", timeout=2400)
    assert len(report["records"]) > 100 and not report["problems"]


_DEVICE_RECORDS_SCRIPT = r"""
import json, torch
from bench import kernel_resources as kr
from kernels import gn_film_silu as gn

recorder = kr.CompileOnlyLaunches(90)
x = torch.zeros(2, 64, 8, 8, dtype=torch.bfloat16)
with recorder.installed():
    gn._gn_film_silu_fwd(x, torch.ones(64), torch.zeros(64), None, None, 32, 1e-5, True)
(fn, compiled), = recorder.compiled.values()
# As a GPU launch leaves it: the CompiledKernel in the JITFunction's per-device cache.
fn.device_caches = {0: ({"key": compiled}, None, None, None, None)}
print(json.dumps(kr.device_kernel_records([gn])))
"""


def test_device_kernel_records_read_compiled_kernels():
    """The GPU suite's on-device record reads Triton's per-device kernel cache: name, constexprs,
    pointer dtypes, warps, stages and shared memory (registers/spills exist only once loaded)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", _DEVICE_RECORDS_SCRIPT], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["kernel"] == "_gn_film_silu_fwd_kernel"
    assert record["constexprs"]["SILU"] is True and record["constexprs"]["HAS_SCALE"] is False
    assert record["constexprs"]["BLOCK_C"] * record["constexprs"]["BLOCK_HW"] >= 2 * 64
    assert "*bf16" in record["dtypes"] and record["num_warps"] >= 1 and record["shared"] >= 0
    assert record["registers"] is None and record["local_bytes"] is None
