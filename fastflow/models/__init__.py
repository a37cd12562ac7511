"""Pure nn.Modules: blocks, UNet, DualTimeUNet (no FSDP/compile inside; see fastflow.train.parallelize)."""

from fastflow.models.blocks import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    SinusoidalPositionalEmbedding,
    TimestepEmbedding,
    Upsample,
)
from fastflow.models.dual_time_unet import DualTimeUNet
from fastflow.models.unet import ResAttnBlock, UNet, create_model_from_config

__all__ = [
    "AttentionBlock",
    "Downsample",
    "DualTimeUNet",
    "GroupNorm32",
    "ResAttnBlock",
    "ResBlock",
    "SinusoidalPositionalEmbedding",
    "TimestepEmbedding",
    "UNet",
    "Upsample",
    "create_model_from_config",
]
