"""Flow Matching (Lipman et al. 2023) on the CondOT path x_t = (1 − t)·x0 + t·x1."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.methods.base import BaseMethod, Metrics


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1)))


class FlowMatching(BaseMethod):
    """Noise x0 ~ N(0, I) at t = 0, data x1 at t = 1; v_θ(x_t, t) regresses x1 − x0.

    t ~ U[σ_min, 1]; the network's time input is t·(T − 1) (continuous, not rounded).
    """

    def __init__(self, model: nn.Module, num_timesteps: int = 1000, sigma_min: float = 1e-4):
        super().__init__(model)
        self.num_timesteps, self.sigma_min = num_timesteps, sigma_min

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "FlowMatching":
        c = config.flow_matching
        return cls(model, num_timesteps=c.num_timesteps, sigma_min=c.sigma_min)

    def method_config(self) -> Dict[str, Any]:
        return {"num_timesteps": self.num_timesteps, "sigma_min": self.sigma_min}

    def forward_process(self, x_0: Tensor, x_1: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """(x_t, target velocity) = ((1 − t)·x0 + t·x1, x1 − x0)."""
        tb = _bcast(t, x_0)
        return (1.0 - tb) * x_0 + tb * x_1, x_1 - x_0

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model(x, t * (self.num_timesteps - 1))

    def compute_loss(self, x_1: Tensor, **kwargs: Any) -> Tuple[Tensor, Metrics]:
        noise = torch.randn_like(x_1)
        t = torch.rand(x_1.shape[0], device=x_1.device) * (1.0 - self.sigma_min) + self.sigma_min
        x_t, target = self.forward_process(noise, x_1, t)
        loss = F.mse_loss(self.velocity(x_t, t).float(), target.float())
        return loss, {"loss": loss.detach(), "t_mean": t.mean()}

    def euler_step(self, x_t: Tensor, t: float, dt: float) -> Tensor:
        tt = torch.full((x_t.shape[0],), t, device=x_t.device)
        return x_t + dt * self.velocity(x_t, tt).float()

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        image_shape: Tuple[int, int, int],
        num_steps: int = 100,
        solver: str = "euler",
        generator: Optional[torch.Generator] = None,
        x_0: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        """Integrate dx/dt = v_θ(x, t) from t = 0 to 1 in ``num_steps`` steps (euler | midpoint | heun)."""
        method = kwargs.pop("method", None) or solver  # course name: method="euler"
        x = x_0 if x_0 is not None else torch.randn((batch_size, *image_shape), device=self.device, generator=generator)
        dt = 1.0 / num_steps
        for step in range(num_steps):
            t = step * dt
            if method == "euler":
                x = self.euler_step(x, t, dt)
            elif method == "midpoint":
                x_mid = self.euler_step(x, t, dt / 2)
                x = x + dt * self.velocity(x_mid, torch.full((batch_size,), t + dt / 2, device=x.device)).float()
            elif method == "heun":
                v0 = self.velocity(x, torch.full((batch_size,), t, device=x.device)).float()
                x_pred = x + dt * v0
                v1 = self.velocity(x_pred, torch.full((batch_size,), t + dt, device=x.device)).float()
                x = x + dt * 0.5 * (v0 + v1)
            else:
                raise ValueError(f"FlowMatching.sample: unknown solver {method!r} (euler | midpoint | heun)")
        return x
