"""Compile every Triton kernel a training step launches for a GPU target, without a GPU, and
report what each compiled kernel needs: registers per thread, spill bytes, shared memory, and
how many programs fit on one SM.

    python bench/kernel_resources.py                         # FM, FMM dual, FMM jvp at the real config
    python bench/kernel_resources.py --precision bf16,fp32 --head-dims 32,64,128 --json out.json
    python bench/kernel_resources.py --check                 # exit 1 on a compile error, a kernel
                                                             # that cannot launch, or (--no-spills) a spill

How: the real training step (``bench.utils.TrainStep`` on the shipped CelebA-64 config, batch 2,
fused kernels forced to Triton) runs on the CPU while ``JITFunction.run`` is replaced by a
compile-only stand-in. Each launch goes through Triton's own argument binder and specialisation
(dtypes, 16-byte alignment, ints divisible by 16, ints equal to 1) exactly as a GPU launch would,
and is compiled with ``triton.compile(..., target=GPUTarget("cuda", ARCH, 32))`` by the bundled
LLVM and ptxas. The attention launchers' tile heuristics are asked for their CUDA choice. Kernel
outputs are left unwritten (the step's numbers are garbage; only launch shapes matter), so this
measures resources, not correctness or speed.

Resources come from the cubin (``cuobjdump -res-usage``: registers, stack) and from ptxas' own
report of the same PTX (``ptxas -v``: spill stores/loads); dynamic shared memory is Triton's
``metadata.shared``. Limits (sm_90, H100/H200): 255 registers per thread, 64 Ki registers and
228 KiB shared memory per SM, 227 KiB per block. A kernel whose shared memory exceeds the
per-block limit raises ``OutOfResources`` at launch (the attention launcher then retries with
halved tiles); spills cost local-memory traffic in every iteration of the inner loop.

Run it after changing a kernel or a tile heuristic: it is the check the Triton interpreter
cannot make (the interpreter has no registers, no shared memory and no minimum dot tile).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

if __name__ == "__main__":
    # A real compile, not the interpreter: must be decided before triton is imported.
    os.environ["TRITON_INTERPRET"] = "0"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# sm_90 (Hopper: H100, H200) per-SM and per-block limits.
LIMITS = {
    90: dict(max_regs_per_thread=255, regs_per_sm=65536, smem_per_sm=233472, smem_per_block=232448,
             max_threads_per_sm=2048, max_blocks_per_sm=32, smem_reserved_per_block=1024),
}

# Training cases: id -> (method, FMM derivative backend or None).
CASES = {
    "fm": ("flow_matching", None),
    "fmm_dual": ("flow_map_matching", "dual"),
    "fmm_jvp": ("flow_map_matching", "jvp"),
}
LAYOUTS = {"nchw": "", "channels_last": "-cl"}  # layout → case-label suffix


def _tool(name: str) -> Optional[str]:
    """A CUDA binary bundled with triton (ptxas, cuobjdump), else one on PATH."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _parse_ptxas_log(log: str) -> Dict[str, int]:
    """Spill stores/loads and registers from ptxas -v output (Triton runs ptxas with -v)."""
    report: Dict[str, int] = {}
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if match:
        report["spill_stores"], report["spill_loads"] = int(match.group(1)), int(match.group(2))
    match = re.search(r"Used (\d+) registers", log)
    if match:
        report["ptxas_registers"] = int(match.group(1))
    return report


def _cubin_usage(cubin: bytes) -> Dict[str, int]:
    """REG / STACK / static SHARED of the compiled cubin (cuobjdump -res-usage)."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key, name in (("REG", "registers"), ("STACK", "stack"), ("SHARED", "static_shared")):
        match = re.search(rf"\b{key}:(\d+)", out)
        if match:
            usage[name] = int(match.group(1))
    return usage


def occupancy(registers: int, threads: int, smem: int, arch: int = 90) -> Dict[str, Any]:
    """Programs (thread blocks) per SM allowed by registers, shared memory and threads."""
    lim = LIMITS[arch]
    # Registers are allocated per warp in units of 256 (8 per thread, rounded up).
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = lim["regs_per_sm"] // (regs_per_warp * (threads // 32))
    by_smem = lim["smem_per_sm"] // (smem + lim["smem_reserved_per_block"]) if smem else lim["max_blocks_per_sm"]
    by_threads = lim["max_threads_per_sm"] // threads
    blocks = min(by_regs, by_smem, by_threads, lim["max_blocks_per_sm"])
    limiter = min((by_regs, "registers"), (by_smem, "shared"), (by_threads, "threads"))[1]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * threads // 32, limited_by=limiter)


@contextlib.contextmanager
def _ptxas_log_printed() -> Iterator[None]:
    previous = triton.knobs.nvidia.dump_ptxas_log
    triton.knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        triton.knobs.nvidia.dump_ptxas_log = previous


class CompileOnlyLaunches:
    """Replace ``JITFunction.run`` so a launch compiles for ``GPUTarget("cuda", arch, 32)`` and records
    the kernel's resources instead of running. Each distinct (kernel, specialisation, options) is
    compiled once."""

    def __init__(self, arch: int = 90, label: str = "", attention_override: Optional[Dict[str, Dict[str, int]]] = None):
        from triton.compiler.compiler import make_backend

        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.records: Dict[str, Dict[str, Any]] = {}
        self.label = label
        # kernel name ("fwd", "dual_bwd_dkdv", ...) -> full launch config replacing the heuristic's.
        self.attention_override = attention_override if attention_override is not None else {}
        self._binders: Dict[int, Any] = {}
        self.compiled: Dict[str, Any] = {}  # key -> (JITFunction, CompiledKernel)

    def _binder(self, fn: JITFunction):
        if id(fn) not in self._binders:
            self._binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self.backend)
        return self._binders[id(fn)]

    def run(self, fn: JITFunction, args: tuple, kwargs: Dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or False
        kwargs.setdefault("instrumentation_mode", "")
        bound_args, specialization, options = self._binder(fn)(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound_args, specialization,
                                                              options)
        names = [p.name for p in fn.params]
        const_desc = {names[path[0]]: value for path, value in constexprs.items()
                      if fn.params[path[0]].is_constexpr}
        specialised = sorted(names[path[0]] for path in constexprs if not fn.params[path[0]].is_constexpr)
        pointers = {k: v for k, v in signature.items() if v.startswith("*")}
        key = json.dumps([fn.__name__, signature, {k: str(v) for k, v in const_desc.items()}, specialised,
                          sorted(str(k) for k in attrs), options.num_warps, options.num_stages], sort_keys=True)
        if key in self.records:
            self.records[key]["launches"] += 1
            self.records[key]["cases"].add(self.label)
            return
        record: Dict[str, Any] = dict(
            kernel=fn.__name__, constexprs={k: (v if isinstance(v, (int, float, bool)) else str(v))
                                            for k, v in const_desc.items()},
            specialised_to_1=specialised, dtypes=sorted(set(pointers.values())),
            num_warps=options.num_warps, num_stages=options.num_stages, launches=1, cases={self.label},
            arch=self.arch,
        )
        start = time.perf_counter()
        try:
            src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
            # Triton's own ptxas -v log (printed with dump_ptxas_log); the private cache directory
            # makes every kernel compile here, so every kernel has its log.
            log = io.StringIO()
            with _ptxas_log_printed(), contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=self.target, options=options.__dict__)
        except Exception as exc:  # noqa: BLE001 (reported, not hidden: --check fails on it)
            record.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        else:
            self.compiled[key] = (fn, compiled)
            record.update(ok=True, shared=int(compiled.metadata.shared))
            record.update(_cubin_usage(compiled.asm["cubin"]))
            record.update(_parse_ptxas_log(log.getvalue()))
            if "registers" in record:
                record.update(occupancy(record["registers"], 32 * options.num_warps, record["shared"], self.arch))
        record["compile_s"] = round(time.perf_counter() - start, 2)
        self.records[key] = record

    @contextlib.contextmanager
    def installed(self) -> Iterator["CompileOnlyLaunches"]:
        """Within: every Triton launch compiles-and-records; the attention tile heuristic answers
        for CUDA; CPU tensors are accepted as stand-ins for device tensors."""
        from kernels import attention as attn

        recorder = self
        original_run = JITFunction.run
        original_config = attn._attention_config
        original_check = attn._check_inputs

        def run(fn, *args, grid=None, warmup=False, **kwargs):
            recorder.run(fn, args, kwargs)

        def cuda_config(kernel, head_dim, head_dim_v, dtype, device):
            config = original_config(kernel, head_dim, head_dim_v, dtype, torch.device("cuda"))
            config.update(recorder.attention_override.get(kernel, {}))
            return config

        def check_inputs(q, k, v):
            previous = os.environ.get("TRITON_INTERPRET")
            os.environ["TRITON_INTERPRET"] = "1"  # only the launcher's CPU guard reads it here
            try:
                original_check(q, k, v)
            finally:
                os.environ["TRITON_INTERPRET"] = previous if previous is not None else "0"

        JITFunction.run = run
        attn._attention_config, attn._check_inputs = cuda_config, check_inputs
        try:
            yield self
        finally:
            JITFunction.run = original_run
            attn._attention_config, attn._check_inputs = original_config, original_check


@contextlib.contextmanager
def float32_cpu_convolutions() -> Iterator[None]:
    """Convolutions in float32, returned in the autocast dtype, while the training step runs.

    The CPU part of the step only has to hand the Triton launches tensors of the dtypes, shapes
    and strides a GPU step would: its numbers are not used. bf16 convolutions on a CPU without
    native bf16 (the project's AMD EPYC machines) run ~60x slower than float32 (3.5 s vs 0.06 s
    for one 256-channel 32x32 conv), which made the bf16 cases take half an hour there. The
    result is cast back to what autocast would have produced (bf16), so the kernels compiled
    are the same; backward flows through the casts into the same bf16 gradients.
    """
    functional = torch.nn.functional
    original = functional.conv2d

    def conv2d(input, weight, bias=None, *args, **kwargs):
        autocast = torch.is_autocast_enabled("cpu")
        dtype = torch.get_autocast_dtype("cpu") if autocast else input.dtype
        with torch.autocast("cpu", enabled=False):
            out = original(input.float(), weight.float(), None if bias is None else bias.float(), *args, **kwargs)
        return out.to(dtype)

    functional.conv2d = conv2d
    try:
        yield
    finally:
        functional.conv2d = original


def run_training_launches(recorder: CompileOnlyLaunches, cases: List[str], precisions: List[str],
                          batch_size: int = 2, size: str = "default", layouts: Iterable[str] = ("nchw",)) -> None:
    """One forward+backward of each training case at the real config, launches compiled-only.

    ``layouts``: ``nchw`` and/or ``channels_last`` (infrastructure.channels_last: weights and batch
    channels_last, which the GroupNorm kernels run in place, so they compile to their own variants).
    """
    from bench.utils import TrainStep, bench_config

    os.environ["FASTFLOW_OPS_BACKEND"] = "triton"
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"--layouts: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
        for precision in precisions:
            for case in cases:
                method, derivative = CASES[case]
                config = bench_config(method, size, derivative, fused=True, batch_size=batch_size)
                config.infrastructure.channels_last = layout == "channels_last"
                step = TrainStep(config, torch.device("cpu"), autocast=precision == "bf16", ema=False)
                recorder.label = f"{case}-{precision}" + LAYOUTS[layout]
                with recorder.installed(), float32_cpu_convolutions():
                    step.forward_backward()


def _attention_stand_ins(dtype: torch.dtype, head_dim: int, seqlen: int) -> List[torch.Tensor]:
    """q, k, v, q̇, k̇, v̇ of shape (1, 1, seqlen, head_dim): only their dtype and shape reach the compile."""
    return [torch.zeros(1, 1, seqlen, head_dim, dtype=dtype, requires_grad=True) for _ in range(6)]


def run_attention_launches(recorder: CompileOnlyLaunches, head_dims: List[int], dtypes: List[torch.dtype],
                           seqlen: int = 256) -> None:
    """Plain and dual attention forward+backward for each head dim and dtype (shapes beyond the UNet's)."""
    from kernels import attention as attn

    for dtype in dtypes:
        for head_dim in head_dims:
            recorder.label = f"attention-d{head_dim}-{str(dtype).replace('torch.', '')}"
            q, k, v, qd, kd, vd = _attention_stand_ins(dtype, head_dim, seqlen)
            with recorder.installed():
                attn.attention_triton(q, k, v).sum().backward()
                o, o_dot = attn.attention_dual_triton(q, qd, k, kd, v, vd)
                (o.sum() + o_dot.sum()).backward()


SWEEP_TILES = [(16, 32), (32, 16), (32, 32), (32, 64), (64, 32), (64, 64), (32, 128), (128, 32),
               (64, 128), (128, 64), (128, 128)]


def live_tile_elements(kernel: str, m: int, n: int, d: int, dv: int, element_bytes: int) -> float:
    """Rough per-program live register footprint (in 4-byte words) of an attention kernel's tiles:
    its float32 accumulators, the input tiles it keeps across the loop, and the score tiles of one
    iteration. Used only to skip hopeless sweep candidates before a slow ptxas run."""
    b = element_bytes / 4
    return {
        "fwd": m * dv + m * d * b + m * n,
        "dual": 2 * m * dv + 2 * m * d * b + 2 * m * n,
        "bwd_dkdv": n * d + n * dv + (n * d + n * dv) * b + n * m,
        "bwd_dq": m * d + (m * d + m * dv) * b + m * n,
        "dual_bwd_dkdv": 2 * n * d + 2 * n * dv + 2 * (n * d + n * dv) * b + 3 * n * m,
        "dual_bwd_dq": 2 * m * d + 2 * (m * d + m * dv) * b + 3 * m * n,
    }[kernel]


def sweep_attention(recorder: CompileOnlyLaunches, kernels: List[str], head_dims: List[int],
                    dtypes: List[torch.dtype], warps=(4, 8), stages=(1, 2), tiles=SWEEP_TILES,
                    seqlen: int = 256) -> None:
    """Compile each attention kernel over a grid of (BLOCK_M, BLOCK_N, num_warps, num_stages) for
    each head dim and dtype; the records then hold every candidate's resources."""
    from kernels import attention as attn

    for dtype in dtypes:
        for head_dim in head_dims:
            q, k, v, qd, kd, vd = _attention_stand_ins(dtype, head_dim, seqlen)
            o, o_dot = torch.zeros_like(q), torch.zeros_like(q)
            lse, mu = (torch.zeros(1, 1, seqlen) for _ in range(2))
            # The launcher that runs each kernel (the other kernels it launches compile once, cached).
            launch = {
                "fwd": lambda: attn._attention_fwd_launch(q, k, v),
                "bwd_dkdv": lambda: attn._attention_bwd_launch(o, q, k, v, o, lse),
                "dual": lambda: attn._attention_dual_fwd_launch(q, qd, k, kd, v, vd),
                "dual_bwd_dkdv": lambda: attn._attention_dual_bwd_launch(o, o_dot, q, qd, k, kd, v, vd, o, o_dot,
                                                                         lse, mu),
            }
            launch["bwd_dq"], launch["dual_bwd_dq"] = launch["bwd_dkdv"], launch["dual_bwd_dkdv"]
            d = max(16, triton.next_power_of_2(head_dim))
            for name in kernels:
                recorder.label = f"sweep-{name}-d{head_dim}-{str(dtype).replace('torch.', '')}"
                for (block_m, block_n), num_warps, num_stages in itertools.product(tiles, warps, stages):
                    words = live_tile_elements(name, block_m, block_n, d, d, dtype.itemsize) / (32 * num_warps)
                    if words > 2 * LIMITS[recorder.arch]["max_regs_per_thread"]:
                        continue  # > 2x the register file per thread: spills by construction
                    recorder.attention_override = {name: dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                                                              num_stages=num_stages)}
                    with recorder.installed(), torch.no_grad():
                        launch[name]()
            recorder.attention_override = {}


def device_kernel_records(modules: List[Any]) -> List[Dict[str, Any]]:
    """Resources of the kernels this process compiled and loaded on a real device: registers and
    local memory as the driver reports them (``CompiledKernel.n_regs``; ``n_spills``, which holds
    local bytes / 4, as ``local_bytes``; set at the first launch). The GPU suite records them, the
    on-device check of this file's compile-only numbers."""
    records = []
    for module in modules:
        for fn in vars(module).values():
            if not isinstance(fn, JITFunction):
                continue
            for cache in getattr(fn, "device_caches", {}).values():
                for kernel in list(cache[0].values()):
                    metadata = getattr(kernel, "metadata", None)
                    if metadata is None:
                        continue
                    constexprs = {}
                    for path, value in getattr(getattr(kernel, "src", None), "constants", {}).items():
                        index = path[0] if isinstance(path, tuple) else path
                        if isinstance(index, int) and index < len(fn.arg_names):
                            constexprs[fn.arg_names[index]] = value if isinstance(value, (bool, int, float, str)) \
                                else str(value)
                    signature = getattr(getattr(kernel, "src", None), "signature", {}) or {}
                    records.append(dict(
                        kernel=fn.__name__, constexprs=constexprs,
                        dtypes=sorted({v for v in signature.values() if isinstance(v, str) and v.startswith("*")}),
                        num_warps=metadata.num_warps, num_stages=metadata.num_stages, shared=metadata.shared,
                        registers=getattr(kernel, "n_regs", None), local_bytes=_local_bytes(kernel)))
    return records


def _local_bytes(kernel: Any) -> Optional[int]:
    """Local memory per thread (spills and stack), in bytes. Triton's driver stores
    CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4 as ``n_spills`` (driver.c, 3.6 and 3.8), i.e. in words."""
    words = getattr(kernel, "n_spills", None)
    return None if words is None else 4 * int(words)


# A spill of at most this many bytes at a register count well below the cap is ptxas' own choice
# (seen: 8-24 B at 48-64 registers in GroupNorm kernels, outside their loops), not register pressure.
SMALL_SPILL_BYTES = 64


def is_forced_spill(record: Dict[str, Any], arch: int = 90) -> bool:
    """Spills because the registers ran out: any spill at (nearly) the per-thread cap, or a large one."""
    spill = record.get("spill_stores", 0) or 0
    if not spill:
        return False
    at_cap = (record.get("registers") or 0) >= LIMITS[arch]["max_regs_per_thread"] - 8
    return at_cap or spill > SMALL_SPILL_BYTES


def problems(records: List[Dict[str, Any]], no_spills: bool, arch: int = 90) -> List[str]:
    """What would fail or degrade at launch: compile errors, shared memory over the per-block limit,
    (with ``no_spills``) register spills forced by register pressure (:func:`is_forced_spill`)."""
    lim = LIMITS[arch]
    found = []
    for r in records:
        name = f"{r['kernel']} {r['constexprs']} warps={r['num_warps']} stages={r['num_stages']}"
        if not r["ok"]:
            found.append(f"{name}: compile failed: {r['error'][:300]}")
            continue
        if r["shared"] > lim["smem_per_block"]:
            found.append(f"{name}: {r['shared']} B shared memory > {lim['smem_per_block']} per block")
        if no_spills and is_forced_spill(r, arch):
            found.append(f"{name}: spills ({r.get('spill_stores', 0)} B stores, {r.get('spill_loads', 0)} B loads, "
                         f"{r.get('registers')} registers)")
    return found


def _flag(name: str) -> str:
    """HAS_SCALE_DOT -> SCALE_DOT; SILU stays."""
    return name[4:] if name.startswith("HAS_") else name


def table(records: List[Dict[str, Any]]) -> str:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK_C", "BLOCK_HW", "BLOCK_CH", "BLOCK_G")
    lines = [f"{'kernel':34} {'dtype':6} {'tile':18} {'w':>2} {'st':>2} {'regs':>4} {'spill':>9} "
             f"{'smem KiB':>8} {'SM occ':>10} {'flags':24} cases"]
    for r in sorted(records, key=lambda r: (r["kernel"], str(r["dtypes"]), str(r["constexprs"]))):
        tile = "x".join(str(r["constexprs"][k]) for k in keys if k in r["constexprs"])
        dtype = next((d[1:] for d in r["dtypes"] if d not in ("*fp32",)), "fp32")
        if dtype == "fp32" and r["constexprs"].get("DOT_PRECISION") in ("tf32", "tf32x3"):
            dtype = r["constexprs"]["DOT_PRECISION"]
        if not r["ok"]:
            lines.append(f"{r['kernel']:34} {dtype:6} {tile:18} FAILED: {r['error'][:80]}")
            continue
        spill = f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}"
        occ = f"{r.get('blocks_per_sm', '?')}b/{r.get('warps_per_sm', '?')}w"
        flags = ",".join(_flag(k) for k, v in sorted(r["constexprs"].items()) if v is True) or "-"
        lines.append(f"{r['kernel']:34} {dtype:6} {tile:18} {r['num_warps']:>2} {r['num_stages']:>2} "
                     f"{r.get('registers', '?'):>4} {spill:>9} {r['shared'] / 1024:>8.1f} {occ:>10} "
                     f"{flags:24} {','.join(sorted(r['cases']))}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(LIMITS))
    parser.add_argument("--cases", default="fm,fmm_dual,fmm_jvp", help=f"training cases ({', '.join(CASES)}; '' for none)")
    parser.add_argument("--precision", default="bf16,fp32", help="bf16 (autocast, the shipped configs) and/or fp32")
    parser.add_argument("--layouts", default="nchw,channels_last",
                        help="memory layouts of the training cases (nchw, channels_last)")
    parser.add_argument("--size", default="default", help="bench size of the training cases (bench.utils.BENCH_SIZES)")
    parser.add_argument("--head-dims", default="", help="also attention alone at these head dims, e.g. 32,64,128")
    parser.add_argument("--attention-dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision for the float32 attention dots: 'high' (TF32) "
                             "is what training launches (train_from_config allows TF32 on CUDA); 'highest' "
                             "gives kernels.attention.FP32_HIGHEST_DOT (3xTF32 by default: tests, direct calls)")
    parser.add_argument("--sweep", default="", help="attention kernels to sweep over tile configs "
                        "(fwd, bwd_dkdv, bwd_dq, dual, dual_bwd_dkdv, dual_bwd_dq), at --head-dims and --attention-dtypes")
    parser.add_argument("--sweep-warps", default="4,8")
    parser.add_argument("--sweep-stages", default="1,2")
    parser.add_argument("--sweep-tiles", default="", help="BLOCK_MxBLOCK_N list, e.g. 32x32,64x32 (default: SWEEP_TILES)")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel fails to compile or cannot launch")
    parser.add_argument("--no-spills", action="store_true",
                        help="with --check: a spill forced by register pressure fails too (is_forced_spill)")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cache = tempfile.TemporaryDirectory(prefix="fastflow-kernel-resources-")
    os.environ["TRITON_CACHE_DIR"] = cache.name  # fresh: a cached kernel would skip ptxas and its log
    torch.set_float32_matmul_precision(args.matmul_precision)
    start = time.perf_counter()
    recorder = CompileOnlyLaunches(args.arch)
    cases = [c for c in args.cases.split(",") if c]
    precisions = [p for p in args.precision.split(",") if p]
    if cases:
        run_training_launches(recorder, cases, precisions, size=args.size,
                              layouts=[layout for layout in args.layouts.split(",") if layout])
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d]
              for d in args.attention_dtypes.split(",") if d]
    head_dims = [int(d) for d in args.head_dims.split(",") if d]
    if args.sweep:
        sweep_attention(recorder, args.sweep.split(","), head_dims or [64, 128], dtypes,
                        warps=[int(w) for w in args.sweep_warps.split(",")],
                        stages=[int(s) for s in args.sweep_stages.split(",")],
                        tiles=[tuple(int(v) for v in t.split("x")) for t in args.sweep_tiles.split(",")]
                        if args.sweep_tiles else SWEEP_TILES)
    elif head_dims:
        run_attention_launches(recorder, head_dims, dtypes)
    records = list(recorder.records.values())
    print(f"triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}: "
          f"{len(records)} distinct kernels compiled in {time.perf_counter() - start:.0f} s")
    print(table(records))
    found = problems(records, args.no_spills, args.arch)
    for line in found:
        print("PROBLEM:", line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(schema="fastflow-kernel-resources/1", date=time.strftime("%Y-%m-%d"),
                       command="python bench/kernel_resources.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                       triton=triton.__version__, torch=torch.__version__, arch=args.arch,
                       matmul_precision=args.matmul_precision,
                       records=[dict(r, cases=sorted(r["cases"])) for r in records], problems=found)
        args.json.write_text(json.dumps(payload, indent=1, sort_keys=True))
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
