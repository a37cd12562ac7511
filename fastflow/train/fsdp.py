"""FSDP2 (``fully_shard``) for a method: one shard group per top-level UNet block, then the network
root (time embeddings, input/output convolutions), then the method as the FSDP root.

Why this shape:
- FSDP2 refuses containers without ``forward`` (``ModuleList``), so the unit is the block.
- The network root (UNet or DualTimeUNet) is its own group because sampling calls
  ``method.model`` directly, outside the method's forward: its parameters must all-gather then too.
- The method is the root so that a training step is ONE root forward (FMM evaluates the network
  three times per step) and lazy initialisation happens there.

Mixed precision: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`` on CUDA with
``mixed_precision`` and ``precision=bf16`` (float32 on the CPU) — unless some forward of the step
runs outside autocast in float32 (FMM's ``jvp`` or ``finite_difference`` derivative with
``derivative_precision=float32``): bf16-gathered weights would meet float32 activations there
("mat1 and mat2 must have the same dtype", measured), so the weights are gathered in float32 and
autocast casts them per op elsewhere, as under DDP. Inputs are NOT cast by FSDP
(``cast_forward_inputs=False``): the times s, t must stay float32 (they are multiplied by 1000 in
the time embedding, and bf16 has a spacing of 2⁻⁸ near 0.5, far coarser than the finite-difference
step); the training loop's autocast does the activation casts.
"""

from __future__ import annotations

from typing import Any, List

import torch
from torch import nn

from fastflow.train.distributed import DistContext
from fastflow.train.parallelize import unet_blocks


class UnsupportedParallelism(ValueError):
    """A combination of parallelism, derivative backend, compile scope and precision that cannot run."""


def fsdp_param_dtype(config: Any, device: torch.device) -> torch.dtype:
    """bf16 gathers where every forward runs under bf16 autocast; float32 otherwise (see above)."""
    infra = config.infrastructure
    if not (device.type == "cuda" and infra.mixed_precision and infra.precision == "bf16"):
        return torch.float32
    fmm = config.flow_map_matching
    if config.method == "flow_map_matching" and fmm.derivative in ("jvp", "finite_difference") \
            and fmm.derivative_precision == "float32":
        return torch.float32
    return torch.bfloat16


# torch.func.jvp through fully_shard'ed modules, then backward: fails on torch 2.11 and 2.12
# ("Cannot access storage of TensorWrapper", or the backward finds a parameter's unsharded storage
# freed: "data is not allocated yet"), works on 2.13 and 2.14 (measured, CPU/gloo, 2 ranks).
FSDP_JVP_MIN_TORCH = (2, 13)


def torch_release() -> tuple:
    """(major, minor) of the running torch."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_fsdp_config(config: Any, device: torch.device) -> None:
    """Raise :class:`UnsupportedParallelism` naming the combination for what cannot run under FSDP2.

    - ``precision=fp16``: GradScaler's inf/nan check is per rank; on sharded gradients the ranks
      could disagree on skipping a step and diverge. Use bf16 (no scaler).
    - FMM ``derivative=jvp`` on torch older than :data:`FSDP_JVP_MIN_TORCH`: FSDP2 cannot
      backpropagate through ``torch.func.jvp`` there (the first step would crash).
    """
    infra = config.infrastructure
    if config.method == "flow_map_matching" and config.flow_map_matching.derivative == "jvp" \
            and torch_release() < FSDP_JVP_MIN_TORCH:
        raise UnsupportedParallelism(
            f"infrastructure.parallelism=fsdp with flow_map_matching.derivative=jvp needs torch >= "
            f"{'.'.join(map(str, FSDP_JVP_MIN_TORCH))} (this is torch {torch.__version__}: FSDP2 cannot "
            "backpropagate through torch.func.jvp); use derivative=dual | finite_difference, or parallelism=ddp"
        )
    if infra.mixed_precision and infra.precision == "fp16" and device.type == "cuda":
        raise UnsupportedParallelism(
            "infrastructure.parallelism=fsdp with precision=fp16 is not supported (GradScaler's "
            "overflow check is per rank on sharded gradients); use precision=bf16 or parallelism=ddp"
        )


def apply_fsdp(method: nn.Module, config: Any, ctx: DistContext) -> nn.Module:
    """Shard ``method`` in place (blocks → network root → method root); returns the method."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_fsdp_config(config, ctx.device)
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=fsdp_param_dtype(config, ctx.device), reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    reshard = config.infrastructure.reshard_after_forward
    for block in unet_blocks(method.model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(method.model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(method, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return method


def fsdp_modules(module: nn.Module) -> List[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard_all(module: nn.Module) -> None:
    """Free every gathered (unsharded) parameter so the next forward re-gathers from the shards.

    Needed around in-place writes to the sharded parameters outside training (EMA swap for
    sampling): a group left unsharded (``reshard_after_forward=False``) would otherwise keep
    computing with the stale gathered copy.
    """
    for m in fsdp_modules(module):
        m.reshard()


def is_sharded(module: nn.Module) -> bool:
    return bool(fsdp_modules(module))
