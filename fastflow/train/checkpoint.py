"""Single-file checkpoints: atomic writes, keep-last-K, loading with clear errors.

Layout of a checkpoint (``checkpoint_<iteration:08d>.pt``):
    iteration, model (method.state_dict(): network + method buffers), optimizer, ema, scaler,
    config (dict), method, method_config, rng (python/numpy/torch/cuda), data (loader position),
    images_seen, fastflow_version.
A crash mid-save leaves the previous checkpoint intact: the file is written to a temporary
name in the same folder, fsynced, then renamed over the final name.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be found or read."""


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> Path:
    """torch.save to ``path`` via a temp file + fsync + rename (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def list_checkpoints(directory: Union[str, Path]) -> List[Path]:
    """Checkpoints in ``directory`` sorted by iteration (oldest first)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(directory: Union[str, Path], keep_last: int) -> None:
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint file, or the latest checkpoint in a folder; a clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint_*.pt files in folder {path}")
        return latest
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated / not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} is not a fastflow checkpoint (got {type(ckpt).__name__})")
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


_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def strip_module_prefix(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """Remove DDP ``module.`` / torch.compile ``_orig_mod.`` (and FSDP1) prefixes anywhere in keys."""
    out = {}
    for key, value in state_dict.items():
        parts = [p for p in key.split(".") if p not in ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")]
        out[".".join(parts)] = value
    return out


def unwrap_state_dict(ckpt: Dict[str, Any], use_ema: bool = False) -> Dict[str, Any]:
    """The network weights of a checkpoint (EMA shadows if ``use_ema``), prefixes stripped.

    Accepts fastflow checkpoints, exported EMA files ({"model": ...}) and bare state dicts.
    """
    if use_ema:
        ema = ckpt.get("ema")
        if ema is None:
            raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')} has no EMA weights (run without --use_ema)")
        return strip_module_prefix(ema["shadow"] if "shadow" in ema else ema)
    for key in ("model", "state_dict", "model_state_dict"):
        if key in ckpt and isinstance(ckpt[key], dict):
            return strip_module_prefix(ckpt[key])
    return strip_module_prefix(ckpt)
