"""Process-group set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), and the few
collectives the loop needs (stop flag, broadcast of a Python object)."""

from __future__ import annotations

import datetime
import gc
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("infrastructure.device=cuda but CUDA is not available (use device=auto or cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_name: str = "auto") -> DistContext:
    """Initialise the default process group when launched by torchrun; a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if rank == 0 and restart_count() == 0 and elastic_run_id() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            warnings.warn(
                "torchrun --max-restarts with the agent's rendezvous store shared with the workers: after a "
                "restart, workers can read the previous attempt's addresses from it and fail to connect "
                "(measured here about every other restart; pytorch/pytorch#135712). Launch with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ...",
                RuntimeWarning,
                stacklevel=2,
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def distributed_initialized() -> bool:
    """A default process group is up (torchrun, after :func:`init_distributed`)."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if distributed_initialized():
        dist.barrier()


def any_rank_true(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank (one tiny all-reduce)."""
    if not distributed_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``values`` over ranks (one all-reduce); ``values`` itself alone."""
    if not distributed_initialized():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled); ``obj`` itself without a process group."""
    if not distributed_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank; ``[obj]`` without a process group."""
    if not distributed_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's workers."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def elastic_run_id() -> str | None:
    """torchrun's run id when restarts are enabled (constant across restarts of one job)."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        return os.environ.get("TORCHELASTIC_RUN_ID")
    return None


def cleanup() -> None:
    """Destroy the default process group, garbage first: a DDP module or group work left in a
    reference cycle (a Trainer whose ``__init__`` raised) and freed at interpreter exit, after the
    group is gone, aborts the process ("terminate called without an active exception"; 2 of 18
    two-rank runs of a refused start here, 0 of 40 with the collection)."""
    if distributed_initialized():
        gc.collect()
        dist.destroy_process_group()
