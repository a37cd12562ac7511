#!/usr/bin/env python
"""One training step under each parallelism (none | ddp | fsdp) and compile scope (none | block | step).

    torchrun --standalone --nproc_per_node=2 bench/dist_step.py [--size small] [--case fmm_dual]
        [--parallelism none,ddp,fsdp] [--compile none,block] [--steps 10] [--warmup 2] [--out PATH]

A step is what the Trainer runs: seeded loss (bf16 autocast on CUDA) → backward → clip → AdamW →
zero_grad → EMA update, on a fixed per-rank batch (data loading is not measured). ``none`` under
torchrun means every rank trains alone (no communication): the ratio ddp/none and fsdp/none is
what the gradient sync (DDP: one all-reduce of the gradients; FSDP: an all-gather per block per
forward and backward plus a reduce-scatter) costs on this machine. The first step's time is
reported separately (it includes compilation). Rank 0 prints a table and writes a JSON record
file (bench/results/<device>_<date>_dist.json, the bench result schema) unless ``--out ''``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import utils  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=sorted(utils.BENCH_SIZES))
    p.add_argument("--case", default="fmm_dual", choices=sorted(utils.TRAIN_CASES))
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the size's)")
    p.add_argument("--parallelism", default="none,ddp,fsdp")
    p.add_argument("--compile", default="none,block")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="result file ('' = do not write)")
    p.add_argument("--wrap-single-rank", action="store_true",
                   help="at world size 1, still wrap in DDP / FSDP2 (over a process group of one): what the "
                        "wrapper costs without a peer; otherwise one process trains unwrapped")
    return p.parse_args(argv)


def run_case(args, parallelism: str, compile_scope: str, ctx) -> Dict[str, Any]:
    from fastflow.methods import create_method_from_config
    from fastflow.train.ema import EMA
    from fastflow.train.loop import autocast_context, step_seed
    from fastflow.train.parallelize import build_train_module

    method_name, derivative = utils.TRAIN_CASES[args.case]
    mixed = ctx.device.type == "cuda"
    config = utils.bench_config(method_name, args.size, derivative=derivative, batch_size=args.batch_size, overrides=[
        f"infrastructure.parallelism={parallelism}", f"infrastructure.compile={compile_scope}",
        f"infrastructure.device={ctx.device.type}", f"infrastructure.mixed_precision={str(mixed).lower()}",
    ])
    torch._dynamo.reset()
    torch.manual_seed(0)
    method = create_method_from_config(config).to(ctx.device)
    num_params = sum(p.numel() for p in method.parameters())
    loss_fn, wrapped = build_train_module(method, config, ctx, wrap_single_rank=args.wrap_single_rank)
    train_cfg = config.training
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.learning_rate, betas=tuple(train_cfg.betas),
                                  weight_decay=train_cfg.weight_decay, **({"fused": True} if mixed else {}))
    ema = EMA(method.model, decay=train_cfg.ema_decay)
    torch.manual_seed(1 + ctx.rank)
    batch = torch.randn(train_cfg.batch_size, config.data.channels, config.data.image_size, config.data.image_size,
                        device=ctx.device)
    method.train()
    counter = [0]

    def step() -> None:
        torch.manual_seed(step_seed(0, ctx.rank, counter[0]))
        counter[0] += 1
        with autocast_context(config, ctx.device):
            loss, _ = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_cfg.gradient_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
        utils.sync(ctx.device)

    def barrier() -> None:
        if dist.is_initialized():
            dist.barrier()

    barrier()
    with utils.peak_memory(ctx.device) as mem:  # first step included: its autotuning and buffers count
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        for _ in range(args.warmup):
            step()
        times: List[float] = []
        barrier()
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    peak = float(mem.peak_bytes)
    # The slowest rank sets the pace: report the per-step maximum over ranks (and the largest peak).
    if dist.is_initialized():
        t = torch.tensor(times + [first, peak], dtype=torch.float64,
                         device=ctx.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        values = t.cpu().tolist()
        times, first, peak = values[:-2], float(values[-2]), float(values[-1])
    stats = utils.summarize(times)
    images = train_cfg.batch_size * ctx.world_size
    return {
        "name": f"dist_step[{args.case}-{args.size}-{parallelism}-{compile_scope}-w{ctx.world_size}]",
        "fullname": f"bench/dist_step.py::dist_step[{args.case}-{args.size}-{parallelism}-{compile_scope}-w{ctx.world_size}]",
        "group": "dist_step",
        "params": {"case": args.case, "size": args.size, "parallelism": parallelism, "compile": compile_scope,
                   "world_size": ctx.world_size},
        "stats": {**stats, "rounds": len(times), "iterations": 1},
        "extra_info": {"first_step_s": round(first, 3), "img_per_s": images / stats["median"],
                       "images_per_step": images, "batch_per_rank": train_cfg.batch_size,
                       "peak_mem_mb": round(peak / 2**20, 1), "peak_mem_kind": mem.kind,
                       "num_parameters": num_params, "method": method_name, "derivative": derivative,
                       "wrapper": type(wrapped).__name__},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from fastflow.train.distributed import cleanup, init_distributed

    ctx = init_distributed(args.device)
    if args.wrap_single_rank and ctx.world_size == 1 and not dist.is_initialized():
        backend = "nccl" if ctx.device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun's env:// rendezvous
            dist.init_process_group(backend=backend)
        else:  # a plain `python` run: a group of one needs no port
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    records: List[Dict[str, Any]] = []
    written: Optional[Path] = None
    for compile_scope in args.compile.split(","):
        for parallelism in args.parallelism.split(","):
            try:
                record = run_case(args, parallelism, compile_scope, ctx)
            except Exception as exc:  # report and go on with the other cases
                if ctx.is_main:
                    print(f"{parallelism}/{compile_scope}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            records.append(record)
            if ctx.is_main:
                s, e = record["stats"], record["extra_info"]
                print(f"{parallelism:>5s} {compile_scope:>6s} | step {1e3 * s['median']:8.1f} ms (IQR {1e3 * s.get('iqr', 0):.1f}) "
                      f"| {e['img_per_s']:8.1f} img/s | first step {e['first_step_s']:.1f} s | peak {e['peak_mem_mb']:.0f} MB",
                      flush=True)
                # After every case: a run killed at its time limit keeps what it measured.
                written = _write(args, ctx, records)
    if ctx.is_main and records:
        print("\nstep time ratios (vs none/eager):")
        for r in records:
            print(f"  {r['params']['parallelism']:>5s}/{r['params']['compile']:<6s} {r['extra_info']['ratio_vs_none_eager']:6.2f}x")
        if written is not None:
            print(f"results: {written}")
    cleanup()
    return 0


def _write(args, ctx, records: List[Dict[str, Any]]) -> Optional[Path]:
    """Ratios against none/eager (NaN until it is measured) into every record; the result file."""
    eager_none = next((r["stats"]["median"] for r in records
                       if r["params"]["parallelism"] == "none" and r["params"]["compile"] == "none"), None)
    for r in records:
        r["extra_info"]["ratio_vs_none_eager"] = r["stats"]["median"] / eager_none if eager_none else float("nan")
    if args.out == "":
        return None
    info = utils.device_info(ctx.device)
    path = Path(args.out) if args.out else utils.RESULTS_DIR / f"{info['slug']}_{info['date']}_dist.json"
    return utils.write_results(records, info, path=path, source="bench/dist_step.py",
                               meta={"world_size": ctx.world_size, "omp_threads": os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    sys.exit(main())
