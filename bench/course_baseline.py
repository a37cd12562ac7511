"""The course codebase's Flow Map Matching loss, kept as the baseline the fast backends are measured against.

A faithful transcription of ``src/methods/flow_map_matching.py`` as the course guide
(shared/reference/course-codebase-guide.md, "Training: The Lagrangian Loss") describes it:
∂_t v_θ by a per-sample ``torch.func.vmap`` over ``torch.func.jvp`` (``randomness="different"``),
in float32 with autocast disabled, and the same Prop. 3.11 loss. Two deliberate differences, both
needed for it to run at all on fastflow's network:

- the network is fastflow's :class:`~fastflow.models.DualTimeUNet`, run under
  ``fastflow.ops.math_attention()`` because SDPA has no forward-mode AD (the course UNet's
  attention is an explicit softmax, so this is its semantics);
- ``model_single`` closes over its per-sample arguments (the guide's listing closes over the whole
  batch's ``x, s, t`` by mistake, which cannot run under ``vmap``).

Not part of the package: it is here to be timed (bench/test_bench_fmm.py, bench/gpu_suite.py) and
to be checked against the package (tests/test_time_derivative.py).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vmap

from fastflow import ops


class CourseFlowMapMatching(nn.Module):
    """Course FMM: ``compute_loss(x_1) -> (loss, metrics)`` with the per-sample vmap(jvp) derivative."""

    def __init__(
        self,
        model: nn.Module,
        sigma_min: float = 1e-4,
        initial_gap: float = 0.1,
        warmup_steps: int = 30000,
        reconstruction_weight: float = 0.5,
    ):
        super().__init__()
        self.model = model
        self.sigma_min = sigma_min
        self.initial_gap = initial_gap
        self.warmup_steps = warmup_steps
        self.reconstruction_weight = reconstruction_weight
        self.current_step = 0

    def _func_model(self) -> nn.Module:
        """The bare network inside ``torch.func`` transforms (unwraps DDP's ``.module``)."""
        return getattr(self.model, "module", self.model)

    def flow_map(self, s: Tensor, t: Tensor, x: Tensor) -> Tensor:
        v_theta = self.model(x, s, t)
        delta = (t - s).view(-1, 1, 1, 1)
        return x + delta * v_theta

    @staticmethod
    def interpolant_I_t(t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        t = t.view(-1, 1, 1, 1)
        return (1 - t) * x0 + t * x1

    @staticmethod
    def interpolant_I_t_dot(t: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
        return x1 - x0

    def get_time_gap(self, step: int) -> float:
        """Linear diagonal annealing: initial_gap → 1 over warmup_steps."""
        progress = min(1.0, step / self.warmup_steps)
        return self.initial_gap + (1.0 - self.initial_gap) * progress

    def sample_time_pairs(self, batch_size: int, device: torch.device) -> Tuple[Tensor, Tensor]:
        """δ = gap − (gap − σ)·√(1 − u); s ~ U[σ, max_gap − δ]; t = s + δ (the course's sampler)."""
        gap = self.get_time_gap(self.current_step)
        sigma = self.sigma_min
        u = torch.rand(batch_size, device=device)
        delta = gap - (gap - sigma) * torch.sqrt(1 - u)
        s = sigma + torch.rand(batch_size, device=device) * (gap - delta - sigma).clamp(min=0.0)
        return s, s + delta

    def velocity_and_time_derivative(self, s: Tensor, t: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(v_θ, ∂_t v_θ) by vmap over samples of jvp in t (tangent 1)."""
        model = self._func_model()

        def model_single(t_single: Tensor, s_single: Tensor, x_single: Tensor) -> Tensor:
            return model(x_single.unsqueeze(0), s_single.unsqueeze(0), t_single.unsqueeze(0)).squeeze(0)

        def compute_v_and_dv_dt(s_i: Tensor, t_i: Tensor, x_i: Tensor) -> Tuple[Tensor, Tensor]:
            def fn(t_val: Tensor) -> Tensor:
                return model_single(t_val, s_i, x_i)

            return jvp(fn, (t_i,), (torch.ones_like(t_i),))

        batched_jvp = vmap(compute_v_and_dv_dt, in_dims=(0, 0, 0), randomness="different")
        with torch.autocast(device_type=x.device.type, enabled=False), ops.math_attention():
            return batched_jvp(s, t, x)

    def lagrangian_loss(self, s: Tensor, t: Tensor, I_t: Tensor, I_t_dot: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        X_ts_It = self.flow_map(t, s, I_t)  # Φ_{t,s}(I_t)
        X_ts_It_fixed = X_ts_It.detach()
        s_fp32, t_fp32 = s.float(), t.float()
        v_theta, dv_dt = self.velocity_and_time_derivative(s_fp32, t_fp32, X_ts_It_fixed.float())
        delta = (t - s).view(-1, 1, 1, 1)
        partial_t_X_st = v_theta + delta * dv_dt
        derivative_loss = F.mse_loss(partial_t_X_st, I_t_dot.float())
        v_theta_rec = self.model(X_ts_It.float(), s_fp32, t_fp32)  # not detached
        X_st_X_ts_It = X_ts_It.float() + delta * v_theta_rec
        reconstruction_loss = F.mse_loss(X_st_X_ts_It, I_t.float())
        total_loss = derivative_loss + self.reconstruction_weight * reconstruction_loss
        return total_loss, {"derivative_loss": derivative_loss.detach(), "reconstruction_loss": reconstruction_loss.detach()}

    def compute_loss(self, x_1: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        x_0 = torch.randn_like(x_1)
        s, t = self.sample_time_pairs(x_1.shape[0], x_1.device)
        if self.training:
            self.current_step += 1
        I_t = self.interpolant_I_t(t, x_0, x_1)
        I_t_dot = self.interpolant_I_t_dot(t, x_0, x_1)
        loss, parts = self.lagrangian_loss(s, t, I_t, I_t_dot)
        return loss, {"loss": loss.detach(), **parts}

    def forward(self, x_1: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.compute_loss(x_1)
