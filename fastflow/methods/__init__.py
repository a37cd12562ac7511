"""Generative methods and their registry (keyed by the config / CLI names)."""

from __future__ import annotations

from typing import Any, Dict, Type

from torch import nn

from fastflow.methods.base import BaseMethod
from fastflow.methods.ddpm import DDPM, DDPMx0
from fastflow.methods.flow_map_matching import FlowMapMatching
from fastflow.methods.flow_matching import FlowMatching
from fastflow.methods.time_derivative import BACKENDS, velocity_and_time_derivative

# Config names (``method:``) and the course's CLI names (sample.py --method).
METHODS: Dict[str, Type[BaseMethod]] = {
    "ddpm": DDPM,
    "ddpm_x0": DDPMx0,
    "flow_matching": FlowMatching,
    "flow_map_matching": FlowMapMatching,
}
CLI_NAMES: Dict[str, str] = {
    "DDPM": "ddpm",
    "DDIM": "ddpm",
    "DDPM_x0": "ddpm_x0",
    "DDIM_x0": "ddpm_x0",
    "FlowMatching": "flow_matching",
    "FlowMapMatching": "flow_map_matching",
}


def build_network(config: Any) -> nn.Module:
    """The network a config's method trains: a UNet, wrapped in a DualTimeUNet for FMM."""
    from fastflow.models import DualTimeUNet, create_model_from_config

    unet = create_model_from_config(config)
    if config.method == "flow_map_matching":
        return DualTimeUNet(unet, config.flow_map_matching.num_timesteps)
    return unet


def create_method_from_config(config: Any, model: nn.Module = None) -> BaseMethod:
    """Build the method named by ``config.method`` around ``model`` (built from the config if None)."""
    if config.method not in METHODS:
        raise ValueError(f"unknown method {config.method!r}; expected one of {', '.join(METHODS)}")
    if model is None:
        model = build_network(config)
    return METHODS[config.method].from_config(model, config)


__all__ = [
    "BACKENDS",
    "BaseMethod",
    "CLI_NAMES",
    "DDPM",
    "DDPMx0",
    "FlowMapMatching",
    "FlowMatching",
    "METHODS",
    "build_network",
    "create_method_from_config",
    "velocity_and_time_derivative",
]
