"""UNet / DualTimeUNet / blocks: shapes, parameter counts, skip structure, embeddings, dual forwards.

Parameter counts and structure of the default (64×64, 65M-parameter) model are checked on the
meta device (no memory, no compute). Inputs are fresh random tensors (seed drawn at random,
printed on failure, replayable with FASTFLOW_TEST_SEED=<n>). Dual-vs-jvp checks run in float64.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow import ops
from fastflow.config import Config, load_config
from fastflow.models import (
    AttentionBlock,
    Downsample,
    DualTimeUNet,
    GroupNorm32,
    ResAttnBlock,
    ResBlock,
    SinusoidalPositionalEmbedding,
    TimestepEmbedding,
    UNet,
    Upsample,
    create_model_from_config,
)

DEFAULT_UNET_PARAMS = 64_784_643  # measured by the lead; re-derived below from the course's table


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def default_unet_meta() -> UNet:
    with torch.device("meta"):
        return create_model_from_config(Config())


# ------------------------------------------------------------------------------ shapes
SHAPE_CONFIGS = [
    # image, channels, channel_mult, attention_resolutions, use_scale_shift_norm, dropout, num_res_blocks
    (8, 1, (1, 2), (4,), True, 0.0, 1),
    (16, 3, (1, 2, 2), (8, 4), False, 0.1, 1),
    (32, 3, (1, 2), (), True, 0.1, 2),
    (32, 1, (1, 2, 2), (16,), False, 0.0, 1),
    (16, 3, (1, 2), (16, 8), True, 0.0, 2),
]


@pytest.mark.parametrize("image,channels,mult,attn,scale_shift,dropout,res_blocks", SHAPE_CONFIGS)
def test_unet_output_shape(image, channels, mult, attn, scale_shift, dropout, res_blocks, seed: int) -> None:
    model = UNet(in_channels=channels, base_channels=16, channel_mult=mult, num_res_blocks=res_blocks,
                 attention_resolutions=attn, num_heads=2, dropout=dropout, use_scale_shift_norm=scale_shift,
                 image_size=image, num_groups=8)
    # attention blocks: one per ResBlock at an attended resolution (down and up), plus the middle one
    resolutions = [image // 2**level for level in range(len(mult))]
    expected_attn = 2 * res_blocks * sum(r in attn for r in resolutions) + 1
    assert sum(isinstance(m, AttentionBlock) for m in model.modules()) == expected_attn
    x = torch.randn(2, channels, image, image)
    t = torch.rand(2) * 999
    model.train()
    out = model(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all(), f"seed {seed}"
    assert model(x, torch.tensor(17.0)).shape == x.shape  # a 0-d time is broadcast
    model.eval()
    with torch.no_grad():
        a, b = model(x, t), model(x, t)
    assert torch.equal(a, b), "eval mode must be deterministic"
    if dropout > 0:
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(x, t), model(x, t)), "dropout had no effect in train mode"


def test_unet_out_channels_may_differ() -> None:
    model = UNet(in_channels=3, out_channels=6, base_channels=16, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions=(), num_groups=8, image_size=8)
    assert model(torch.randn(1, 3, 8, 8), torch.zeros(1)).shape == (1, 6, 8, 8)


# ------------------------------------------------------------------------------ parameter counts
# The course's architecture table for the default config (channel_mult=[1,2,2,4], base 128,
# num_res_blocks=2, attention at 16 and 8, image 64): (in, out, attention) per ResBlock.
COURSE_DOWN = [(128, 128, False), (128, 128, False), (128, 256, False), (256, 256, False),
               (256, 256, True), (256, 256, True), (256, 512, True), (512, 512, True)]
COURSE_MIDDLE = [(512, 512, False), (512, 512, False)]  # + AttentionBlock(512) between them
COURSE_UP = [(512 + 512, 512, True), (512 + 512, 512, True), (512 + 256, 256, True), (256 + 256, 256, True),
             (256 + 256, 256, False), (256 + 256, 256, False), (256 + 128, 128, False), (128 + 128, 128, False)]
COURSE_DOWNSAMPLE = [128, 256, 256]
COURSE_UPSAMPLE = [512, 256, 256]


def _resblock_params(cin: int, cout: int, emb: int, scale_shift: bool = True) -> int:
    return (2 * cin  # GroupNorm γ, β
            + 9 * cin * cout + cout  # conv1 3×3
            + emb * cout * (2 if scale_shift else 1) + cout * (2 if scale_shift else 1)  # time projection
            + 2 * cout  # GroupNorm
            + 9 * cout * cout + cout  # conv2 3×3
            + (cin * cout + cout if cin != cout else 0))  # 1×1 skip


def _attention_params(c: int) -> int:
    return 2 * c + (3 * c * c + 3 * c) + (c * c + c)


def _timestep_embedding_params(dim: int, emb: int) -> int:
    return dim * emb + emb + emb * emb + emb


def course_default_unet_params(in_channels: int = 3) -> int:
    base, emb = 128, 512
    total = _timestep_embedding_params(base, emb)
    total += 9 * in_channels * base + base  # input conv
    for cin, cout, attn in COURSE_DOWN + COURSE_UP:
        total += _resblock_params(cin, cout, emb) + (_attention_params(cout) if attn else 0)
    total += sum(_resblock_params(cin, cout, emb) for cin, cout, _ in COURSE_MIDDLE) + _attention_params(512)
    total += sum(9 * c * c + c for c in COURSE_DOWNSAMPLE + COURSE_UPSAMPLE)
    total += 2 * base + 9 * base * in_channels + in_channels  # head: GroupNorm + conv
    return total


def test_default_unet_parameter_count() -> None:
    assert course_default_unet_params() == DEFAULT_UNET_PARAMS
    assert n_params(default_unet_meta()) == DEFAULT_UNET_PARAMS


def test_default_dual_time_unet_parameter_count() -> None:
    with torch.device("meta"):
        model = DualTimeUNet(create_model_from_config(Config()), 1000)
    expected = DEFAULT_UNET_PARAMS + _timestep_embedding_params(128, 512)
    assert expected == 65_113_347
    assert n_params(model) == expected


def test_shipped_config_parameter_count_matches_formula() -> None:
    """configs/fmm_digits.yaml, if present: the generic per-block formula agrees with the model."""
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "fmm_digits.yaml")
    if not os.path.isfile(path):
        pytest.skip("configs/fmm_digits.yaml not present")
    cfg = load_config(path)
    with torch.device("meta"):
        unet = create_model_from_config(cfg)
    emb = cfg.model.base_channels * 4
    total = sum(p.numel() for m in unet.modules() if isinstance(m, (Downsample, Upsample)) for p in m.parameters())
    for m in unet.modules():
        if isinstance(m, ResBlock):
            total += _resblock_params(m.in_channels, m.out_channels, emb, cfg.model.use_scale_shift_norm)
        elif isinstance(m, AttentionBlock):
            total += _attention_params(m.channels)
    base, c = cfg.model.base_channels, cfg.data.channels
    total += _timestep_embedding_params(base, emb) + 9 * c * base + base + 2 * base + 9 * base * c + c
    assert n_params(unet) == total


# ------------------------------------------------------------------------------ skip structure
def _res_blocks(blocks: nn.ModuleList) -> List[ResAttnBlock]:
    return [b for b in blocks if isinstance(b, ResAttnBlock)]


def test_default_unet_matches_the_course_table() -> None:
    model = default_unet_meta()
    cfg = Config().model
    down, up = _res_blocks(model.down_blocks), _res_blocks(model.up_blocks)
    assert len(down) == len(cfg.channel_mult) * cfg.num_res_blocks == 8
    assert len(up) == 8
    assert [(b.res.in_channels, b.res.out_channels, b.attn is not None) for b in down] == COURSE_DOWN
    assert [(b.res.in_channels, b.res.out_channels, b.attn is not None) for b in up] == COURSE_UP
    assert (up[0].res.in_channels, up[0].res.out_channels) == (512 + 512, 512)  # level-3 up, first ResBlock
    assert (up[6].res.in_channels, up[6].res.out_channels) == (256 + 128, 128)  # level-0 up, first ResBlock
    middle = model.middle_blocks
    assert [type(m) for m in middle] == [ResBlock, AttentionBlock, ResBlock]
    assert [m.conv.in_channels for m in model.down_blocks if isinstance(m, Downsample)] == COURSE_DOWNSAMPLE
    assert [m.conv.in_channels for m in model.up_blocks if isinstance(m, Upsample)] == COURSE_UPSAMPLE
    assert model.input_conv.in_channels == 3 and model.input_conv.out_channels == 128
    assert model.out_conv.in_channels == 128 and model.out_conv.out_channels == 3


@pytest.mark.parametrize("mult,res_blocks", [((1, 2, 2), 3), ((1, 2), 1), ((2, 1, 3), 2)])
def test_decoder_in_channels_are_ch_plus_popped_skip(mult: Tuple[int, ...], res_blocks: int) -> None:
    """Every encoder ResBlock pushes its output width; every decoder ResBlock pops one: in = ch + skip."""
    base = 8
    with torch.device("meta"):
        model = UNet(in_channels=1, base_channels=base, channel_mult=mult, num_res_blocks=res_blocks,
                     attention_resolutions=(), num_groups=4, image_size=16)
    down, up = _res_blocks(model.down_blocks), _res_blocks(model.up_blocks)
    assert len(down) == len(up) == len(mult) * res_blocks
    skips = [b.res.out_channels for b in down]
    assert skips == [base * m for m in mult for _ in range(res_blocks)]
    ch = down[-1].res.out_channels
    for block, out_ch in zip(up, [base * m for m in reversed(mult) for _ in range(res_blocks)]):
        assert block.res.in_channels == ch + skips.pop()
        assert block.res.out_channels == out_ch
        ch = out_ch
    assert not skips


# ------------------------------------------------------------------------------ time embeddings
@pytest.mark.parametrize("dim", [8, 32, 128])
def test_sinusoidal_embedding_matches_the_course_formula(dim: int, seed: int) -> None:
    """freqs_k = exp(−log(10000)·k/(dim/2)), emb = [sin(t·freqs), cos(t·freqs)] (not interleaved)."""
    module = SinusoidalPositionalEmbedding(dim)
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    np.testing.assert_allclose(module.freqs.double().numpy(), freqs, rtol=2e-6)
    t = torch.cat([torch.tensor([0.0, 1.0, 999.0]), torch.rand(5) * 1000])
    emb, tangent = module(t)
    assert tangent is None and emb.shape == (8, dim) and emb.dtype == torch.float32
    args = t.double().numpy()[:, None] * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    # float32: freqs carry ≈ 6e-7 relative error (exp of a rounded argument), times |t| ≤ 1000
    np.testing.assert_allclose(emb.double().numpy(), expected, rtol=0, atol=2e-3, err_msg=f"seed {seed}")
    # with the module's own float32 frequencies the only error is the float32 product and sin/cos
    own = t.double().numpy()[:, None] * module.freqs.double().numpy()[None, :]
    np.testing.assert_allclose(emb.double().numpy(), np.concatenate([np.sin(own), np.cos(own)], axis=1),
                               rtol=0, atol=1e-4, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(emb[0].numpy(), np.r_[np.zeros(half), np.ones(half)])
    with pytest.raises(ValueError):
        SinusoidalPositionalEmbedding(dim + 1)


def test_sinusoidal_tangent_matches_jvp(seed: int) -> None:
    module = SinusoidalPositionalEmbedding(64)
    t, t_dot = torch.rand(6) * 1000, torch.randn(6)
    _, analytic = module(t, t_dot)
    _, jvp = torch.func.jvp(lambda tt: module(tt)[0], (t,), (t_dot,))
    torch.testing.assert_close(analytic, jvp, msg=lambda m: f"seed {seed}: {m}")


def test_timestep_embedding_dims(seed: int) -> None:
    for base in (16, 128):
        with torch.device("meta"):
            model = UNet(base_channels=base, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(),
                         num_groups=8, image_size=8)
        assert model.time_embed_dim == 4 * base
        emb = model.time_embedding
        assert (emb.linear1.in_features, emb.linear1.out_features) == (base, 4 * base)
        assert (emb.linear2.in_features, emb.linear2.out_features) == (4 * base, 4 * base)
        assert emb.sinusoidal.dim == base
    module = TimestepEmbedding(16, 64)
    out, tangent = module(torch.rand(3) * 1000)
    assert out.shape == (3, 64) and tangent is None
    t = torch.rand(3) * 1000
    h = F.silu(module.linear1(module.sinusoidal(t)[0]))
    torch.testing.assert_close(module(t)[0], module.linear2(h), msg=lambda m: f"seed {seed}: {m}")


# ------------------------------------------------------------------------------ DualTimeUNet
def tiny_unet(**kwargs) -> UNet:
    config = dict(in_channels=2, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                  num_heads=2, dropout=0.0, num_groups=8, image_size=8)
    config.update(kwargs)
    return UNet(**config)


def test_dual_time_unet_scales_s_and_t_by_num_timesteps(seed: int) -> None:
    num_timesteps = 250
    model = DualTimeUNet(tiny_unet(), num_timesteps).eval()
    x, s, t = torch.randn(3, 2, 8, 8), torch.rand(3), torch.rand(3)
    with torch.no_grad():
        out = model(x, s, t)

        def manual(scale: float) -> Tensor:
            emb = model.unet.time_embedding(t * scale)[0] + model.time_s_embedding(s * scale)[0]
            return model.unet(x, None, time_emb=emb)

        torch.testing.assert_close(out, manual(num_timesteps), rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")
        assert not torch.allclose(out, manual(1000.0), atol=1e-4)
        # the embeddings are added: swapping s and t changes the output (two different MLPs)
        assert not torch.allclose(out, model(x, t, s), atol=1e-5)
        # 0-d times broadcast
        torch.testing.assert_close(model(x, s[0], t[0]), model(x, s[:1].expand(3), t[:1].expand(3)))


def test_dual_time_unet_has_no_parameter_or_state_dict_overrides() -> None:
    for name in ("parameters", "named_parameters", "state_dict", "load_state_dict", "buffers", "named_buffers"):
        assert getattr(DualTimeUNet, name) is getattr(nn.Module, name), f"DualTimeUNet overrides {name}()"
    unet = tiny_unet()
    model = DualTimeUNet(unet, 1000)
    keys = set(model.state_dict())
    expected = {f"unet.{k}" for k in unet.state_dict()}
    expected |= {f"time_s_embedding.{k}" for k in model.time_s_embedding.state_dict()}
    assert keys == expected
    assert n_params(model) == n_params(unet) + n_params(model.time_s_embedding)
    clone = DualTimeUNet(tiny_unet(), 1000)
    clone.load_state_dict(model.state_dict())
    x, s, t = torch.randn(2, 2, 8, 8), torch.rand(2), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(clone(x, s, t), model(x, s, t))


# ------------------------------------------------------------------------------ GroupNorm32
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_norm32_float32_statistics_for_half_inputs(dtype: torch.dtype, seed: int) -> None:
    """Output = float32 GroupNorm of the input, cast back to the input dtype (offset 100: the mean eats the
    half-precision mantissa, so statistics in the half type would be visibly off)."""
    norm = GroupNorm32(4, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
        norm.bias.copy_(torch.randn(16))
    x = (100.0 + torch.randn(3, 16, 5, 5)).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    ref = F.group_norm(x.float(), 4, norm.weight, norm.bias, norm.eps)
    # one rounding to the half type apart
    ulp = 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    err = (out.float() - ref).abs()
    assert (err <= ulp * ref.abs() + 1e-4).all(), f"seed {seed}: max error {err.max().item()}"


def test_group_norm32_float64_stays_float64(seed: int) -> None:
    norm = GroupNorm32(2, 6).double()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    out = norm(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.group_norm(x, 2, norm.weight, norm.bias, norm.eps), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ fused-kernel flag
def test_set_fused_kernels_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_unet()
    flagged = [m for m in model.modules() if isinstance(m, (GroupNorm32, AttentionBlock))]
    assert len(flagged) > 3 and not any(m.fused_kernels for m in flagged) and not model.fused_kernels
    model.set_fused_kernels(True)
    assert model.fused_kernels and all(m.fused_kernels for m in flagged)
    # the forward really asks fastflow.ops for the fused implementation (served here by the reference)
    calls: List[Tuple[str, bool]] = []

    def recording_impl(op: str, fused: bool, device: torch.device, dtype: torch.dtype):
        calls.append((op, fused))
        return ops._REFERENCE[op]

    monkeypatch.setattr(ops, "_impl", recording_impl)
    with torch.no_grad():
        model(torch.randn(1, 2, 8, 8), torch.rand(1))
    n_norms = sum(isinstance(m, GroupNorm32) for m in model.modules())
    n_attn = sum(isinstance(m, AttentionBlock) for m in model.modules())
    assert sorted(set(calls)) == [("attention", True), ("gn_film_silu", True)]
    assert len(calls) == n_norms + n_attn
    model.set_fused_kernels(False)
    assert not model.fused_kernels and not any(m.fused_kernels for m in flagged)
    assert all(m.fused_kernels for m in tiny_unet(fused_kernels=True).modules()
               if isinstance(m, (GroupNorm32, AttentionBlock)))
    cfg = Config()
    cfg.model.fused_kernels = True
    with torch.device("meta"):
        assert create_model_from_config(cfg).fused_kernels


# ------------------------------------------------------------------------------ dual forwards
def test_blocks_return_none_tangent_without_tangents(seed: int) -> None:
    x, emb = torch.randn(2, 16, 4, 4), torch.randn(2, 32)
    cases = [
        ResBlock(16, 32, 32, num_groups=8), ResBlock(16, 16, 32, use_scale_shift_norm=False, num_groups=8),
        AttentionBlock(16, 2, 8), Downsample(16), Upsample(16),
        ResAttnBlock(ResBlock(16, 16, 32, num_groups=8), AttentionBlock(16, 2, 8)),
    ]
    for block in cases:
        out, tangent = block(x, emb)
        assert tangent is None, type(block).__name__
        assert torch.isfinite(out).all()
    assert TimestepEmbedding(16, 32)(torch.rand(2))[1] is None
    model = tiny_unet()
    out = model(torch.randn(1, 2, 8, 8), torch.rand(1))
    assert isinstance(out, Tensor)
    pair = model(torch.randn(1, 2, 8, 8), torch.rand(1), t_dot=torch.ones(1))
    assert isinstance(pair, tuple) and pair[1].shape == (1, 2, 8, 8)


def _dual_vs_jvp(block: nn.Module, x: Tensor, emb: Optional[Tensor], x_dot: Optional[Tensor],
                 emb_dot: Optional[Tensor], seed: int) -> None:
    out, tangent = block(x, emb, x_dot, emb_dot)
    primals, tangents = [x], [x_dot if x_dot is not None else torch.zeros_like(x)]
    if emb is not None:
        primals.append(emb)
        tangents.append(emb_dot if emb_dot is not None else torch.zeros_like(emb))
    with ops.math_attention():
        out_ref, tangent_ref = torch.func.jvp(lambda *p: block(*p)[0], tuple(primals), tuple(tangents))
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, tangent_ref, rtol=1e-10, atol=1e-10,
                               msg=lambda m: f"seed {seed}, {type(block).__name__}: {m}")


# (16, 24, False, "emb") is the case where only the time embedding carries a tangent into the
# additive (non-FiLM) ResBlock: the lone (B, C, 1, 1) tangent must broadcast to the feature map.
RESBLOCK_CASES = [
    (cin, cout, scale_shift, which)
    for cin, cout, scale_shift in [(16, 16, True), (8, 16, True), (16, 24, False)]
    for which in ["both", "x", "emb"]
]


@pytest.mark.parametrize("cin,cout,scale_shift,which", RESBLOCK_CASES)
def test_resblock_dual_matches_jvp_float64(cin: int, cout: int, scale_shift: bool, which: str, seed: int) -> None:
    block = ResBlock(cin, cout, 32, dropout=0.1, use_scale_shift_norm=scale_shift, num_groups=4).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))  # nonzero everywhere (conv2 etc. are not zero-initialised anyway)
    x, emb = torch.randn(2, cin, 5, 5, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    x_dot = torch.randn_like(x) if which in ("both", "x") else None
    emb_dot = torch.randn_like(emb) if which in ("both", "emb") else None
    _dual_vs_jvp(block, x, emb, x_dot, emb_dot, seed)


def test_attention_block_dual_matches_jvp_float64(seed: int) -> None:
    block = AttentionBlock(16, num_heads=4, num_groups=4).double()
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    _dual_vs_jvp(block, x, None, torch.randn_like(x), None, seed)


def test_resample_blocks_dual_matches_jvp_float64(seed: int) -> None:
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    for block in (Downsample(8).double(), Upsample(8).double()):
        _dual_vs_jvp(block, x, None, torch.randn_like(x), None, seed)


def test_timestep_embedding_dual_matches_jvp_float32(seed: int) -> None:
    module = TimestepEmbedding(32, 64)
    t, t_dot = torch.rand(4) * 1000, torch.randn(4)
    _, tangent = module(t, t_dot)
    _, ref = torch.func.jvp(lambda tt: module(tt)[0], (t,), (t_dot,))
    torch.testing.assert_close(tangent, ref, rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("scale_shift", [True, False])
def test_dual_time_unet_time_tangent_matches_jvp_float64(scale_shift: bool, seed: int) -> None:
    """∂_t v_θ(s, t, x) (t_dot = 1, x_dot = None: the FMM derivative) from the dual path vs torch.func.jvp."""
    model = DualTimeUNet(tiny_unet(use_scale_shift_norm=scale_shift), 1000).double()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    s, t = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    v, dv = model(x, s, t, t_dot=torch.ones_like(t))
    with ops.math_attention():
        v_ref, dv_ref = torch.func.jvp(lambda tt: model(x, s, tt), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dv, dv_ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"seed {seed}: {m}")


# ------------------------------------------------------------------------------ memory layout
def _not_channels_last(model: nn.Module, run) -> List[str]:
    """Modules whose 4-D inputs or outputs (primals and tangents) are not channels_last.

    Inputs matter most: a convolution with channels_last weights returns channels_last whatever
    it is given, so a norm or a head merge that flips the layout shows only in the next input.
    """
    found: List[str] = []

    def check(name, module, where, values):
        for t in values:
            if isinstance(t, Tensor) and t.dim() == 4 and t.shape[1] > 1 and t.shape[2] * t.shape[3] > 1:
                if not t.is_contiguous(memory_format=torch.channels_last):
                    found.append(f"{where} of {name} ({type(module).__name__}), strides {t.stride()}")

    def pre_hook(name):
        return lambda module, args: check(name, module, "input", args)

    def hook(name):
        return lambda module, args, out: check(name, module, "output", out if isinstance(out, tuple) else (out,))

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in named]
    handles += [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return found


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("tangent", ["plain", "dual"])
def test_channels_last_stays_channels_last(tangent: str, impl: str, seed: int) -> None:
    """infrastructure.channels_last converts weights and batch once; every block (ResBlocks with
    FiLM, attention, down/upsampling, skip concatenations) then takes and returns channels_last
    primals and tangents with the NCHW model's numbers — no layout flip inside the UNet — with the
    reference ops and with the fused C++ ops (the Triton kernels: tests/test_kernels_gn_film_silu.py)."""
    from fastflow.ops import cpu

    if impl == "cpp" and not cpu.is_available():
        pytest.skip(f"C++ ops not built: {cpu.unavailable_reason()}")
    model = DualTimeUNet(tiny_unet(attention_resolutions=(8, 4), fused_kernels=impl == "cpp"), 1000).double()
    x, s, t = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    kwargs = {} if tangent == "plain" else {"t_dot": torch.ones_like(t)}
    expected = model(x, s, t, **kwargs)
    model_cl = model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out: list = []
    flipped = _not_channels_last(model_cl, lambda: out.append(model_cl(x_cl, s, t, **kwargs)))
    assert not flipped, "layout flipped in: " + "; ".join(flipped[:5])
    for got, want in zip(out[0] if tangent == "dual" else out, expected if tangent == "dual" else [expected]):
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"seed {seed}: {m}")
