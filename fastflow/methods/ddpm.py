"""DDPM (Ho et al. 2020) with DDIM sampling (Song et al. 2021), ε- and x0-prediction."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.methods.base import BaseMethod, Metrics, _extract


class DDPM(BaseMethod):
    """Linear β schedule β_t = β_start + t·(β_end − β_start)/(T − 1); the network predicts ε.

    Buffers (shape [T], float32, computed in float64): betas, alphas, alphas_cumprod,
    alphas_cumprod_prev, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2.
    """

    prediction = "epsilon"

    def __init__(self, model: nn.Module, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__(model)
        self.num_timesteps, self.beta_start, self.beta_end = num_timesteps, beta_start, beta_end
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas": (1.0 / alphas).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # posterior_variance[0] = 0: clip to the next value so the log is finite.
            "posterior_log_variance_clipped": torch.log(
                torch.cat([posterior_variance[1:2], posterior_variance[1:]])
            ),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float())

    @classmethod
    def from_config(cls, model: nn.Module, config: Any) -> "DDPM":
        c = config.ddpm
        return cls(model, num_timesteps=c.num_timesteps, beta_start=c.beta_start, beta_end=c.beta_end)

    def method_config(self) -> Dict[str, Any]:
        return {"num_timesteps": self.num_timesteps, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "prediction": self.prediction}

    # ------------------------------------------------------------------ training
    def forward_process(self, x_0: Tensor, t: Tensor, noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, returns (x_t, ε)."""
        if noise is None:
            noise = torch.randn_like(x_0)
        x_t = _extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0 + _extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_0.shape
        ) * noise
        return x_t, noise

    def _target(self, x_0: Tensor, noise: Tensor) -> Tensor:
        return noise

    def compute_loss(self, x_0: Tensor, **kwargs: Any) -> Tuple[Tensor, Metrics]:
        t = torch.randint(0, self.num_timesteps, (x_0.shape[0],), device=x_0.device)
        x_t, noise = self.forward_process(x_0, t)
        prediction = self.model(x_t, t.float())
        loss = F.mse_loss(prediction.float(), self._target(x_0, noise).float())
        return loss, {"loss": loss.detach(), "t_mean": t.float().mean()}

    # ------------------------------------------------------------------ sampling
    def predict_x0_and_eps(self, x_t: Tensor, t: Tensor, clip: bool = True) -> Tuple[Tensor, Tensor]:
        """x̂0 (clamped to [−1, 1] when ``clip``) and ε̂ from one network evaluation."""
        out = self.model(x_t, t.float()).float()
        sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_1m = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        x0 = (x_t - sqrt_1m * out) / sqrt_ab
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        return x0, out  # ε̂ is the network output itself (course DDIM uses ε_θ unclamped)

    @torch.no_grad()
    def reverse_process(self, x_t: Tensor, t: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """One DDPM step: x_{t−1} = μ̃(x_t, x̂0) + σ_t·z, no noise at t = 0."""
        x0, _ = self.predict_x0_and_eps(x_t, t)
        mean = _extract(self.posterior_mean_coef1, t, x_t.shape) * x0 + _extract(
            self.posterior_mean_coef2, t, x_t.shape
        ) * x_t
        log_var = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        noise = torch.randn(x_t.shape, device=x_t.device, generator=generator)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * torch.exp(0.5 * log_var) * noise

    @torch.no_grad()
    def reverse_process_DDIM(
        self, x_t: Tensor, t: Tensor, t_prev: Tensor, eta: float = 0.0, generator: Optional[torch.Generator] = None
    ) -> Tensor:
        """One DDIM step t → t_prev (t_prev = −1: ᾱ = 1, the step returns x̂0).

        σ = η·√[(1 − ᾱ_prev)/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_prev)],
        x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ²)·ε̂ + σ·z.
        """
        x0, eps = self.predict_x0_and_eps(x_t, t)
        ab_t = _extract(self.alphas_cumprod, t, x_t.shape)
        prev_valid = t_prev >= 0
        ab_prev = torch.where(
            prev_valid.reshape(-1, *([1] * (x_t.dim() - 1))),
            _extract(self.alphas_cumprod, t_prev.clamp(min=0), x_t.shape),
            torch.ones_like(ab_t),
        )
        sigma = eta * torch.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
        direction = torch.sqrt((1 - ab_prev - sigma**2).clamp(min=0.0))
        out = ab_prev.sqrt() * x0 + direction * eps
        if eta == 0:  # deterministic: draw nothing, so the generator's stream is left as it was
            return out
        noise = torch.randn(x_t.shape, device=x_t.device, generator=generator)
        return out + sigma * noise

    @staticmethod
    def ddim_timesteps(num_timesteps: int, num_steps: int) -> list:
        """[T−1, …, 0] evenly spaced (num_steps of them), then the −1 sentinel.

        The course's ``linspace(0, T−1, n).long()`` in exact integer arithmetic, ⌊k·(T−1)/(n−1)⌋:
        float32 linspace truncates some to the step below (T = 1000, n = 220: 332 for 333), which
        the course's code did at 21 step counts of 2…1000.
        """
        if not 1 <= num_steps <= num_timesteps:
            raise ValueError(
                f"DDIM num_steps={num_steps}: expected 1 … num_timesteps={num_timesteps} "
                f"(more steps than timesteps would repeat timesteps)")
        if num_steps == 1:  # linspace would give [0]: one step must start from pure noise
            return [num_timesteps - 1, -1]
        span = num_timesteps - 1
        return [(k * span) // (num_steps - 1) for k in range(num_steps - 1, -1, -1)] + [-1]

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        image_shape: Tuple[int, int, int],
        num_steps: Optional[int] = None,
        sampler: str = "ddpm",
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        x_T: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        """DDPM ancestral sampling (T steps) or DDIM (``sampler='ddim'``, ``num_steps``, ``eta``)."""
        device = self.device
        x = x_T if x_T is not None else torch.randn((batch_size, *image_shape), device=device, generator=generator)
        if sampler == "ddpm":
            for step in range(self.num_timesteps - 1, -1, -1):
                t = torch.full((batch_size,), step, device=device, dtype=torch.long)
                x = self.reverse_process(x, t, generator=generator)
            return x
        if sampler != "ddim":
            raise ValueError(f"DDPM.sample: unknown sampler {sampler!r} (ddpm | ddim)")
        if not 0.0 <= eta <= 1.0:  # above 1, σ² exceeds the noise budget 1 − ᾱ_prev of a step
            raise ValueError(f"DDIM eta={eta}: expected a number in [0, 1] (0: deterministic, 1: DDPM-like)")
        steps = self.ddim_timesteps(self.num_timesteps, num_steps or 100)
        for cur, prev in zip(steps[:-1], steps[1:]):
            t = torch.full((batch_size,), cur, device=device, dtype=torch.long)
            t_prev = torch.full((batch_size,), prev, device=device, dtype=torch.long)
            x = self.reverse_process_DDIM(x, t, t_prev, eta=eta, generator=generator)
        return x


class DDPMx0(DDPM):
    """The course's "DDPM v2": same schedule, the network predicts x0 directly."""

    prediction = "x0"

    def _target(self, x_0: Tensor, noise: Tensor) -> Tensor:
        return x_0

    def predict_x0_and_eps(self, x_t: Tensor, t: Tensor, clip: bool = True) -> Tuple[Tensor, Tensor]:
        x0 = self.model(x_t, t.float()).float()
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_1m = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        return x0, (x_t - sqrt_ab * x0) / sqrt_1m
