"""Flow Map Matching (Boffi, Albergo & Vanden-Eijnden 2024, arXiv 2406.07507), Lagrangian loss.

Φ_{s,t}(x) = x + (t − s)·v_θ(s, t, x)  (so Φ_{s,s} = id), trained with Prop. 3.11:

    L = E |∂_t Φ_{s,t}(X̄) − İ_t|² + λ·|Φ_{s,t}(Φ_{t,s}(I_t)) − I_t|²,   X̄ = sg(Φ_{t,s}(I_t)),
    ∂_t Φ_{s,t}(x) = v_θ(s, t, x) + (t − s)·∂_t v_θ(s, t, x).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.methods.base import BaseMethod, Metrics
from fastflow.methods.time_derivative import BACKENDS, _at_least_float32, velocity_and_time_derivative


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def _dropout_rates(model: nn.Module):
    """Dropout probabilities > 0 anywhere in ``model`` (nn.Dropout modules, blocks' ``dropout``)."""
    for module in model.modules():
        rate = module.p if isinstance(module, nn.modules.dropout._DropoutNd) else getattr(module, "dropout", 0.0)
        if isinstance(rate, (int, float)) and rate > 0:
            yield float(rate)


class FlowMapMatching(BaseMethod):
    """Flow Map Matching around a :class:`~fastflow.models.DualTimeUNet` ``model(x, s, t)``."""

    def __init__(
        self,
        model: nn.Module,
        num_timesteps: int = 1000,
        sigma_min: float = 1e-4,
        annealing_schedule: str = "linear",
        initial_gap: float = 0.1,
        warmup_steps: int = 30000,
        reconstruction_weight: float = 0.5,
        derivative: str = "dual",
        derivative_grad: bool = True,
        derivative_precision: str = "float32",
        fd_step: float = 5e-5,
    ):
        super().__init__(model)
        if annealing_schedule not in ("linear", "cosine", "none"):
            raise ValueError(f"annealing_schedule={annealing_schedule!r}: expected linear | cosine | none")
        if derivative not in BACKENDS:
            raise ValueError(f"derivative={derivative!r}: expected one of {', '.join(BACKENDS)}")
        self.num_timesteps = num_timesteps
        self.sigma_min = sigma_min
        self.annealing_schedule = annealing_schedule
        self.initial_gap = initial_gap
        self.warmup_steps = warmup_steps
        self.reconstruction_weight = reconstruction_weight
        self.derivative = derivative
        self.derivative_grad = derivative_grad
        self.derivative_precision = derivative_precision
        self.fd_step = fd_step
        if derivative == "finite_difference":
            rate = max(_dropout_rates(model), default=0.0)
            if rate > 0:
                raise ValueError(
                    f"flow_map_matching.derivative=finite_difference needs a model without dropout "
                    f"(model.dropout=0; found dropout {rate}): the two halves of the doubled batch "
                    f"would draw different masks, and their difference is divided by 2h"
                )
        # Survives checkpointing; advanced only by sample_time_pairs in training mode.
        self.register_buffer("_step", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "FlowMapMatching":
        c = config.flow_map_matching
        if c.derivative == "finite_difference" and config.model.dropout > 0:
            raise ValueError(
                f"flow_map_matching.derivative=finite_difference needs model.dropout=0 (got "
                f"{config.model.dropout}): the two halves of the doubled batch would draw different masks"
            )
        infra = getattr(config, "infrastructure", None)
        half = infra is not None and infra.mixed_precision and infra.precision in ("bf16", "fp16")
        if c.derivative == "finite_difference" and c.derivative_precision == "autocast" and half:
            warnings.warn(
                f"flow_map_matching.derivative=finite_difference with derivative_precision=autocast runs the "
                f"central difference in {infra.precision} on CUDA: its ∂_t v is off by >= 13% for every fd_step "
                f"(docs/derivative.md); use derivative_precision=float32 or derivative=dual",
                RuntimeWarning, stacklevel=2,
            )
        return cls(
            model,
            num_timesteps=c.num_timesteps,
            sigma_min=c.sigma_min,
            annealing_schedule=c.annealing_schedule,
            initial_gap=c.initial_gap,
            warmup_steps=c.warmup_steps,
            reconstruction_weight=c.reconstruction_weight,
            derivative=c.derivative,
            derivative_grad=c.derivative_grad,
            derivative_precision=c.derivative_precision,
            fd_step=c.fd_step,
        )

    def method_config(self) -> Dict[str, Any]:
        keys = ("num_timesteps", "sigma_min", "annealing_schedule", "initial_gap", "warmup_steps",
                "reconstruction_weight", "derivative", "derivative_grad", "derivative_precision", "fd_step")
        return {k: getattr(self, k) for k in keys}

    # ------------------------------------------------------------------ the flow map
    def flow_map(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """Φ_{s,t}(x) = x + (t − s)·v_θ(s, t, x)."""
        v = self.model(x, s, t)
        return x + _bcast(t - s, x) * v

    @staticmethod
    def interpolant_I_t(t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        """I_t = (1 − t)·x0 + t·x1 (noise x0 at t = 0, data x1 at t = 1)."""
        tb = _bcast(t, x0)
        return (1.0 - tb) * x0 + tb * x1

    @staticmethod
    def interpolant_I_t_dot(t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        """İ_t = x1 − x0 (constant along the linear path)."""
        return x1 - x0

    # ------------------------------------------------------------------ time pairs
    def get_time_gap(self, step: Any) -> Tensor:
        """Largest |t − s| at ``step``: initial_gap → 1 over warmup_steps (linear | cosine), or 1 (none)."""
        step_t = torch.as_tensor(step, dtype=torch.float32, device=self._step.device)
        if self.annealing_schedule == "none":
            return torch.ones((), device=self._step.device)
        progress = (step_t / max(self.warmup_steps, 1)).clamp(max=1.0) if self.warmup_steps > 0 else torch.ones_like(step_t)
        if self.annealing_schedule == "cosine":
            progress = (1.0 - torch.cos(math.pi * progress)) / 2.0
        return self.initial_gap + (1.0 - self.initial_gap) * progress

    def current_time_gap(self) -> Tensor:
        """The gap the next :meth:`sample_time_pairs` draws with: ``get_time_gap(step)`` capped at 1 − σ."""
        return self.get_time_gap(self._step).clamp(max=1.0 - self.sigma_min)

    def sample_time_pairs(self, batch_size: int, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
        """(s, t) as the course returns them: δ = t − s with density ∝ (gap − δ) on [σ, gap], s
        uniform in its feasible range, gap = :meth:`current_time_gap` (read it before the call:
        in training mode the call advances the step).

        δ = gap − (gap − σ)·√(1 − u) (inverse CDF of the triangular density), gap capped at 1 − σ;
        s ~ U[σ, 1 − δ] so that σ ≤ s < t ≤ 1 — the whole triangle once gap reaches 1 (the course
        sampled s ≤ gap − δ, which confines pairs near t = 0 while gap is small). The joint density
        of (s, t) on the band σ ≤ t − s ≤ gap is then ∝ (gap − δ)/(1 − σ − δ): the course's uniform
        triangle only once gap = 1 − σ (both agree from then on).
        """
        device = device or self._step.device
        gap = self.current_time_gap()
        if self.training:
            self._step += 1
        sigma = self.sigma_min
        u = torch.rand(batch_size, device=device)
        delta = gap - (gap - sigma) * torch.sqrt(1.0 - u)
        s = sigma + torch.rand(batch_size, device=device) * (1.0 - delta - sigma).clamp(min=0.0)
        return s, s + delta

    # ------------------------------------------------------------------ loss
    def lagrangian_loss(self, s: Tensor, t: Tensor, I_t: Tensor, I_t_dot: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Prop. 3.11 with w_{s,t} = 1; returns (loss, {derivative_loss, reconstruction_loss})."""
        delta = _bcast(t - s, I_t)
        X_ts_It = self.flow_map(t, s, I_t)  # Φ_{t,s}(I_t): the Lagrangian base point at time s
        X_fixed = X_ts_It.detach()  # derivative term: fixed base point
        v, dv_dt = velocity_and_time_derivative(
            self.model, X_fixed, s, t, self.derivative,
            fd_step=self.fd_step, precision=self.derivative_precision, derivative_grad=self.derivative_grad,
        )
        partial_t_X = v + delta * dv_dt  # ∂_t Φ_{s,t}(X̄) = v + (t − s)·∂_t v
        # Half types are upcast; a float64 model keeps float64 (its checks reach ~1e-15, not 1e-9).
        derivative_loss = F.mse_loss(partial_t_X, _at_least_float32(I_t_dot))
        # Prop. 3.11, reconstruction term: through the non-detached base point.
        v_rec = _at_least_float32(self.model(X_ts_It, s, t))
        X_rec = _at_least_float32(X_ts_It) + delta * v_rec
        reconstruction_loss = F.mse_loss(X_rec, _at_least_float32(I_t))
        loss = derivative_loss + self.reconstruction_weight * reconstruction_loss
        return loss, {"derivative_loss": derivative_loss.detach(), "reconstruction_loss": reconstruction_loss.detach()}

    def compute_loss(self, x_1: Tensor, **kwargs: Any) -> Tuple[Tensor, Metrics]:
        x_0 = torch.randn_like(x_1)
        gap = self.current_time_gap()  # before sample_time_pairs advances the step
        s, t = self.sample_time_pairs(x_1.shape[0], x_1.device)
        I_t = self.interpolant_I_t(t, x_0, x_1)
        I_t_dot = self.interpolant_I_t_dot(t, x_0, x_1)
        loss, parts = self.lagrangian_loss(s, t, I_t, I_t_dot)
        metrics = {
            "loss": loss.detach(),
            "s_mean": s.mean(),
            "t_mean": t.mean(),
            "delta_t_mean": (t - s).mean(),
            "current_gap": gap.detach(),
            **parts,
        }
        return loss, metrics

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        image_shape: Tuple[int, int, int],
        num_steps: int = 20,
        generator: Optional[torch.Generator] = None,
        x_0: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Compose ``num_steps`` flow maps over linspace(σ_min, 1 − σ_min, num_steps + 1)."""
        device = self.device
        x = x_0 if x_0 is not None else torch.randn((batch_size, *image_shape), device=device, generator=generator)
        ts = torch.linspace(self.sigma_min, 1.0 - self.sigma_min, num_steps + 1, device=device)
        for i in range(num_steps):
            s = ts[i].expand(batch_size)
            t = ts[i + 1].expand(batch_size)
            x = self.flow_map(s, t, x).float()
        return x
