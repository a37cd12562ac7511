"""UNet building blocks (course names kept), each written once for plain and dual forwards.

Every block's ``forward`` takes primals and optional tangents and returns ``(output, tangent)``;
with all tangents None the tangent output is None and the computation is the plain forward.
GroupNorm(+FiLM)+SiLU and attention go through :mod:`fastflow.ops`, which picks the reference
or the fused kernels (``fused_kernels``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn

from fastflow import ops
from fastflow.models import dual as D
from fastflow.ops.reference import is_channels_last

Dual = Tuple[Tensor, Optional[Tensor]]


class SinusoidalPositionalEmbedding(nn.Module):
    """emb(t) = [sin(t·f_k), cos(t·f_k)], f_k = exp(−log(10000)·k/(dim/2)), k < dim/2.

    Tangent: d emb/dt = [f_k·cos(t·f_k), −f_k·sin(t·f_k)]·ṫ (analytic).
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"SinusoidalPositionalEmbedding: dim must be even, got {dim}")
        self.dim = dim
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor, t_dot: Optional[Tensor] = None) -> Dual:
        args = t.float()[:, None] * self.freqs[None, :]
        sin, cos = torch.sin(args), torch.cos(args)
        emb = torch.cat([sin, cos], dim=-1)
        if t_dot is None:
            return emb, None
        scaled = t_dot.float()[:, None] * self.freqs[None, :]
        return emb, torch.cat([cos * scaled, -sin * scaled], dim=-1)


class TimestepEmbedding(nn.Module):
    """t → sinusoidal(dim) → Linear(dim, time_embed_dim) → SiLU → Linear(time_embed_dim, time_embed_dim)."""

    def __init__(self, dim: int, time_embed_dim: int):
        super().__init__()
        self.sinusoidal = SinusoidalPositionalEmbedding(dim)
        self.linear1 = nn.Linear(dim, time_embed_dim)
        self.linear2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, t: Tensor, t_dot: Optional[Tensor] = None) -> Dual:
        h, h_dot = self.sinusoidal(t, t_dot)
        h, h_dot = D.linear(self.linear1, h, h_dot)
        h, h_dot = D.silu(h, h_dot)
        return D.linear(self.linear2, h, h_dot)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with statistics in float32, output in the input dtype (via fastflow.ops)."""

    fused_kernels: bool = False

    def forward(self, x: Tensor) -> Tensor:  # plain use, e.g. by external code
        return ops.gn_film_silu(
            x, self.weight, self.bias, groups=self.num_groups, eps=self.eps, silu=False, fused=self.fused_kernels
        )

    def norm_film_silu(
        self,
        x: Tensor,
        x_dot: Optional[Tensor],
        scale: Optional[Tensor] = None,
        scale_dot: Optional[Tensor] = None,
        shift: Optional[Tensor] = None,
        shift_dot: Optional[Tensor] = None,
        silu: bool = True,
    ) -> Dual:
        """act((GN(x)·γ + β)·(1 + scale) + shift) and its tangent, one fused op."""
        return ops.gn_film_silu_dual(
            x, x_dot, self.weight, self.bias, scale, scale_dot, shift, shift_dot,
            groups=self.num_groups, eps=self.eps, silu=silu, fused=self.fused_kernels,
        )


class ResBlock(nn.Module):
    """GN → SiLU → conv3×3 → [+time: FiLM GN(h)·(1+scale)+shift | GN(h + proj)] → SiLU → Dropout → conv3×3, + skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_embed_dim: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        num_groups: int = 32,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNorm32(_groups(num_groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_embed_dim, out_channels * (2 if use_scale_shift_norm else 1))
        self.norm2 = GroupNorm32(_groups(num_groups, out_channels), out_channels)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(
        self, x: Tensor, emb: Tensor, x_dot: Optional[Tensor] = None, emb_dot: Optional[Tensor] = None
    ) -> Dual:
        h, h_dot = self.norm1.norm_film_silu(x, x_dot)
        h, h_dot = D.conv2d(self.conv1, h, h_dot)
        e, e_dot = D.linear(self.time_proj, emb, emb_dot)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            scale_dot, shift_dot = e_dot.chunk(2, dim=1) if e_dot is not None else (None, None)
            h, h_dot = self.norm2.norm_film_silu(h, h_dot, scale, scale_dot, shift, shift_dot)
        else:
            h, h_dot = D.add(h, h_dot, e[:, :, None, None], None if e_dot is None else e_dot[:, :, None, None])
            h, h_dot = self.norm2.norm_film_silu(h, h_dot)
        h, h_dot = D.dropout(h, h_dot, self.dropout, self.training)
        h, h_dot = D.conv2d(self.conv2, h, h_dot)
        skip, skip_dot = (x, x_dot) if self.skip is None else D.conv2d(self.skip, x, x_dot)
        return D.add(skip, skip_dot, h, h_dot)


class AttentionBlock(nn.Module):
    """x + proj(attention(qkv(GN(x)))) over the H·W positions, ``num_heads`` heads."""

    def __init__(self, channels: int, num_heads: int = 4, num_groups: int = 32):
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"AttentionBlock: channels={channels} not divisible by num_heads={num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.norm = GroupNorm32(_groups(num_groups, channels), channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.fused_kernels = False

    def _split(self, qkv: Optional[Tensor]):
        if qkv is None:
            return None, None, None
        return rearrange(qkv, "b (three h d) x y -> three b h (x y) d", three=3, h=self.num_heads).unbind(0)

    def forward(
        self, x: Tensor, emb: Optional[Tensor] = None, x_dot: Optional[Tensor] = None, emb_dot: Optional[Tensor] = None
    ) -> Dual:
        height, width = x.shape[-2:]
        h, h_dot = self.norm.norm_film_silu(x, x_dot, silu=False)
        qkv, qkv_dot = D.conv2d(self.qkv, h, h_dot)
        q, k, v = self._split(qkv)
        q_dot, k_dot, v_dot = self._split(qkv_dot)
        o, o_dot = ops.attention_dual(q, q_dot, k, k_dot, v, v_dot, fused=self.fused_kernels)
        if is_channels_last(x):  # heads back into channels in x's layout (one copy either way)
            merge = lambda t: rearrange(t, "b h (x y) d -> b x y (h d)", x=height, y=width).permute(0, 3, 1, 2)  # noqa: E731
        else:
            merge = lambda t: rearrange(t, "b h (x y) d -> b (h d) x y", x=height, y=width)  # noqa: E731
        o, o_dot = D.conv2d(self.proj, merge(o), None if o_dot is None else merge(o_dot))
        return D.add(x, x_dot, o, o_dot)


class Downsample(nn.Module):
    """Stride-2 3×3 convolution (halves H and W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb=None, x_dot: Optional[Tensor] = None, emb_dot=None) -> Dual:
        return D.conv2d(self.conv, x, x_dot)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb=None, x_dot: Optional[Tensor] = None, emb_dot=None) -> Dual:
        h, h_dot = D.upsample_nearest2x(x, x_dot)
        return D.conv2d(self.conv, h, h_dot)


def _groups(num_groups: int, channels: int) -> int:
    """The configured group count, reduced to a divisor of ``channels`` for narrow layers."""
    groups = min(num_groups, channels)
    while channels % groups != 0:
        groups -= 1
    return groups
