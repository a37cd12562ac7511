"""DualTimeUNet: v_θ(s, t, x) for Flow Map Matching, from a UNet and a second time embedding."""

from __future__ import annotations

from typing import Optional, Tuple, Union

from torch import Tensor, nn

from fastflow.models import dual as D
from fastflow.models.blocks import TimestepEmbedding
from fastflow.models.unet import UNet


class DualTimeUNet(nn.Module):
    """emb = unet.time_embedding(t·T) + time_s_embedding(s·T);  v = unet(x, t, time_emb=emb).

    s, t ∈ [0, 1] are scaled by ``num_timesteps`` (the sinusoidal embedding is tuned for values
    in the hundreds). No overrides of parameters()/state_dict(): submodules handle them.

    ``forward(x, s, t)`` returns v. With ``t_dot`` (and/or ``s_dot``, ``x_dot``) it returns
    ``(v, v̇)``, the derivative along those directions; ``t_dot = 1`` gives ∂_t v_θ(s, t, x).
    """

    def __init__(self, unet: UNet, num_timesteps: int = 1000):
        super().__init__()
        self.unet = unet
        self.num_timesteps = num_timesteps
        self.time_s_embedding = TimestepEmbedding(unet.base_channels, unet.time_embed_dim)

    def forward(
        self,
        x: Tensor,
        s: Tensor,
        t: Tensor,
        *,
        x_dot: Optional[Tensor] = None,
        s_dot: Optional[Tensor] = None,
        t_dot: Optional[Tensor] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        scale = float(self.num_timesteps)
        if s.dim() == 0:
            s = s.expand(x.shape[0])
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb_t, emb_t_dot = self.unet.time_embedding(t * scale, None if t_dot is None else t_dot * scale)
        emb_s, emb_s_dot = self.time_s_embedding(s * scale, None if s_dot is None else s_dot * scale)
        emb, emb_dot = D.add(emb_t, emb_t_dot, emb_s, emb_s_dot)
        tangent_mode = x_dot is not None or s_dot is not None or t_dot is not None
        if not tangent_mode:
            return self.unet(x, None, time_emb=emb)
        return self.unet(x, None, time_emb=emb, x_dot=x_dot, time_emb_dot=emb_dot)
