"""BaseMethod: the interface every generative method implements, and the method registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

Metrics = Dict[str, Tensor]


class BaseMethod(nn.Module, ABC):
    """A generative method around a network ``self.model``.

    ``compute_loss(x) -> (loss, metrics)``: metrics are detached 0-d tensors (no host sync in the
    hot path; the training loop converts them when it logs). ``forward`` is ``compute_loss`` so
    that the whole method can be wrapped by DDP or compiled as one step.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @abstractmethod
    def compute_loss(self, x: Tensor, **kwargs: Any) -> Tuple[Tensor, Metrics]:
        ...

    @abstractmethod
    @torch.no_grad()
    def sample(self, batch_size: int, image_shape: Tuple[int, int, int], **kwargs: Any) -> Tensor:
        ...

    def forward(self, x: Tensor, **kwargs: Any) -> Tuple[Tensor, Metrics]:
        return self.compute_loss(x, **kwargs)

    def train_mode(self) -> "BaseMethod":
        return self.train()

    def eval_mode(self) -> "BaseMethod":
        return self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def method_config(self) -> Dict[str, Any]:
        """Scalar hyperparameters, saved as the checkpoint's ``method_config``."""
        return {}


def _extract(a: Tensor, t: Tensor, x_shape: torch.Size) -> Tensor:
    """a[t] reshaped to (B, 1, 1, 1) for broadcasting over images."""
    return a.gather(0, t.long()).reshape(t.shape[0], *([1] * (len(x_shape) - 1)))
