"""The course UNet (ADM-style), with one code path for the plain and the dual (tangent) forward."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from fastflow.models import dual as D
from fastflow.models.blocks import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedding,
    Upsample,
    _groups,
)

Dual = Tuple[Tensor, Optional[Tensor]]


class ResAttnBlock(nn.Module):
    """A ResBlock optionally followed by an AttentionBlock: the unit that pushes/pops one skip."""

    def __init__(self, res: ResBlock, attn: Optional[AttentionBlock] = None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor, x_dot: Optional[Tensor] = None, emb_dot: Optional[Tensor] = None) -> Dual:
        h, h_dot = self.res(x, emb, x_dot, emb_dot)
        if self.attn is not None:
            h, h_dot = self.attn(h, None, h_dot, None)
        return h, h_dot


class UNet(nn.Module):
    """UNet with ``len(channel_mult)`` levels of ``num_res_blocks`` ResBlocks each.

    Every encoder ResBlock (with its attention, at resolutions in ``attention_resolutions``)
    pushes a skip; every decoder ResBlock (``num_res_blocks`` per level) pops one and
    concatenates it. Middle: ResBlock → Attention → ResBlock. Head: GN → SiLU → conv3×3.

    ``forward(x, t, time_emb=None)`` returns the output. Passing tangents (``x_dot``, ``t_dot`` or
    ``time_emb_dot``) returns ``(output, tangent)``: the directional derivative along them,
    computed by the same code (explicit forward mode).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: Optional[int] = None,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        num_heads: int = 4,
        dropout: float = 0.1,
        use_scale_shift_norm: bool = True,
        image_size: int = 64,
        num_groups: int = 32,
        fused_kernels: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.image_size = image_size
        self.base_channels = base_channels
        time_embed_dim = base_channels * 4
        self.time_embed_dim = time_embed_dim
        self.time_embedding = TimestepEmbedding(base_channels, time_embed_dim)
        self.input_conv = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, time_embed_dim, dropout, use_scale_shift_norm, num_groups)

        def maybe_attn(ch: int, resolution: int) -> Optional[AttentionBlock]:
            return AttentionBlock(ch, num_heads, num_groups) if resolution in attention_resolutions else None

        self.down_blocks = nn.ModuleList()
        skip_channels: List[int] = []
        ch, resolution = base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down_blocks.append(ResAttnBlock(res(ch, base_channels * mult), maybe_attn(base_channels * mult, resolution)))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down_blocks.append(Downsample(ch))
                resolution //= 2

        self.middle_blocks = nn.ModuleList([res(ch, ch), AttentionBlock(ch, num_heads, num_groups), res(ch, ch)])

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks):
                cin = ch + skip_channels.pop()
                self.up_blocks.append(ResAttnBlock(res(cin, base_channels * mult), maybe_attn(base_channels * mult, resolution)))
                ch = base_channels * mult
            if level != 0:
                self.up_blocks.append(Upsample(ch))
                resolution *= 2

        self.out_norm = GroupNorm32(_groups(num_groups, ch), ch)
        self.out_conv = nn.Conv2d(ch, out_channels, 3, padding=1)
        self.set_fused_kernels(fused_kernels)

    def set_fused_kernels(self, enabled: bool) -> None:
        """Route every GroupNorm/attention of this model through fused kernels (or the reference)."""
        self.fused_kernels = enabled
        for module in self.modules():
            if isinstance(module, (GroupNorm32, AttentionBlock)):
                module.fused_kernels = enabled

    def forward(
        self,
        x: Tensor,
        t: Optional[Tensor],
        time_emb: Optional[Tensor] = None,
        *,
        x_dot: Optional[Tensor] = None,
        t_dot: Optional[Tensor] = None,
        time_emb_dot: Optional[Tensor] = None,
    ) -> Union[Tensor, Dual]:
        tangent_mode = x_dot is not None or t_dot is not None or time_emb_dot is not None
        if time_emb is None:
            if t is None:
                raise ValueError("UNet.forward: give t or time_emb")
            if t.dim() == 0:
                t = t.expand(x.shape[0])
            emb, emb_dot = self.time_embedding(t, t_dot)
        else:
            emb, emb_dot = time_emb, time_emb_dot
        out, out_dot = self._forward_dual(x, x_dot, emb, emb_dot)
        if tangent_mode:
            if out_dot is None:  # nothing depended on the tangent directions
                out_dot = torch.zeros_like(out)
            return out, out_dot
        return out

    def _forward_dual(self, x: Tensor, x_dot: Optional[Tensor], emb: Tensor, emb_dot: Optional[Tensor]) -> Dual:
        h, h_dot = D.conv2d(self.input_conv, x, x_dot)
        skips: List[Dual] = []
        for block in self.down_blocks:
            h, h_dot = block(h, emb, h_dot, emb_dot)
            if isinstance(block, ResAttnBlock):
                skips.append((h, h_dot))
        for block in self.middle_blocks:
            h, h_dot = block(h, emb, h_dot, emb_dot)
        for block in self.up_blocks:
            if isinstance(block, ResAttnBlock):
                h, h_dot = D.cat([(h, h_dot), skips.pop()], dim=1)
            h, h_dot = block(h, emb, h_dot, emb_dot)
        h, h_dot = self.out_norm.norm_film_silu(h, h_dot, silu=True)
        return D.conv2d(self.out_conv, h, h_dot)


def create_model_from_config(config: Any) -> UNet:
    """Build the UNet from ``config.model`` and ``config.data`` (a :class:`fastflow.config.Config`)."""
    m, d = config.model, config.data
    return UNet(
        in_channels=d.channels,
        out_channels=d.channels,
        base_channels=m.base_channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        dropout=m.dropout,
        use_scale_shift_norm=m.use_scale_shift_norm,
        image_size=d.image_size,
        num_groups=m.num_groups,
        fused_kernels=m.fused_kernels,
    )
