"""Checkpoints of two kinds, atomic writes, keep-last-K, loading with clear errors.

Single file (parallelism none | ddp; written by rank 0), ``checkpoint_<iteration:08d>.pt``:
    iteration, model (method.state_dict(): network + method buffers), optimizer, ema, scaler,
    config (dict), method, method_config, rng (python/numpy/torch/cuda), data (loader position),
    images_seen, world_size.
A crash mid-save leaves the previous checkpoint intact: the file is written to a temporary
name in the same folder, fsynced, then renamed over the final name.

Sharded (parallelism fsdp; every rank writes), a folder ``step_<iteration:08d>/``:
    DCP files (``.metadata``, ``*.distcp``) holding ``model`` and ``optimizer`` (as given by
    ``torch.distributed.checkpoint.state_dict.get_state_dict``: FQN keys, DTensor shards) and
    ``ema`` (the shadows); ``meta.pt`` (rank 0: iteration, images_seen, config, method_config,
    data position, EMA counters, world_size); ``rank_<r>.pt`` (each rank's RNG state);
    ``export.pt``: the full weights and EMA shadows in the single-file layout (``config``,
    ``model``, ``ema``), which ``sample.py --checkpoint <folder or export.pt> --use_ema`` reads.
The folder is written as ``.tmp_step_<n>/`` and renamed when complete; then ``latest`` (a text
file naming the folder) is replaced atomically. A crash mid-save leaves only a ``.tmp_*`` folder,
ignored by readers and removed by the next save. DCP reshards on load, so a sharded checkpoint
resumes on any world size (and without a process group).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from fastflow.io import atomic_write, fsync_dir
from fastflow.train.distributed import distributed_initialized

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")
STEP_DIR_RE = re.compile(r"^step_(\d+)$")
LATEST_POINTER = "latest"
EXPORT_NAME = "export.pt"
META_NAME = "meta.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read."""


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save to ``path`` via a temp file + fsync + rename (never a half-written file)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def list_checkpoints(directory: Union[str, Path]) -> List[Path]:
    """Single-file checkpoints in ``directory`` sorted by iteration (oldest first)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_sharded_checkpoint(path: Union[str, Path]) -> bool:
    """A complete sharded checkpoint folder (DCP metadata and meta.pt present)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META_NAME).is_file()


def list_sharded_checkpoints(directory: Union[str, Path]) -> List[Path]:
    """Complete ``step_*`` folders in ``directory`` sorted by iteration (oldest first)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := STEP_DIR_RE.match(p.name)) and is_sharded_checkpoint(p)]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Union[str, Path]) -> int:
    name = Path(path).name
    m = CHECKPOINT_RE.match(name) or STEP_DIR_RE.match(name)
    if m is None:
        raise CheckpointError(f"{path} is not named checkpoint_<step>.pt or step_<step>")
    return int(m.group(1))


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    """The newest checkpoint of either kind in ``directory``; a tie goes to the sharded one.

    Sharded folders are found by scanning: a ``step_*`` folder only ever appears complete (it is
    renamed into place), so the scan agrees with the ``latest`` pointer, which is kept for tools.
    """
    candidates = list_checkpoints(directory) + list_sharded_checkpoints(directory)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (checkpoint_step(p), p.is_dir()))


def prune_checkpoints(directory: Union[str, Path], keep_last: int, keep: Optional[Union[str, Path]] = None) -> None:
    """Keep the newest ``keep_last`` checkpoint files, and ``keep`` (the one just written) even
    if newer ones are there; clear temp files of crashed saves (only rank 0 writes single-file
    checkpoints, and it calls this after its own save completed)."""
    keep_name = Path(keep).name if keep is not None else None
    for old in list_checkpoints(directory)[:-keep_last]:
        if old.name != keep_name:
            old.unlink(missing_ok=True)
    for leftover in Path(directory).glob(".checkpoint_*.pt.*.tmp"):
        leftover.unlink(missing_ok=True)


def set_aside_later_checkpoints(directory: Union[str, Path], step: int) -> Optional[Path]:
    """Move checkpoints of either kind with a step above ``step`` into ``superseded_<time>/`` of
    ``directory`` (and drop a ``latest`` pointer naming one of them); the folder, or None.

    A run resumed from an earlier checkpoint than its newest would otherwise write steps that
    pruning (by step) deletes at once, and ``--resume auto`` would pick the abandoned branch."""
    directory = Path(directory)
    later = [p for p in list_checkpoints(directory) + list_sharded_checkpoints(directory) if checkpoint_step(p) > step]
    if not later:
        return None
    aside = directory / f"superseded_{time.strftime('%Y%m%d-%H%M%S')}_after_step_{step:08d}"
    aside.mkdir()
    for path in later:
        os.replace(path, aside / path.name)
    pointer = directory / LATEST_POINTER
    if pointer.is_file() and pointer.read_text().strip() in {p.name for p in later}:
        pointer.unlink()
    fsync_dir(directory)
    return aside


def remove_folder_atomically(path: Path) -> None:
    """Rename to a hidden ``.trash_*`` name first, so a crash mid-delete never leaves a
    half-deleted folder that still looks like a complete checkpoint."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_sharded_checkpoints(directory: Union[str, Path], keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete folders (never the one ``latest`` names) and clear
    leftovers of crashed saves and deletes."""
    directory = Path(directory)
    pointer = directory / LATEST_POINTER
    keep = pointer.read_text().strip() if pointer.is_file() else None
    for old in list_sharded_checkpoints(directory)[:-keep_last]:
        if old.name != keep:
            remove_folder_atomically(old)
    for leftover in directory.glob(".trash_step_*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_latest_pointer(directory: Union[str, Path], name: str) -> None:
    """``latest`` ← name, atomically (temp file + fsync + rename)."""
    atomic_write(Path(directory) / LATEST_POINTER, lambda handle: handle.write((name + "\n").encode()))


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint file, a sharded checkpoint folder, or the latest checkpoint of either kind in a
    run folder; a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        if is_sharded_checkpoint(path):
            return path
        if STEP_DIR_RE.match(path.name) or path.name.startswith(".tmp_step_"):
            raise CheckpointError(f"{path} is an incomplete sharded checkpoint (no .metadata / {META_NAME})")
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint_*.pt files or step_* folders in folder {path}")
        return latest
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


# What a single-file checkpoint needs for a run to resume from it (sample.py needs less).
RESUME_KEYS = ("iteration", "model", "optimizer", "ema", "rng", "data")
# What a sharded checkpoint's meta.pt holds besides the DCP tensors.
SHARDED_META_KEYS = ("iteration", "data", "ema")


def _check_keys(ckpt: Dict[str, Any], require: Sequence[str], where: Any) -> None:
    missing = [k for k in require if k not in ckpt]
    if missing:
        found = ", ".join(sorted(map(str, ckpt))[:8]) or "nothing"
        raise CheckpointError(
            f"{where} is not a fastflow checkpoint: it lacks {', '.join(missing)} (it holds {found}"
            f"{', ...' if len(ckpt) > 8 else ''}); a plain state_dict is no training checkpoint")


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu", require: Sequence[str] = (),
                    mmap: bool = False) -> Dict[str, Any]:
    """A single-file checkpoint as a dict; for a sharded checkpoint, its full-weight ``export.pt``.
    ``require``: keys it must hold (else a CheckpointError naming the file and the missing keys).
    ``mmap``: map the tensors instead of reading them (a look at the metadata costs no I/O)."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        path = path / EXPORT_NAME
        if not path.is_file():
            raise CheckpointError(f"sharded checkpoint {path.parent} has no {EXPORT_NAME}")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            # only files in torch's zip format map; an older one is read in full
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a fastflow checkpoint (got {type(ckpt).__name__})")
    _check_keys(ckpt, require, path)
    ckpt.setdefault("_path", str(path))
    return ckpt


def capture_rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_WRAPPER_NAMES = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def strip_module_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Remove DDP ``module.`` / torch.compile ``_orig_mod.`` (and FSDP1) prefixes anywhere in keys."""
    out = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p not in _WRAPPER_NAMES]
        out[".".join(parts)] = value
    return out


# ------------------------------------------------------------------------------------ sharded
def _no_dist() -> bool:
    """DCP without a process group (one process): say so, and silence DCP's warning about it."""
    if not distributed_initialized():
        import warnings

        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return True
    return False


def _barrier() -> None:
    if distributed_initialized():
        import torch.distributed as dist

        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; a collective for a DTensor (every rank must call it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu()


def full_weights_export(method: torch.nn.Module, ema: Any, meta: Dict[str, Any], is_main: bool) -> Optional[Dict[str, Any]]:
    """The single-file layout ``sample.py`` reads: full ``model`` state dict and EMA ``shadow``.

    A collective under FSDP (parameters are gathered); only the main rank gets the dict.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    shadow = {n: full_tensor(t) for n, t in ema.shadow.items()}
    if not is_main:
        return None
    keys = ("iteration", "images_seen", "run_name", "method", "method_config", "config", "world_size")
    return {**{k: meta[k] for k in keys if k in meta}, "format": "fastflow-export",
            "model": {k: v.detach().cpu() for k, v in model.items()},
            "ema": {**meta.get("ema", {}), "shadow": shadow}}


def save_sharded_checkpoint(
    directory: Union[str, Path],
    step: int,
    *,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: Any,
    meta: Dict[str, Any],
    rank_state: Dict[str, Any],
    rank: int,
    keep_last: int,
    export: bool = True,
) -> Path:
    """Write ``directory/step_<step>/`` collectively (every rank calls this; see module docstring).

    Order: clear leftovers → ``.tmp_step_<n>/`` ← DCP shards, rank files, meta, export → barrier
    → rename to ``step_<n>/`` → ``latest`` → prune → barrier.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    final = directory / f"step_{step:08d}"
    tmp = directory / f".tmp_step_{step:08d}"
    is_main = rank == 0
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp_step_*"):  # a crashed save's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    model_sd, optim_sd = get_state_dict(method, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd, "ema": dict(ema.shadow)},
             checkpoint_id=str(tmp), no_dist=_no_dist())
    atomic_torch_save(rank_state, tmp / f"rank_{rank}.pt")
    exported = full_weights_export(method, ema, meta, is_main) if export else None
    if is_main:
        if exported is not None:
            atomic_torch_save(exported, tmp / EXPORT_NAME)
        atomic_torch_save(meta, tmp / META_NAME)
    _barrier()  # every rank's files are on disk
    if is_main:
        if final.exists():  # the same step saved again (e.g. after resuming from an older one)
            remove_folder_atomically(final)
        os.replace(tmp, final)
        fsync_dir(directory)
        write_latest_pointer(directory, final.name)
        prune_sharded_checkpoints(directory, keep_last)
    _barrier()
    return final


def load_sharded_checkpoint(
    path: Union[str, Path], *, method: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: Any
) -> None:
    """Load model, optimizer and EMA shadows from a sharded checkpoint, resharding to the current
    layout (FSDP on any world size, or a plain module in one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    model_sd, optim_sd = get_state_dict(method, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd, "ema": dict(ema.shadow)}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=_no_dist())
    except Exception as exc:
        raise CheckpointError(f"cannot load sharded checkpoint {path}: {exc}") from exc
    set_state_dict(method, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    with torch.no_grad():
        for name, value in state["ema"].items():
            if value is not ema.shadow[name]:
                ema.shadow[name].copy_(value)


def load_sharded_meta(path: Union[str, Path], rank: int) -> Dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint, with this rank's ``rank_<r>.pt`` under ``rank_state``
    (None when the checkpoint was written by fewer ranks)."""
    path = Path(path)
    try:
        meta = torch.load(path / META_NAME, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {path / META_NAME}: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_NAME} is not a fastflow checkpoint's meta (got {type(meta).__name__})")
    _check_keys(meta, SHARDED_META_KEYS, path / META_NAME)
    rank_file = path / f"rank_{rank}.pt"
    meta["rank_state"] = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.is_file() else None
    meta["_path"] = str(path)
    return meta


def optimizer_state_by_name(state: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """A ``torch.optim`` state dict keyed by parameter index → keyed by parameter FQN (the form
    ``set_optimizer_state_dict`` takes); ``names[i]`` is the FQN of parameter index ``i``."""
    by_index = dict(enumerate(names))
    groups = [{**g, "params": [by_index[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {by_index[i]: s for i, s in state["state"].items()}, "param_groups": groups}


def load_full_state_into_sharded(
    state: Dict[str, Any], *, method: torch.nn.Module, optimizer: torch.optim.Optimizer, param_names: List[str]
) -> None:
    """Load a single-file checkpoint (full tensors, index-keyed optimizer) into an FSDP method."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(method, strip_module_prefix(state["model"]), options=options)
    set_optimizer_state_dict(method, optimizer, optimizer_state_by_name(state["optimizer"], param_names), options=options)
