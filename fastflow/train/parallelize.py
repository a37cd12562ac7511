"""How a method is compiled and sharded — the models know nothing of it (torchtitan style).

Order (torchtitan's): ``block`` compiles each top-level UNet block in place, then DDP or FSDP2
wraps the method; ``step`` compiles the wrapped loss as a whole.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch import nn

from fastflow.train.distributed import DistContext


def compile_scope(config: Any) -> str:
    infra = config.infrastructure
    if infra.compile != "none":
        return infra.compile
    return "block" if infra.compile_model else "none"


def unet_of(model: nn.Module) -> nn.Module:
    """The UNet inside a network (itself, or a DualTimeUNet's)."""
    return getattr(model, "unet", model)


def unet_blocks(model: nn.Module) -> list:
    """The UNet's top-level blocks in execution order (the unit of compile and of sharding)."""
    unet = unet_of(model)
    return [*unet.down_blocks, *unet.middle_blocks, *unet.up_blocks]


def apply_compile(method: nn.Module, config: Any) -> None:
    """``block`` scope: compile each top-level UNet block in place, whole-graph (``fullgraph``).

    ``dynamic=False``: blocks of one class run at several shapes (levels, and the doubled batch of
    finite differences), which makes Dynamo's automatic dynamic shapes kick in, and Inductor then
    fails on the CPU ("cannot determine truth value of Relational"); static graphs per shape
    compile (one per block class × shape × plain/tangent mode), so the recompile limit is raised
    to hold them. Done before sharding (torchtitan order): FSDP2's hooks stay outside the graphs.
    """
    for block in unet_blocks(method.model):
        block.compile(fullgraph=True, **_compile_kwargs(config))


def _compile_kwargs(config: Any) -> dict:
    """Static shapes for both scopes (see apply_compile), with room for one graph per shape."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    mode = config.infrastructure.compile_mode
    return {"dynamic": False, **({} if mode == "default" else {"mode": mode})}


def check_compile_config(config: Any) -> None:
    """FMM ``derivative=jvp`` with ``compile=block`` cannot run: ``torch.func.jvp`` would call the
    compiled blocks from eager mode, which Dynamo refuses ("Unsupported functorch tracing attempt",
    pytorch/pytorch#128711; measured). ``dual`` and ``finite_difference`` are plain forwards."""
    if config.method == "flow_map_matching" and config.flow_map_matching.derivative == "jvp" \
            and compile_scope(config) == "block":
        raise ValueError(
            "flow_map_matching.derivative=jvp with infrastructure.compile=block is not supported: torch.func.jvp "
            "cannot call compiled blocks (pytorch/pytorch#128711); use derivative=dual | finite_difference, "
            "or compile=none"
        )


def build_train_module(method: nn.Module, config: Any, ctx: DistContext, *,
                       wrap_single_rank: bool = False) -> Tuple[Callable, nn.Module]:
    """Return (loss_fn, wrapped) where ``loss_fn(batch) -> (loss, metrics)`` runs one step's loss.

    ``wrapped`` is what owns the parameters the optimizer sees (the method itself, or its
    DDP/FSDP-wrapped form). One process trains unwrapped unless ``wrap_single_rank`` (benchmarks:
    what a wrapper costs by itself; needs an initialised process group of size 1).
    """
    scope = compile_scope(config)
    check_compile_config(config)
    if scope == "block":
        apply_compile(method, config)
    if config.infrastructure.parallelism == "fsdp":  # unsupported combinations fail early, on any world size
        from fastflow.train.fsdp import check_fsdp_config

        check_fsdp_config(config, ctx.device)
    parallelism = config.infrastructure.parallelism if ctx.world_size > 1 or wrap_single_rank else "none"
    if parallelism != "none" and not torch.distributed.is_initialized():
        raise RuntimeError(f"infrastructure.parallelism={parallelism} on one process needs an initialised "
                           "process group (wrap_single_rank)")
    wrapped: nn.Module = method
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # The method's forward is compute_loss: one DDP forward per step, however many network
        # evaluations the loss makes (FMM makes three), so the gradient all-reduce fires once.
        # Buffers (FMM's step counter, schedules) advance identically on every rank: no per-forward
        # broadcast (they are synced once at construction). torch < 2.14 names it broadcast_buffers.
        import inspect

        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})
        wrapped = DDP(method, device_ids=device_ids, **no_buffer_sync)
    elif parallelism == "fsdp":
        from fastflow.train import fsdp

        wrapped = fsdp.apply_fsdp(method, config, ctx)
    loss_fn: Callable = wrapped
    if scope == "step":
        # The whole loss as one program, compiled around the wrapper: Dynamo splits DDP's graph at
        # its gradient buckets (DDPOptimizer) and breaks the graph at FSDP2's per-block hooks
        # (each block then compiles as its own frame, as with ``block``).
        loss_fn = torch.compile(wrapped, **_compile_kwargs(config))
    return loss_fn, wrapped
