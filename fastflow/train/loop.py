"""The training loop: set up, loop, step, log, sample, checkpoint — readable top to bottom.

Progress is counted in steps and images seen. Each step's randomness (noise, times, dropout) is
seeded from (seed, rank, step), and the data position is part of the checkpoint, so a resumed
run continues exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from fastflow.config import Config, ConfigError, config_to_dict
from fastflow.data.datasets import BadImageError
from fastflow.methods import create_method_from_config
from fastflow.ops import reference_only
from fastflow.train import checkpoint as ckpt_io
from fastflow.train.distributed import (
    DistContext,
    all_gather_object,
    any_rank_true,
    barrier,
    broadcast_object,
    cleanup,
    distributed_initialized,
    elastic_run_id,
    init_distributed,
    mean_over_ranks,
    restart_count,
)
from fastflow.train.ema import EMA
from fastflow.train.metrics import count_flops, device_peak_flops, peak_memory_bytes, reset_peak_memory
from fastflow.train.parallelize import build_train_module, compile_scope

# Test hook: "<rank>:<step>" makes that rank die (os._exit) right after that step, on the first
# attempt only (torchrun's TORCHELASTIC_RESTART_COUNT == 0), to exercise --max-restarts resume.
FAULT_INJECT_ENV = "FASTFLOW_FAULT_INJECT"


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed that is a pure function of (seed, rank, step)."""
    return (((seed * 1_000_003) ^ (rank * 7_919)) * 1_000_033 + step) % (2**63 - 1)


def sample_kwargs(config: Config) -> Dict[str, Any]:
    """How training-time sample grids are drawn for each method (cheap samplers for DDPM)."""
    s = config.sampling
    if config.method in ("ddpm", "ddpm_x0"):
        return {"sampler": "ddim", "num_steps": min(s.num_steps, 100), "eta": s.eta}
    if config.method == "flow_matching":
        return {"num_steps": s.num_steps, "solver": s.solver}
    return {"num_steps": s.num_steps}


def autocast_context(config: Config, device: torch.device):
    infra = config.infrastructure
    if not infra.mixed_precision or infra.precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if infra.precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


# Keys that change what a checkpoint holds or how the data position is read; a resumed run that
# differs in one of them cannot load it.
_RESUME_SENSITIVE = ("method", "model.", "data.image_size", "data.channels", "data.dataset", "data.root",
                     "data.augment", "training.batch_size", "infrastructure.seed", "ddpm.", "flow_matching.",
                     "flow_map_matching.num_timesteps", "infrastructure.parallelism")


# Keys that define the network and the objective's buffers: a checkpoint trained with other
# values is refused before anything loads (its weights or schedule would not be this config's).
_RESUME_MUST_MATCH = ("method", "model.", "data.image_size", "data.channels", "ddpm.",
                      "flow_matching.num_timesteps", "flow_map_matching.num_timesteps")
# ... except these, which change no parameter or buffer (kernels compute the same math; dropout
# is a training choice a resumed run may change).
_RESUME_FREE = ("model.fused_kernels", "model.dropout")
# Keys whose change on resume is routine and not worth a note.
_RESUME_QUIET = ("logging.", "checkpoint.", "training.num_iterations", "training.log_every",
                 "training.sample_every", "training.save_every", "training.num_samples", "sampling.",
                 "data.num_workers", "data.pin_memory", "infrastructure.num_gpus", "infrastructure.device")


def _check_resume_config(state: Dict[str, Any], config: Config, path: Any, log) -> None:
    """Raise CheckpointError naming every must-match key that differs from the checkpoint's
    config; note (``log``) the other keys that differ."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return  # a checkpoint without its config (hand-made): the load's own errors speak
    then, now = _flatten(saved), _flatten(config_to_dict(config))
    differ = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    fixed = [k for k in differ if k.startswith(_RESUME_MUST_MATCH) and not k.startswith(_RESUME_FREE)]
    if fixed:
        raise ckpt_io.CheckpointError(
            f"cannot resume from {path}: config keys that must match the checkpoint's differ: "
            + ", ".join(f"{k} (checkpoint {then.get(k)!r}, now {now.get(k)!r})" for k in fixed)
            + "; set them back, or start a new run (another logging.run_name)")
    noted = [k for k in differ if k not in fixed and not k.startswith(_RESUME_QUIET)]
    if noted:
        log(f"resuming from {path} with changed config: "
            + ", ".join(f"{k} {then.get(k)!r} -> {now.get(k)!r}" for k in noted))


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def check_same_data(per_rank: List[Tuple[int, Optional[str]]], root: Any) -> None:
    """Every rank's ``(dataset size, fingerprint)`` must agree: ranks shard one index range, so
    node-local copies that differ (a file missing, or renamed) would make the shards overlap or
    miss images. ValueError naming the ranks that differ and ``data.root``."""
    sizes = [size for size, _ in per_rank]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"ranks see datasets of different sizes ({', '.join(f'rank {r}: {n}' for r, n in enumerate(sizes))}) "
            f"under data.root={root}: every rank must read the same data"
        )
    prints = [fingerprint for _, fingerprint in per_rank]
    differ = [r for r, fingerprint in enumerate(prints) if fingerprint != prints[0]]
    if differ:
        raise ValueError(
            f"rank(s) {', '.join(map(str, differ))} see other files than rank 0 under data.root={root} "
            f"(same count, {sizes[0]}, but other names or order): every rank must read the same data"
        )


def _config_differences(saved: Optional[Dict[str, Any]], config: Config) -> str:
    """'; config keys that differ from the checkpoint's: k (checkpoint a, now b), ...' or ''."""
    if not isinstance(saved, dict):
        return ""
    then, now = _flatten(saved), _flatten(config_to_dict(config))
    differ = [f"{k} (checkpoint {then.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(then) | set(now))
              if then.get(k) != now.get(k) and k.startswith(_RESUME_SENSITIVE)]
    return f"; config keys that differ from the checkpoint's: {', '.join(differ)}" if differ else ""


class Trainer:
    """Owns the run: method, optimizer, EMA, data, logging, checkpoints."""

    def __init__(self, config: Config, *, resume: Optional[str] = None, overfit: bool = False, quiet: bool = False):
        self.config = config
        self.overfit = overfit
        self.quiet = quiet
        self.ctx: DistContext = init_distributed(config.infrastructure.device)
        self.device = self.ctx.device
        infra, train_cfg = config.infrastructure, config.training

        torch.manual_seed(infra.seed)  # same initial weights on every rank
        self.method = create_method_from_config(config).to(self.device)
        if infra.channels_last:
            self.method.model.to(memory_format=torch.channels_last)
        self.num_params = sum(p.numel() for p in self.method.model.parameters())
        self.image_shape = (config.data.channels, config.data.image_size, config.data.image_size)
        # FLOPs feed MFU only, which needs the device's peak (unknown on the CPU). Counted on the
        # plain method, before compile and sharding wrap it.
        self.peak_flops = device_peak_flops(self.device)
        self.flops_per_step: Optional[int] = self._measure_flops(train_cfg.batch_size) if self.peak_flops else None
        # FSDP runs write sharded (DCP) checkpoints, even on one rank, so that a run keeps one kind.
        self.sharded_checkpoints = infra.parallelism == "fsdp"

        # Rank 0 decides which checkpoint (and run name) every rank resumes from.
        found: Any = None
        if self.ctx.is_main:
            try:
                found = self._find_resume(resume)
            except Exception as exc:  # every rank raises it, none waits on the broadcast
                found = exc
        found = broadcast_object(found)
        if isinstance(found, Exception):
            raise found
        self.resume_path, run_name = found
        self._resume_state: Optional[Dict[str, Any]] = None
        if self.resume_path is not None:
            if ckpt_io.is_sharded_checkpoint(self.resume_path):
                self._resume_state = ckpt_io.load_sharded_meta(self.resume_path, self.ctx.rank)
            else:
                self._resume_state = ckpt_io.load_checkpoint(self.resume_path, map_location="cpu",
                                                             require=ckpt_io.RESUME_KEYS)
        self.run_name = run_name
        self.run_dir = Path(config.logging.dir) / self.run_name
        self.ckpt_dir = Path(config.checkpoint.dir) / self.run_name
        if self._resume_state is not None:
            # Before anything is built or loaded: a checkpoint of another model or objective is
            # refused with the keys that differ, not half-loaded.
            _check_resume_config(self._resume_state, config, self.resume_path, log=self._log)
        self._saved: Optional[Tuple[int, Optional[Path]]] = None  # (step, path) of the last save

        from fastflow.data import create_dataloader_from_config

        # The data before the DDP/FSDP wrap: a refusal here costs no parameter broadcast.
        self.loader = create_dataloader_from_config(
            config, rank=self.ctx.rank, world_size=self.ctx.world_size, seed=infra.seed, device=self.device
        )
        # Every rank shards the same index range: a node-local copy that differs by one file would
        # make the shards overlap or miss images (and a resume fail on some ranks only).
        if self.ctx.world_size > 1:  # the fingerprint hashes the file list: only where it is compared
            check_same_data(all_gather_object((self.loader.plan.num_samples, self.loader.fingerprint)),
                            config.data.root)

        self.loss_fn, self.wrapped = build_train_module(self.method, config, self.ctx)
        fused_adam = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [p for p in self.wrapped.parameters() if p.requires_grad],
            lr=train_cfg.learning_rate,
            betas=tuple(train_cfg.betas),
            weight_decay=train_cfg.weight_decay,
            **({"fused": True} if fused_adam else {}),
        )
        self.ema = EMA(self.method.model, decay=train_cfg.ema_decay, warmup_steps=train_cfg.ema_start)
        use_scaler = infra.mixed_precision and infra.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

        self.step = 0
        self.images_seen = 0
        self._fixed_batch: Optional[torch.Tensor] = None
        self._stop_signal: Optional[int] = None
        if self._resume_state is not None:
            try:
                self._load_state(self._resume_state)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise ckpt_io.CheckpointError(
                    f"cannot resume from {self.resume_path}: {type(exc).__name__}: {exc}"
                    f"{_config_differences(self._resume_state.get('config'), config)}") from exc
            if self.ctx.is_main:
                # Resuming from an earlier step than this run's newest checkpoint branches the run:
                # the later checkpoints are moved aside (kept, not pruned over, not auto-resumed).
                # Only once the state has loaded: a resume that fails moves nothing.
                moved = ckpt_io.set_aside_later_checkpoints(self.ckpt_dir, self.step)
                if moved is not None:
                    print(f"fastflow: resuming at step {self.step} from {self.resume_path}: "
                          f"this run's later checkpoints were moved to {moved}", file=sys.stderr, flush=True)
            barrier()
        self.writer = None

    def _find_resume(self, resume: Optional[str]) -> Tuple[Optional[Path], str]:
        """(checkpoint to resume from or None, run name). ``auto`` is implied after a torchrun
        restart; without logging.run_name, a job run with --max-restarts is named by its run id.

        A run folder that already holds checkpoints is continued, never overwritten: a fresh
        start (or a resume from another run's checkpoint) into it is refused."""
        config = self.config
        run_name = config.logging.run_name
        run_id = elastic_run_id()
        if run_name is None and run_id is not None:
            if run_id in ("", "none"):
                # torchrun's default --rdzv-id is "none": every such job would share one run folder.
                raise ConfigError(
                    "torchrun --max-restarts without a run id (--rdzv-id is 'none'): set logging.run_name "
                    "(or pass torchrun --standalone or --rdzv-id=<job id>) so that restarted workers find "
                    "this run's checkpoints")
            run_name = f"{config.method}-{run_id}"
        resume = resume or config.checkpoint.resume
        if restart_count() > 0:
            # A torchrun restart continues this run from its own newest checkpoint, not from the
            # job's original --resume (that would rewind everything trained since).
            own = ckpt_io.latest_checkpoint(Path(config.checkpoint.dir) / run_name) if run_name else None
            if own is not None or not resume:
                resume = "auto"
        path: Optional[Path] = None
        if resume == "auto":
            if run_name is None:
                raise ValueError("checkpoint.resume=auto needs logging.run_name (which run to resume)")
            path = ckpt_io.latest_checkpoint(Path(config.checkpoint.dir) / run_name)
        elif resume:
            path = ckpt_io.resolve_checkpoint(resume)
        if path is not None and run_name is None:
            if ckpt_io.is_sharded_checkpoint(path):
                run_name = ckpt_io.load_sharded_meta(path, 0).get("run_name")
            else:
                run_name = ckpt_io.load_checkpoint(path, map_location="cpu", mmap=True).get("run_name")
        if run_name is not None:
            own_dir = Path(config.checkpoint.dir) / run_name
            newest = ckpt_io.latest_checkpoint(own_dir)
            if newest is not None and (path is None or path.resolve().parent != own_dir.resolve()):
                start = "a fresh start" if path is None else f"resuming from {path} (another run's checkpoint)"
                raise ckpt_io.CheckpointError(
                    f"run {run_name!r} already holds checkpoints in {own_dir} (newest: {newest.name}); "
                    f"{start} would write over them: pass --resume auto to continue that run, or set "
                    f"logging.run_name to a new name")
        return path, run_name or f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"

    # ---------------------------------------------------------------------------- state
    def state_dict(self, overfit_batches: Optional[List[torch.Tensor]] = None) -> Dict[str, Any]:
        """The single-file checkpoint. ``overfit_batches``: every rank's fixed --overfit batch
        (gathered by save_checkpoint, rank order); by default this process's own."""
        if overfit_batches is None and self._fixed_batch is not None:
            overfit_batches = [self._fixed_batch.cpu()]
        return {
            "iteration": self.step,
            "images_seen": self.images_seen,
            "run_name": self.run_name,
            "method": self.config.method,
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": config_to_dict(self.config),
            "method_config": self.method.method_config(),
            "rng": ckpt_io.capture_rng_state(),
            "data": self.loader.state_dict(),
            "overfit_batches": overfit_batches,
            "world_size": self.ctx.world_size,
        }

    def _sharded_meta(self) -> Dict[str, Any]:
        """What a sharded checkpoint keeps besides tensors (same on every rank; rank 0 writes it)."""
        return {
            "format": "fastflow-sharded",
            "iteration": self.step,
            "images_seen": self.images_seen,
            "run_name": self.run_name,
            "method": self.config.method,
            "config": config_to_dict(self.config),
            "method_config": self.method.method_config(),
            "data": self.loader.state_dict(),
            "ema": {"decay": self.ema.decay, "warmup_steps": self.ema.warmup_steps, "step": self.ema.step},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": self.ctx.world_size,
        }

    def _rank_state(self) -> Dict[str, Any]:
        return {"rng": ckpt_io.capture_rng_state(),
                "overfit_batch": self._fixed_batch.cpu() if self._fixed_batch is not None else None}

    def _load_state(self, state: Dict[str, Any]) -> None:
        if state.get("method") not in (None, self.config.method):
            raise ValueError(
                f"{state.get('_path')}: checkpoint is for method {state['method']!r}, config says {self.config.method!r}"
            )
        from fastflow.train.fsdp import is_sharded

        same_world = int(state.get("world_size", 1)) == self.ctx.world_size
        if state.get("format") == "fastflow-sharded":
            ckpt_io.load_sharded_checkpoint(state["_path"], method=self.method, optimizer=self.optimizer, ema=self.ema)
            self.ema.step = int(state["ema"]["step"])
            rank_state = state.get("rank_state") if same_world else None
            if rank_state is not None:
                ckpt_io.restore_rng_state(rank_state["rng"])
                if rank_state.get("overfit_batch") is not None:
                    self._fixed_batch = rank_state["overfit_batch"].to(self.device)
        else:
            if is_sharded(self.method):
                names = [n for n, p in self.method.named_parameters() if p.requires_grad]
                ckpt_io.load_full_state_into_sharded(state, method=self.method, optimizer=self.optimizer, param_names=names)
            else:
                self.method.load_state_dict(ckpt_io.strip_module_prefix(state["model"]))
                self.optimizer.load_state_dict(state["optimizer"])
            self.ema.load_state_dict(state["ema"])
            ckpt_io.restore_rng_state(state["rng"])
            batches = state.get("overfit_batches")
            if batches is None and state.get("overfit_batch") is not None:  # written before per-rank batches
                batches = [state["overfit_batch"]]
            if batches and self.overfit:
                if same_world and len(batches) == self.ctx.world_size:
                    self._fixed_batch = batches[self.ctx.rank].to(self.device)
                elif self.ctx.is_main:  # other ranks draw their own
                    print(f"[fastflow] {state.get('_path')}: --overfit batches saved by {len(batches)} rank(s); "
                          f"rank 0 keeps the first, the other {self.ctx.world_size - 1} draw new ones", flush=True)
                    self._fixed_batch = batches[0].to(self.device)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # On another world size the data position is rescaled by images seen (approximate).
        self.loader.load_state_dict(state["data"], strict=same_world)
        self.step = int(state["iteration"])
        self.images_seen = int(state.get("images_seen", 0))
        self._saved = (self.step, Path(state["_path"]))  # that step is on disk already
        self._apply_optimizer_config()

    def _apply_optimizer_config(self) -> None:
        """The optimizer state loads the checkpoint's lr / betas / weight decay with its moments;
        the config's values win (a resumed run with a new learning rate uses it), and a change is
        logged."""
        t = self.config.training
        wanted = {"lr": t.learning_rate, "betas": tuple(t.betas), "weight_decay": t.weight_decay}
        changed = {}
        for group in self.optimizer.param_groups:
            for key, value in wanted.items():
                old = tuple(group[key]) if key == "betas" else group[key]
                if old != value:
                    changed[key] = (old, value)
                    group[key] = value
        if changed:
            self._log("resumed optimizer takes the config's " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))

    def save_checkpoint(self) -> Optional[Path]:
        """Collective under FSDP (every rank writes its shards); rank 0 alone otherwise. Returns
        the checkpoint's path (on every rank for sharded checkpoints, on rank 0 otherwise)."""
        if self._saved is not None and self._saved[0] == self.step:  # nothing changed since
            return self._saved[1]
        keep_last = self.config.checkpoint.keep_last
        if self.sharded_checkpoints:
            path: Optional[Path] = ckpt_io.save_sharded_checkpoint(
                self.ckpt_dir, self.step, method=self.method, optimizer=self.optimizer, ema=self.ema,
                meta=self._sharded_meta(), rank_state=self._rank_state(), rank=self.ctx.rank, keep_last=keep_last,
            )
        else:
            # The file holds rank 0's state, but the --overfit batch differs per rank: gather it
            # (a collective: every rank calls save_checkpoint at the same step).
            batches = None
            if self._fixed_batch is not None and self.ctx.world_size > 1:
                batches = all_gather_object(self._fixed_batch.cpu())
            path = None
            if self.ctx.is_main:
                path = ckpt_io.atomic_torch_save(self.state_dict(batches), self.ckpt_dir / f"checkpoint_{self.step:08d}.pt")
                ckpt_io.prune_checkpoints(self.ckpt_dir, keep_last, keep=path)
        self._saved = (self.step, path)
        return path

    # ---------------------------------------------------------------------------- pieces
    def _next_batch(self) -> torch.Tensor:
        if self.overfit:
            if self._fixed_batch is None:
                self._fixed_batch = self._to_device(next(self._data_iter))
            return self._fixed_batch
        return self._to_device(next(self._data_iter))

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """The batch on the device, in the network's memory format (converted once, here)."""
        if self.config.infrastructure.channels_last:
            return batch.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return batch.to(self.device, non_blocking=True)

    def _train_step(self, batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        train_cfg = self.config.training
        with autocast_context(self.config, self.device):
            loss, metrics = self.loss_fn(batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, train_cfg.gradient_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # A step GradScaler skips (fp16 inf/NaN) leaves the weights; the EMA still averages them in
        # and counts the step (as timm's and the course's do): checking costs a host sync per step.
        self.ema.update()
        metrics = dict(metrics)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2; every rank calls this
            grad_norm = grad_norm.full_tensor()
        metrics["grad_norm"] = grad_norm.detach()
        return metrics

    def _measure_flops(self, batch_size: int) -> Optional[int]:
        """FLOPs of one train step (forward + backward) at ``batch_size``, counted on a 2-image
        probe in eval mode on the plain (not yet compiled or sharded) method, so that no state
        (FMM step counter, RNG stream) moves. Counted on the reference ops: the flop counter
        cannot see inside the fused kernels (custom ops), whose math is the reference's."""
        was_training = self.method.training
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        try:
            self.method.eval()
            probe = torch.randn(min(2, batch_size), *self.image_shape, device=self.device)

            def run() -> None:
                with autocast_context(self.config, self.device):
                    loss, _ = self.method.compute_loss(probe)
                loss.backward()

            with reference_only():
                flops = count_flops(run) * batch_size // probe.shape[0]
        except Exception as exc:  # counting is best effort; training goes on
            self._log(f"FLOP count unavailable: {exc}")
            flops = None
        finally:
            self.method.zero_grad(set_to_none=True)
            self.method.train(was_training)
            torch.set_rng_state(rng)
            if cuda_rng is not None:  # the probe's randn and dropout drew from the device's generator
                torch.cuda.set_rng_state(cuda_rng, self.device)
        return flops

    @torch.no_grad()
    def sample_grid(self, tag: str) -> Optional[Path]:
        """EMA samples → PNG in the run folder and TensorBoard."""
        from fastflow.data import make_grid, save_image
        from fastflow.train.fsdp import is_sharded, reshard_all

        # Under FSDP every forward all-gathers, so every rank samples (same generator seed, same
        # samples) and rank 0 saves; otherwise rank 0 alone samples.
        sharded = is_sharded(self.method)
        if not (self.ctx.is_main or sharded):
            return None
        n = self.config.training.num_samples
        gen = torch.Generator(device=self.device).manual_seed(self.config.infrastructure.seed)
        was_training = self.method.training
        self.method.eval()
        if sharded:  # the swap writes the shards: no gathered copy may outlive it
            reshard_all(self.method)
        self.ema.apply_shadow()
        try:
            with autocast_context(self.config, self.device):
                # sampling.batch_size images per sampler call (one generator across the chunks)
                per_call = self.config.sampling.batch_size
                samples = torch.cat([
                    self.method.sample(min(per_call, n - first), self.image_shape, generator=gen,
                                       **sample_kwargs(self.config))
                    for first in range(0, n, per_call)])
        finally:
            if sharded:
                reshard_all(self.method)
            self.ema.restore()
            self.method.train(was_training)
        if not self.ctx.is_main:
            return None
        samples = samples.float().clamp(-1, 1).cpu()
        nrow = max(1, int(math.sqrt(n)))
        path = self.run_dir / f"samples_{tag}.png"
        save_image(samples, path, nrow=nrow)
        if self.writer is not None:
            self.writer.add_image("samples", (make_grid(samples, nrow=nrow) + 1) / 2, self.step)
        return path

    def _log(self, message: str) -> None:
        if self.ctx.is_main and not self.quiet:
            print(message, flush=True)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self._stop_signal is not None:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            self._log(f"\nsignal {signal.Signals(signum).name}: finishing this step, checkpointing, exiting")

        self._previous_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous_handlers[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass

    def _restore_signal_handlers(self) -> None:
        for sig, previous in getattr(self, "_previous_handlers", {}).items():
            signal.signal(sig, previous)

    # ---------------------------------------------------------------------------- loop
    def train(self) -> Dict[str, Any]:
        cfg, train_cfg = self.config, self.config.training
        total = train_cfg.num_iterations
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.ctx.is_main and cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events its predecessor logged after the
            # checkpoint (steps > self.step), so the curves do not fold back over themselves; the
            # checkpoint step's own events (logged before it was saved) stay.
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"),
                                        purge_step=self.step + 1 if self.resume_path is not None else None)
            self.writer.add_text("config", "```\n" + _yaml_dump(config_to_dict(cfg)) + "\n```", self.step)
        self._install_signal_handlers()
        self._log(
            f"fastflow | {cfg.method} | {self.num_params / 1e6:.2f}M params | device {self.device} | "
            f"world {self.ctx.world_size} | batch {train_cfg.batch_size}/rank | "
            f"{'resumed from ' + str(self.resume_path) + ' at step ' + str(self.step) if self.resume_path else 'fresh start'}"
        )
        if self.resume_path is not None and self.step >= total:
            self._log(f"run {self.run_name!r} is complete (step {self.step} of training.num_iterations={total}): "
                      f"nothing to train; raise training.num_iterations to go on, or set a new logging.run_name "
                      f"for a new run")
        self._data_iter = iter(self.loader)
        profiler = None
        if cfg.logging.profile:
            profiler, note = _make_profiler(cfg, self.run_dir, self.device, total - self.step)
            if note:
                self._log(note)
        progress = _progress_bar(total, self.step, enabled=cfg.logging.progress_bar and self.ctx.is_main and not self.quiet)
        last_metrics: Dict[str, float] = {}
        window_start, window_images, window_paused = time.perf_counter(), 0, 0.0
        window_sums: Optional[Dict[str, torch.Tensor]] = None
        window_steps = 0
        compile_seconds: Optional[float] = None
        reset_peak_memory(self.device)
        self.method.train()
        try:
            while self.step < total:
                try:
                    batch = self._next_batch()
                except BadImageError as exc:  # data.on_bad_image=error met an unreadable file
                    raise self._stopped_by_bad_image(exc) from exc
                torch.manual_seed(step_seed(cfg.infrastructure.seed, self.ctx.rank, self.step))
                t_step = time.perf_counter()
                metrics = self._train_step(batch)
                # Window sums stay on the device (no sync per step); logged as means over the
                # window's steps and the ranks, not one rank's last step.
                if window_sums is None:
                    window_sums = {k: v.detach().float().clone() for k, v in metrics.items()}
                else:
                    for k, v in metrics.items():
                        window_sums[k].add_(v.detach())
                window_steps += 1
                global_batch = batch.shape[0] * self.ctx.world_size
                if compile_seconds is None and compile_scope(cfg) != "none":
                    compile_seconds = time.perf_counter() - t_step  # first step = compile + run
                    self._log(f"compile ({compile_scope(cfg)}): first step took {compile_seconds:.1f}s")
                    # Not throughput: the step leaves the window (its losses stay in the means).
                    window_paused += compile_seconds
                    window_images -= global_batch
                self.step += 1
                self.images_seen += global_batch
                window_images += global_batch
                if profiler is not None:
                    profiler.step()
                if progress is not None:
                    progress.update(1)

                if self.step % train_cfg.log_every == 0 or self.step == total:
                    # Sync point: metrics leave the device only here.
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    elapsed = time.perf_counter() - window_start - window_paused
                    keys = sorted(window_sums)
                    means = mean_over_ranks(torch.stack([window_sums[k] for k in keys]) / window_steps)
                    last_metrics = dict(zip(keys, means.tolist()))
                    last_metrics.update(self._perf(window_images, elapsed))
                    self._report(last_metrics, progress)
                    window_start, window_images, window_paused = time.perf_counter(), 0, 0.0
                    window_sums, window_steps = None, 0
                t_aside = time.perf_counter()  # sampling and checkpoints are not training throughput
                # Checkpoint first: a sampler that fails (e.g. out of memory) loses no training.
                if self.step % train_cfg.save_every == 0:
                    self.save_checkpoint()
                if self.step % train_cfg.sample_every == 0:
                    self.sample_grid(f"{self.step:08d}")
                window_paused += time.perf_counter() - t_aside
                self._maybe_inject_fault()
                # One tiny all-reduce: a signal on any rank stops every rank after the same step.
                stop = any_rank_true(self._stop_signal is not None, self.device) if self.ctx.enabled else self._stop_signal is not None
                if stop:
                    break
        finally:
            if progress is not None:
                progress.close()
            if profiler is not None:
                profiler.stop()
            self._restore_signal_handlers()
        interrupted = self.step < total
        ckpt_path = self.save_checkpoint()  # collective under FSDP: every rank broke at this step
        # Interrupted (a signal, e.g. preemption): checkpoint and leave; no sampling.
        grid_path = None if interrupted else self.sample_grid("final")
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        barrier()
        summary = {
            "step": self.step,
            "interrupted": interrupted,
            "signal": self._stop_signal if interrupted else None,
            "checkpoint": str(ckpt_path) if ckpt_path else None,
            "samples": str(grid_path) if grid_path else None,
            "run_dir": str(self.run_dir),
            "tensorboard": str(self.run_dir / "tensorboard") if cfg.logging.tensorboard else None,
            "metrics": last_metrics,
        }
        self._log(
            ("interrupted at step %d; " % self.step if interrupted else "done; ")
            + f"checkpoint: {summary['checkpoint']}\n  samples: {summary['samples']}"
            + (f"\n  TensorBoard: tensorboard --logdir {summary['tensorboard']}" if summary["tensorboard"] else "")
        )
        return summary

    def _stopped_by_bad_image(self, exc: BadImageError) -> BadImageError:
        """The error to raise for an unreadable file met mid-run, after checkpointing the steps done.
        The failed batch was not consumed (a loader advances only past a batch it returns), so the
        checkpoint resumes at that very batch."""
        saved = ""
        # Under several ranks only this one met the file: a save (collective under FSDP) would hang.
        if self.ctx.world_size == 1 and self.step > 0:
            saved = f"; steps so far checkpointed: {self.save_checkpoint()}"
        return BadImageError(
            f"{exc}{saved}; set data.on_bad_image=skip to go on with this run (`--resume auto`); deleting the "
            f"file changes the dataset size, which the checkpoint's data position refuses")

    def _maybe_inject_fault(self) -> None:
        spec = os.environ.get(FAULT_INJECT_ENV)
        if not spec or restart_count() > 0:
            return
        rank, step = (int(v) for v in spec.split(":"))
        if self.ctx.rank == rank and self.step == step:
            print(f"[rank {rank}] {FAULT_INJECT_ENV}: dying after step {step}", file=sys.stderr, flush=True)
            os._exit(17)

    def _perf(self, images: int, seconds: float) -> Dict[str, float]:
        """Throughput of a window (none when it timed no image: a window holding only the compile
        step), the learning rate and the peak memory so far."""
        perf: Dict[str, float] = {"lr": self.optimizer.param_groups[0]["lr"]}
        if images > 0:
            perf["img_per_s"] = images / max(seconds, 1e-9)
            perf["sec_per_1k_img"] = 1000.0 * seconds / images
        if "img_per_s" in perf and self.flops_per_step and self.peak_flops:
            steps_per_s = perf["img_per_s"] / (self.config.training.batch_size * self.ctx.world_size)
            perf["mfu"] = self.flops_per_step * self.ctx.world_size * steps_per_s / (self.peak_flops * self.ctx.world_size)
        mem = peak_memory_bytes(self.device)
        if mem is not None:
            perf["peak_mem_gb"] = mem / 2**30
        return perf

    def _report(self, metrics: Dict[str, float], progress) -> None:
        if not self.ctx.is_main:
            return
        if self.writer is not None:
            for key, value in metrics.items():
                group = "perf" if key in ("img_per_s", "sec_per_1k_img", "mfu", "peak_mem_gb") else "train"
                self.writer.add_scalar(f"{group}/{key}", value, self.step)
            self.writer.add_scalar("train/images_seen", self.images_seen, self.step)
        keys = [k for k in ("loss", "derivative_loss", "reconstruction_loss", "current_gap", "grad_norm") if k in metrics]
        line = f"step {self.step:>7d} | " + " | ".join(f"{k} {metrics[k]:.4g}" for k in keys)
        if "lr" in metrics:
            line += f" | lr {metrics['lr']:.3g}"
        if "img_per_s" in metrics:
            line += f" | {metrics['img_per_s']:.1f} img/s | {metrics['sec_per_1k_img']:.2f} s/1k img"
        if "mfu" in metrics:
            line += f" | MFU {100 * metrics['mfu']:.1f}%"
        if "peak_mem_gb" in metrics:
            line += f" | mem {metrics['peak_mem_gb']:.2f} GB"
        if progress is not None:
            progress.write(line)
        elif not self.quiet:
            print(line, flush=True)


def _yaml_dump(data: Dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 10.0, file=sys.stderr)


def profile_schedule(wait: int, warmup: int, active: int, steps_left: int) -> Tuple[int, int, int]:
    """The (wait, warmup, active) that fits the ``steps_left`` steps of this run. A schedule longer
    than the run would end with no trace (stopped while waiting or warming up) or with a last
    ``ProfilerStep`` that holds no training step (stopped while recording): shrink the wait first,
    then the active steps (down to one), then the warmup."""
    if steps_left <= 0 or wait + warmup + active <= steps_left:
        return wait, warmup, active
    warmup = min(warmup, steps_left - 1)
    active = min(active, steps_left - warmup)
    return steps_left - warmup - active, warmup, active


def _make_profiler(config: Config, run_dir: Path, device: torch.device, steps_left: int):
    """torch.profiler on a wait/warmup/active schedule with shapes and memory → TensorBoard traces.
    Returns ``(profiler or None when no step is left, a note when the schedule had to shrink)``."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    if steps_left <= 0:
        return None, "logging.profile: no training step left to profile"
    log = config.logging
    asked = (log.profile_wait, log.profile_warmup, log.profile_active)
    wait, warmup, active = profile_schedule(*asked, steps_left)
    note = None
    if (wait, warmup, active) != asked:
        note = (f"logging.profile: {steps_left} steps left, fewer than profile_wait+profile_warmup+profile_active "
                f"= {sum(asked)}; profiling with wait={wait}, warmup={warmup}, active={active}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(run_dir / "profile")),
        record_shapes=True,
        profile_memory=True,
        with_stack=False,
    )
    prof.start()
    return prof, note


def train_from_config(config: Config, *, resume: Optional[str] = None, overfit: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Run a whole training job; the CLI's entry point. Dumps a CUDA memory snapshot on OOM."""
    if torch.cuda.is_available():
        # float32 matmuls/convs (the jvp backend's float32 pass) on TF32 tensor cores; cuDNN
        # autotunes conv algorithms for the fixed training shapes. The benchmarks run the same way.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    record_history = config.logging.profile or config.logging.memory_history
    if record_history and torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    trainer: Optional[Trainer] = None
    try:
        trainer = Trainer(config, resume=resume, overfit=overfit, quiet=quiet)
        return trainer.train()
    except BaseException as exc:
        if isinstance(exc, torch.cuda.OutOfMemoryError) and trainer is not None and torch.cuda.is_available():
            snapshot = trainer.run_dir / f"oom_snapshot_rank{trainer.ctx.rank}.pickle"
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(snapshot))
            hint = "" if record_history else (
                "; allocator state only: set logging.memory_history=true for allocation stacks")
            print(f"CUDA out of memory; memory snapshot written to {snapshot} (open it at pytorch.org/memory_viz){hint}",
                  file=sys.stderr)
        if distributed_initialized():
            # The traceback's frames hold the Trainer (its DDP module, the group's pending work):
            # freed at interpreter exit, after the group is gone, they abort the process
            # ("terminate called without an active exception", exit -6 in place of the error).
            traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        trainer = None
        cleanup()
