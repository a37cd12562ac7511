"""Exponential moving average of a model's parameters (course semantics, foreach-fused update)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn


class EMA:
    """θ_ema ← d·θ_ema + (1 − d)·θ, with d = min(decay, (1 + n)/(10 + n)) while n < warmup_steps.

    ``n`` counts updates. Shadows are float32 copies of the trainable parameters (kept on the
    parameters' device). ``apply_shadow()`` swaps them into the model for sampling and
    ``restore()`` swaps the training weights back. Works on DTensor (FSDP2) parameters too: the
    shadow is a DTensor of the same placement (its local shard), ``_foreach_lerp_`` runs shard-wise
    with no communication, and ``load_state_dict`` takes full or sharded shadows.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 0):
        self.model = model
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.step = 0
        self.names: List[str] = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow: Dict[str, Tensor] = {
            n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad
        }
        self._backup: Optional[Dict[str, Tensor]] = None

    def _params(self) -> List[Tensor]:
        params = dict(self.model.named_parameters())
        return [params[n] for n in self.names]

    def get_decay(self) -> float:
        if self.step < self.warmup_steps:
            return min(self.decay, (1.0 + self.step) / (10.0 + self.step))
        return self.decay

    @torch.no_grad()
    def update(self) -> None:
        decay = self.get_decay()
        params = [p.detach().float() if p.dtype != torch.float32 else p.detach() for p in self._params()]
        shadows = [self.shadow[n] for n in self.names]
        # θ_ema ← θ_ema + (1 − d)·(θ − θ_ema)
        torch._foreach_lerp_(shadows, params, 1.0 - decay)
        self.step += 1

    @torch.no_grad()
    def apply_shadow(self) -> None:
        if self._backup is not None:
            raise RuntimeError("EMA.apply_shadow called twice without restore()")
        self._backup = {}
        for n, p in zip(self.names, self._params()):
            self._backup[n] = p.detach().clone()
            p.copy_(self.shadow[n].to(p.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        if self._backup is None:
            raise RuntimeError("EMA.restore called without apply_shadow()")
        for n, p in zip(self.names, self._params()):
            p.copy_(self._backup[n])
        self._backup = None

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "warmup_steps": self.warmup_steps, "step": self.step,
                "shadow": {n: t for n, t in self.shadow.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Load shadows (full tensors, or DTensors of any placement) and the update count. The
        shadows must name exactly this model's trainable parameters, each of its (global) shape:
        else ``KeyError`` / ``ValueError`` naming them, and nothing is changed. Broadcasting a
        wrong-shaped shadow into place would give a silently wrong average."""
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict) or "step" not in state:
            raise KeyError(f"EMA state needs 'shadow' (a dict) and 'step', got keys "
                           f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
        missing = sorted(set(self.names) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.names))
        if missing or unexpected:
            raise KeyError(f"EMA state does not fit this model: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                           f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        wrong = [f"{n}: {tuple(shadow[n].shape)} vs {tuple(self.shadow[n].shape)}" for n in self.names
                 if tuple(shadow[n].shape) != tuple(self.shadow[n].shape)]  # DTensor .shape is global
        if wrong:
            raise ValueError(f"EMA shadows of other shapes than this model's parameters "
                             f"(saved vs now): {'; '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")
        with torch.no_grad():
            for n in self.names:
                self.shadow[n].copy_(_like(shadow[n], self.shadow[n]))
        self.step = int(state["step"])


def _like(source: Tensor, target: Tensor) -> Tensor:
    """``source`` in ``target``'s layout: a full tensor is cut to the local shard of a DTensor
    target (each rank holds the full tensor, so no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor) and not isinstance(source, DTensor):
        return distribute_tensor(source.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
    return source
