"""C++ CPU ops (csrc/, wrapped by fastflow/ops/cpu.py) against the PyTorch reference.

The reference (fastflow/ops/reference.py) keeps float64 inputs in float64 and so do the kernels,
so most checks run in float64 with a tight tolerance (1e-10 relative to max(1, max |ref|)): outputs,
every gradient (random upstream grads), the tangents of the dual forms, and every gradient through
the tangent (w.r.t. x, ẋ, weight, bias, scale, ṡ, shift, ṫ; q, q̇, k, k̇, v, v̇). float32 and
float16/bfloat16 run with tolerances for their rounding. Also: torch.func.jvp / forward_ad /
func.grad through the plain ops, the dispatcher, torch.compile(fullgraph=True) and opcheck.

Every run draws fresh random inputs; the seed is in each assertion message and
FASTFLOW_TEST_SEED=<seed> replays it. The module is skipped when the extension is not built
(``pip install --no-build-isolation -e .``).
"""

import os

import pytest

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwAD  # noqa: E402

from fastflow.ops import cpu  # noqa: E402
import _op_checks as checks  # noqa: E402  (tests/_op_checks.py)
from fastflow.ops.reference import (  # noqa: E402
    attention_dual_reference,
    attention_reference,
    gn_film_silu_dual_reference,
    gn_film_silu_reference,
)

if not cpu.is_available():
    pytest.skip(f"C++ extension unavailable: {cpu.unavailable_reason()}", allow_module_level=True)

EPS = 1e-5
# Max error relative to max(1, max |reference|).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}


def _grads(loss, leaves):
    """Grads of ``loss`` w.r.t. the non-None leaves; unused leaves get zeros, None stays None."""
    present = [t for t in leaves if t is not None]
    grads = iter(
        torch.zeros_like(t) if g is None else g
        for t, g in zip(present, torch.autograd.grad(loss, present, allow_unused=True))
    )
    return [None if t is None else next(grads) for t in leaves]


def _randn(gen, shape, dtype, scale=1.0, offset=0.0):
    """Standard normal drawn in float64, scaled, rounded to ``dtype``."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


# ----------------------------------------------------------------------------------------------
# GroupNorm + FiLM + SiLU
# ----------------------------------------------------------------------------------------------

GN_SHAPES = [((2, 384, 5, 7), 32), ((3, 16, 8, 8), 4)]
GN_IDS = ["2x384x5x7-g32", "3x16x8x8-g4"]
SMALL = ((3, 16, 8, 8), 4)
PLAIN_NAMES = ("x", "weight", "bias", "scale", "shift")
DUAL_NAMES = ("x", "x_dot", "weight", "bias", "scale", "scale_dot", "shift", "shift_dot")
FILM = ("scale", "shift", "scale_dot", "shift_dot")


def _gn_inputs(seed, shape, dtype, param_dtype=None):
    """x (mean 0.5, std 2: statistics must not assume centred data), tangents, params, grads."""
    gen = torch.Generator().manual_seed(seed)
    n_batch, channels = shape[0], shape[1]
    param_dtype = param_dtype or dtype
    return {
        "x": _randn(gen, shape, dtype, 2.0, 0.5),
        "x_dot": _randn(gen, shape, dtype),
        "weight": _randn(gen, (channels,), param_dtype, 0.5, 1.0),
        "bias": _randn(gen, (channels,), param_dtype, 0.5),
        "scale": _randn(gen, (n_batch, channels), dtype, 0.3),
        "scale_dot": _randn(gen, (n_batch, channels), dtype),
        "shift": _randn(gen, (n_batch, channels), dtype),
        "shift_dot": _randn(gen, (n_batch, channels), dtype),
        "grad_y": _randn(gen, shape, dtype),
        "grad_y_dot": _randn(gen, shape, dtype),
    }


def _gn_plain_run(fn, inp, groups, silu, present):
    leaves = [checks.leaf(inp[n]) if n in present else None for n in PLAIN_NAMES]
    y = fn(*leaves, groups, EPS, silu)
    return y, _grads((y * inp["grad_y"]).sum(), leaves)


def _check_gn_plain(seed, shape, groups, dtype, silu, present, param_dtype=None):
    inp = _gn_inputs(seed, shape, dtype, param_dtype)
    y, grads = _gn_plain_run(cpu.gn_film_silu_cpp, inp, groups, silu, present)
    y_ref, grads_ref = _gn_plain_run(gn_film_silu_reference, inp, groups, silu, present)
    checks.assert_close(y, y_ref, TOL[dtype], "y", seed)
    for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
        if name in present:
            checks.assert_close(g, g_ref, GRAD_TOL[dtype], f"d{name}", seed)


def _gn_dual_run(fn, inp, groups, silu, present, upstream):
    leaves = [checks.leaf(inp[n]) if n in present else None for n in DUAL_NAMES]
    y, y_dot = fn(*leaves, groups, EPS, silu)
    loss = 0.0
    if "grad_y" in upstream:
        loss = loss + (y * inp["grad_y"]).sum()
    if "grad_y_dot" in upstream:
        loss = loss + (y_dot * inp["grad_y_dot"]).sum()
    return y, y_dot, _grads(loss, leaves)


def _check_gn_dual(seed, shape, groups, dtype, silu, present, upstream=("grad_y", "grad_y_dot")):
    inp = _gn_inputs(seed, shape, dtype)
    y, y_dot, grads = _gn_dual_run(cpu.gn_film_silu_dual_cpp, inp, groups, silu, present, upstream)
    y_ref, y_dot_ref, grads_ref = _gn_dual_run(gn_film_silu_dual_reference, inp, groups, silu, present, upstream)
    checks.assert_close(y, y_ref, TOL[dtype], "y", seed)
    checks.assert_close(y_dot, y_dot_ref, TOL[dtype], "y_dot", seed)
    for name, g, g_ref in zip(DUAL_NAMES, grads, grads_ref):
        if name in present:
            checks.assert_close(g, g_ref, GRAD_TOL[dtype], f"d{name}", seed)


@pytest.mark.parametrize("silu", [True, False], ids=["silu", "identity"])
@pytest.mark.parametrize("film", [True, False], ids=["film", "no-film"])
@pytest.mark.parametrize("shape,groups", GN_SHAPES, ids=GN_IDS)
def test_gn_forward_backward_fp64(shape, groups, film, silu, seed):
    """y and d(x, weight, bias[, scale, shift]) for random upstream grads."""
    present = PLAIN_NAMES if film else ("x", "weight", "bias")
    _check_gn_plain(seed, shape, groups, torch.float64, silu, present)


@pytest.mark.parametrize("x_dot", [True, False], ids=["x-dot", "no-x-dot"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "identity"])
@pytest.mark.parametrize("film", [True, False], ids=["film", "no-film"])
@pytest.mark.parametrize("shape,groups", GN_SHAPES, ids=GN_IDS)
def test_gn_dual_fp64(shape, groups, film, silu, x_dot, seed):
    """y, ẏ and the grads of <G, y> + <Ġ, ẏ> w.r.t. every present input, tangents included."""
    present = [n for n in DUAL_NAMES if (film or n not in FILM) and (x_dot or n != "x_dot")]
    if not film and not x_dot:
        present.append("shift_dot")  # the dual op needs at least one tangent
    _check_gn_dual(seed, shape, groups, torch.float64, silu, tuple(present))


@pytest.mark.parametrize(
    "present,silu",
    [(("x",), True), (("x", "scale"), False), (("x", "weight", "shift"), True)],
    ids=["bare", "scale-only-identity", "weight-shift"],
)
def test_gn_optional_params_fp64(present, silu, seed):
    """None weight / bias / scale / shift in any combination."""
    _check_gn_plain(seed, *SMALL, torch.float64, silu, present)
    dual_present = present + tuple(n + "_dot" for n in present if n in ("x", "scale", "shift"))
    _check_gn_dual(seed, *SMALL, torch.float64, silu, dual_present)


@pytest.mark.parametrize("upstream", [("grad_y",), ("grad_y_dot",)], ids=["y-only", "y-dot-only"])
def test_gn_dual_one_sided_upstream(upstream, seed):
    """A loss that uses only y (or only ẏ): the other upstream grad arrives as None."""
    _check_gn_dual(seed, *SMALL, torch.float64, True, DUAL_NAMES, upstream)


@pytest.mark.parametrize("shape,groups", GN_SHAPES + [((2, 6, 3, 4, 5), 3), ((4, 32), 8)],
                         ids=GN_IDS + ["3d-spatial", "no-spatial"])
def test_gn_fp32(shape, groups, seed):
    _check_gn_plain(seed, shape, groups, torch.float32, True, PLAIN_NAMES)
    _check_gn_dual(seed, shape, groups, torch.float32, True, DUAL_NAMES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gn_half(dtype, seed):
    """Half inputs are computed in float32 inside; fp32 GroupNorm params (mixed precision) too."""
    _check_gn_plain(seed, *SMALL, dtype, True, PLAIN_NAMES)
    _check_gn_plain(seed, *SMALL, dtype, True, PLAIN_NAMES, param_dtype=torch.float32)
    _check_gn_dual(seed, *SMALL, dtype, True, DUAL_NAMES)


@pytest.mark.parametrize("which", ["all", "x-only"])
def test_gn_channels_last_inputs(which, seed):
    """channels_last x (with ẋ and the upstream grads channels_last too, or NCHW): outputs, ẏ and
    dx come back channels_last, as ATen ops do, with the reference's numbers on contiguous tensors."""
    shape, groups = (2, 24, 5, 7), 6
    inp = _gn_inputs(seed, shape, torch.float64)
    cl = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and (which == "all" or k == "x") else v)
          for k, v in inp.items()}
    assert not cl["x"].is_contiguous()
    x_strides = cl["x"].stride()
    y, grads = _gn_plain_run(cpu.gn_film_silu_cpp, cl, groups, True, PLAIN_NAMES)
    y_ref, grads_ref = _gn_plain_run(gn_film_silu_reference, inp, groups, True, PLAIN_NAMES)
    assert y.stride() == grads[0].stride() == x_strides, (y.stride(), grads[0].stride())
    checks.assert_close(y, y_ref, TOL[torch.float64], "y", seed)
    for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[torch.float64], f"d{name}", seed)
    upstream = ("grad_y", "grad_y_dot")
    y, y_dot, grads = _gn_dual_run(cpu.gn_film_silu_dual_cpp, cl, groups, True, DUAL_NAMES, upstream)
    y_ref, y_dot_ref, grads_ref = _gn_dual_run(gn_film_silu_dual_reference, inp, groups, True, DUAL_NAMES, upstream)
    assert y.stride() == y_dot.stride() == grads[0].stride() == grads[1].stride() == x_strides
    checks.assert_close(y_dot, y_dot_ref, TOL[torch.float64], "y_dot", seed)
    for name, g, g_ref in zip(DUAL_NAMES, grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[torch.float64], f"d{name}", seed)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_gn_fake_kernels_match_real_layouts(layout, seed):
    """The fake (meta) kernels give the C++ outputs' shapes, dtypes and strides (torch.compile
    plans what follows an operator from its fake's strides)."""
    ops = torch.ops.fastflow_cpp
    shape, groups = (2, 8, 3, 5), 2
    inp = _gn_inputs(seed, shape, torch.float32)
    if layout == "channels_last":
        inp = {k: (v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v) for k, v in inp.items()}
    elif layout == "strided":
        inp = {k: (torch.cat([v, v], dim=-1)[..., ::2] if v.dim() == 4 else v) for k, v in inp.items()}
    plain = tuple(inp[n] for n in PLAIN_NAMES)
    dual = tuple(inp[n] for n in DUAL_NAMES)
    _, mean, rstd = ops.gn_film_silu_fwd(*plain, groups, EPS, True)
    stats = ops.gn_film_silu_dual_fwd(*dual, groups, EPS, True)[2]
    cases = [
        (ops.gn_film_silu_fwd, plain + (groups, EPS, True)),
        (ops.gn_film_silu_bwd, (inp["grad_y"],) + plain + (mean, rstd, groups, True)),
        (ops.gn_film_silu_dual_fwd, dual + (groups, EPS, True)),
        (ops.gn_film_silu_dual_bwd, (inp["grad_y"], inp["grad_y_dot"]) + dual + (stats, groups, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_gn_large_offset_group(seed):
    """A 16k-element group far from zero: the two-pass float32 statistics hold up."""
    shape, groups = (1, 32, 32, 32), 2
    inp = _gn_inputs(seed, shape, torch.float32)
    inp["x"] = inp["x"] + 100.0
    y, grads = _gn_plain_run(cpu.gn_film_silu_cpp, inp, groups, True, PLAIN_NAMES)
    y_ref, grads_ref = _gn_plain_run(gn_film_silu_reference, inp, groups, True, PLAIN_NAMES)
    checks.assert_close(y, y_ref, TOL[torch.float32], "y", seed)
    for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
        checks.assert_close(g, g_ref, 2 * GRAD_TOL[torch.float32], f"d{name}", seed)


def test_gn_float32_param_grads_over_large_channels(seed):
    """256x256 channels: the backwards' per-channel sums (dweight, dbias, dscale, dshift and
    their tangent counterparts) are accumulated in chunks of <= 1024 then in double, so their
    float32 error stays at the float32 reference's. Measured, the summed error over every
    parameter gradient of the plain and dual ops relative to the reference's: 0.36-1.55
    (40 draws); with whole-channel vector-lane sums it was 2.5-8.4."""
    gen = torch.Generator().manual_seed(seed)
    n, c, hw, groups = 2, 4, (256, 256), 2

    def randn(shape, scale=1.0, offset=0.0):
        return _randn(gen, shape, torch.float64, scale, offset)

    x, x_dot = randn((n, c, *hw), 2.0, 3.0), randn((n, c, *hw))
    grad_y, grad_y_dot = randn((n, c, *hw), 1.0, 0.5), randn((n, c, *hw), 1.0, 0.5)
    weight, bias = randn((c,), 0.5, 1.0), randn((c,))
    scale, scale_dot, shift, shift_dot = randn((n, c), 0.3), randn((n, c)), randn((n, c)), randn((n, c))
    forms = {"plain": (cpu.gn_film_silu_cpp, gn_film_silu_reference, (x, weight, bias, scale, shift)),
             "dual": (cpu.gn_film_silu_dual_cpp, gn_film_silu_dual_reference,
                      (x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot))}
    errors = {"cpp": 0.0, "reference": 0.0}
    for form, (kernel, reference, inputs) in forms.items():
        def param_grads(fn, dtype):
            leaves = [t.to(dtype).requires_grad_() for t in inputs]
            out = fn(*leaves, groups, EPS, True)
            if form == "plain":
                loss = (out * grad_y.to(dtype)).sum()
            else:
                loss = (out[0] * grad_y.to(dtype)).sum() + (out[1] * grad_y_dot.to(dtype)).sum()
            grads = torch.autograd.grad(loss, leaves)
            return grads[1:] if form == "plain" else grads[2:]  # every parameter (and FiLM) gradient

        exact = param_grads(reference, torch.float64)
        for name, fn in (("cpp", kernel), ("reference", reference)):
            errors[name] += sum(((g.double() - e).abs().max() / e.abs().max()).item()
                                for g, e in zip(param_grads(fn, torch.float32), exact))
    ratio = errors["cpp"] / errors["reference"]
    assert ratio <= 2.0, (f"seed={seed}: C++ float32 parameter gradients are {ratio:.2f}x less precise than "
                          "the float32 reference's (per-channel sums not chunked?)")


def test_gn_broadcast_and_strided_film(seed):
    """scale as (C,), (1, C), (N, C, 1, 1) and (1, C, 1, 1) (broadcast over N), shift as a strided slice of an embedding."""
    shape, groups = (2, 8, 3, 5), 2
    inp = _gn_inputs(seed, shape, torch.float64)
    emb = _randn(torch.Generator().manual_seed(seed + 1), (2, 24), torch.float64)
    for scale in (inp["scale"][0], inp["scale"][:1], emb[:, 8:16],
                  inp["scale"][:, :, None, None], inp["scale"][:1, :, None, None]):
        shift = emb[:, 16:]
        leaves = [checks.leaf(t) for t in (inp["x"], inp["weight"], inp["bias"], scale, shift)]
        leaves_ref = [checks.leaf(t) for t in (inp["x"], inp["weight"], inp["bias"], scale, shift)]
        y = cpu.gn_film_silu_cpp(*leaves, groups, EPS, True)
        y_ref = gn_film_silu_reference(*leaves_ref, groups, EPS, True)
        what = f"(scale {tuple(scale.shape)})"
        checks.assert_close(y, y_ref, TOL[torch.float64], f"y {what}", seed)
        grads = torch.autograd.grad((y * inp["grad_y"]).sum(), leaves)
        grads_ref = torch.autograd.grad((y_ref * inp["grad_y"]).sum(), leaves_ref)
        for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
            checks.assert_close(g, g_ref, GRAD_TOL[torch.float64], f"d{name} {what}", seed)


def test_gn_dual_without_tangents_returns_none(seed):
    inp = _gn_inputs(seed, *SMALL[:1], torch.float64)
    args = (inp["x"], None, inp["weight"], inp["bias"], inp["scale"], None, inp["shift"], None)
    y, y_dot = cpu.gn_film_silu_dual_cpp(*args, SMALL[1], EPS, True)
    assert y_dot is None
    checks.assert_close(y, gn_film_silu_dual_reference(*args, SMALL[1], EPS, True)[0], TOL[torch.float64], "y", seed)


def test_gn_func_jvp_and_backward_through_tangent(seed):
    """torch.func.jvp uses the Function's jvp (dual op); a loss on (y, ẏ) then backpropagates."""
    inp = _gn_inputs(seed, SMALL[0], torch.float64)
    checks.check_gn_jvp_then_backward(cpu.gn_film_silu_cpp, gn_film_silu_reference, inp, SMALL[1], EPS,
                               TOL[torch.float64], GRAD_TOL[torch.float64], seed)


def test_gn_func_jvp_parameter_tangents(seed):
    """Tangents on weight/bias (PyTorch term) together with an x tangent (dual op)."""
    inp = _gn_inputs(seed, SMALL[0], torch.float64)
    checks.check_gn_jvp_parameter_tangents(cpu.gn_film_silu_cpp, gn_film_silu_reference, inp, SMALL[1], EPS,
                                    TOL[torch.float64], GRAD_TOL[torch.float64], seed)


def test_gn_forward_ad(seed):
    inp = _gn_inputs(seed, SMALL[0], torch.float64)
    checks.check_gn_forward_ad(cpu.gn_film_silu_cpp, gn_film_silu_reference, inp, SMALL[1], EPS, TOL[torch.float64], seed)


def test_gn_func_grad(seed):
    """torch.func.grad through the plain Function and the dual operator (register_autograd)."""
    inp = _gn_inputs(seed, SMALL[0], torch.float64)
    checks.check_gn_func_grad(cpu.gn_film_silu_cpp, cpu.gn_film_silu_dual_cpp, gn_film_silu_reference,
                       gn_film_silu_dual_reference, inp, SMALL[1], EPS, GRAD_TOL[torch.float64], seed)


def test_gn_double_backward_raises(seed):
    """create_graph=True keeps first-order gradients right; a gradient penalty through the C++
    backward raises by name instead of returning wrong (constant-treated) gradients."""
    inp = _gn_inputs(seed, SMALL[0], torch.float64)
    checks.check_gn_double_backward(cpu.gn_film_silu_cpp, cpu.gn_film_silu_dual_cpp, gn_film_silu_reference,
                                    gn_film_silu_dual_reference, inp, SMALL[1], EPS, GRAD_TOL[torch.float64], seed)


def test_gn_invalid_groups_raises():
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(ValueError, match="divisible"):
        cpu.gn_film_silu_cpp(x, None, None, None, None, 4, EPS, True)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------

ATTN_NAMES = ("q", "q_dot", "k", "k_dot", "v", "v_dot")


def _attn_inputs(seed, shape_q, dtype, seqlen_k=None, head_dim_v=None):
    """q, q̇, k, k̇, v, v̇ and upstream gradients G, Ġ in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, seqlen_q, head_dim = shape_q
    seqlen_k = seqlen_q if seqlen_k is None else seqlen_k
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    shape_k, shape_v = (batch, heads, seqlen_k, head_dim), (batch, heads, seqlen_k, head_dim_v)
    shape_o = (batch, heads, seqlen_q, head_dim_v)
    # q scaled up so the softmax is peaked (large score range) as well as flat in places.
    return {
        "q": _randn(gen, shape_q, dtype, 2.0), "q_dot": _randn(gen, shape_q, dtype),
        "k": _randn(gen, shape_k, dtype), "k_dot": _randn(gen, shape_k, dtype),
        "v": _randn(gen, shape_v, dtype), "v_dot": _randn(gen, shape_v, dtype),
        "grad_o": _randn(gen, shape_o, dtype), "grad_o_dot": _randn(gen, shape_o, dtype),
    }


def _attn_plain_run(fn, inp):
    leaves = [checks.leaf(inp[n]) for n in ("q", "k", "v")]
    o = fn(*leaves)
    return o, torch.autograd.grad((o * inp["grad_o"]).sum(), leaves)


def _attn_dual_run(fn, inp, present, upstream):
    leaves = [checks.leaf(inp[n]) if n in present else None for n in ATTN_NAMES]
    o, o_dot = fn(*leaves)
    loss = 0.0
    if "grad_o" in upstream:
        loss = loss + (o * inp["grad_o"]).sum()
    if "grad_o_dot" in upstream:
        loss = loss + (o_dot * inp["grad_o_dot"]).sum()
    return o, o_dot, _grads(loss, leaves)


def _check_attention(seed, inp, dtype, present=ATTN_NAMES, upstream=("grad_o", "grad_o_dot")):
    o, grads = _attn_plain_run(cpu.attention_cpp, inp)
    o_ref, grads_ref = _attn_plain_run(attention_reference, inp)
    checks.assert_close(o, o_ref, TOL[dtype], "o", seed)
    for name, g, g_ref in zip(("q", "k", "v"), grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[dtype], f"d{name}", seed)
    o, o_dot, grads = _attn_dual_run(cpu.attention_dual_cpp, inp, present, upstream)
    o_ref, o_dot_ref, grads_ref = _attn_dual_run(attention_dual_reference, inp, present, upstream)
    checks.assert_close(o, o_ref, TOL[dtype], "dual o", seed)
    checks.assert_close(o_dot, o_dot_ref, TOL[dtype], "o_dot", seed)
    for name, g, g_ref in zip(ATTN_NAMES, grads, grads_ref):
        if name in present:
            checks.assert_close(g, g_ref, GRAD_TOL[dtype], f"dual d{name}", seed)


@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("seqlen", [48, 64, 100])
def test_attention_fp64(seqlen, head_dim, seed):
    """o, dq/dk/dv; o, ȯ and the grads of <G, o> + <Ġ, ȯ> w.r.t. q, q̇, k, k̇, v, v̇."""
    _check_attention(seed, _attn_inputs(seed, (2, 2, seqlen, head_dim), torch.float64), torch.float64)


@pytest.mark.parametrize(
    "present,upstream",
    [
        (("q", "q_dot", "k", "v"), ("grad_o", "grad_o_dot")),
        (("q", "k", "v", "v_dot"), ("grad_o", "grad_o_dot")),
        (("q", "k", "k_dot", "v"), ("grad_o_dot",)),
        (ATTN_NAMES, ("grad_o",)),
    ],
    ids=["q-dot-only", "v-dot-only", "k-dot-only-tangent-loss", "primal-loss-only"],
)
def test_attention_partial_tangents_and_upstream(present, upstream, seed):
    inp = _attn_inputs(seed, (1, 3, 40, 16), torch.float64)
    _check_attention(seed, inp, torch.float64, present, upstream)


def test_attention_cross_shapes(seed):
    """Lq ≠ Lk and a value head dim ≠ the query/key head dim; Lk long enough for several blocks."""
    inp = _attn_inputs(seed, (2, 1, 70, 16), torch.float64, seqlen_k=300, head_dim_v=24)
    _check_attention(seed, inp, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_attention_lower_precision(dtype, seed):
    _check_attention(seed, _attn_inputs(seed, (2, 2, 100, 32), dtype), dtype)


def test_attention_dual_grads_float32_peaked_softmax():
    """float32 dual attention backward on rows where one key takes almost all the weight: every
    gradient within 2e-4 of max |g| of the float64 reference. The inputs are the attention of
    test_torch_compile_fullgraph's chained loss at the seed that exposed it (queries against GN
    outputs, max P = 0.9995): a fixed regression case, as random draws hit such rows rarely. The
    P-term of the dual backward written uncentred (gṖ⊙(Ṡ − μ) − a·Ṡ, equal after the softmax
    Jacobian) cancels two large numbers there: dq was off by 5.1e-4; centred 6.5e-6, and with the
    recomputed row renormalised 1.5e-6 (worst gradient dq̇ 2.0e-5; float32 autograd: dq 4.3e-5)."""
    seed = 1769135365
    gn_inp = _gn_inputs(seed, (2, 8, 3, 3), torch.float64)
    attn_inp = _attn_inputs(seed, (2, 1, 5, 8), torch.float64)
    y = gn_film_silu_reference(gn_inp["x"], gn_inp["weight"], gn_inp["bias"], gn_inp["scale"], gn_inp["shift"],
                               2, EPS, True)
    y2, y2_dot = gn_film_silu_dual_reference(y, gn_inp["x_dot"], gn_inp["weight"], None, gn_inp["scale"],
                                             gn_inp["scale_dot"], None, None, 2, EPS, False)
    seq, seq_dot = (t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for t in (y2, y2_dot))
    inputs = (attn_inp["q"], attn_inp["q_dot"], seq, seq_dot, seq.clone(), seq_dot.clone())

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in inputs]
        o, o_dot = fn(*leaves)
        return torch.autograd.grad((o * o_dot).sum(), leaves)

    for name, g, g_ref in zip(ATTN_NAMES, grads(cpu.attention_dual_cpp, torch.float32),
                              grads(attention_dual_reference, torch.float64)):
        checks.assert_close(g, g_ref.float(), 2e-4, f"d{name}", seed)


@pytest.mark.parametrize("form", ["plain", "dual"])
def test_attention_grads_float32_peaked_rows_as_precise_as_autograd(seed, form):
    """float32 backward at peaked softmax rows (scores up to ~±30), 48 heads: per head, the RMS
    error of every gradient against the float64 reference, summed, as a ratio to float32
    autograd's through the reference on the same inputs; the median over heads at most 1.3.
    The backward recomputes P from the saved lse, which is rounded to ulp(|lse|); a float32
    emulation of the kernel that trusts the lse instead of renormalising the row gives medians
    2.03–2.97 (plain) and 1.49–2.00 (dual); the kernels give 0.75–1.08 and 0.65–1.05 (2000 draws
    each, AMD EPYC). The pooled ratio this test used before (6 heads) is decided by one
    ill-conditioned head and exceeded 1.35 at 7% of draws (dual) with the kernel unchanged; see
    _op_checks.median_head_error_ratio."""
    inp = _attn_inputs(seed, (24, 2, 23, 8), torch.float64)
    inp["q"] = inp["q"] * 4.0
    f32 = {name: t.float() for name, t in inp.items()}

    def run(fn, values):
        if form == "plain":
            return _attn_plain_run(fn, values)[1]
        return _attn_dual_run(fn, values, ATTN_NAMES, ("grad_o", "grad_o_dot"))[2]

    cpp_fn, ref_fn = ((cpu.attention_cpp, attention_reference) if form == "plain"
                      else (cpu.attention_dual_cpp, attention_dual_reference))
    ratio = checks.median_head_error_ratio(run(cpp_fn, f32), run(ref_fn, f32), run(ref_fn, inp))
    assert ratio <= 1.3, (
        f"seed={seed}: {form} C++ float32 gradient error is {ratio:.2f}x autograd's (median over heads)")


def test_attention_func_grad(seed):
    inp = _attn_inputs(seed, (1, 2, 37, 16), torch.float64)
    checks.check_attention_func_grad(cpu.attention_cpp, cpu.attention_dual_cpp, attention_reference,
                                     attention_dual_reference, inp, GRAD_TOL[torch.float64], seed)


def test_attention_double_backward_raises(seed):
    inp = _attn_inputs(seed, (1, 2, 37, 16), torch.float64)
    checks.check_attention_double_backward(cpu.attention_cpp, cpu.attention_dual_cpp, attention_reference,
                                           attention_dual_reference, inp, GRAD_TOL[torch.float64], seed)


def test_attention_dual_without_tangents_returns_none(seed):
    inp = _attn_inputs(seed, (1, 2, 48, 16), torch.float64)
    o, o_dot = cpu.attention_dual_cpp(inp["q"], None, inp["k"], None, inp["v"], None)
    assert o_dot is None
    checks.assert_close(o, attention_reference(inp["q"], inp["k"], inp["v"]), TOL[torch.float64], "o", seed)


def test_attention_func_jvp_then_backward_through_tangent(seed):
    inp = _attn_inputs(seed, (2, 2, 48, 16), torch.float64)
    results = []
    for impl in (cpu.attention_cpp, attention_reference):
        primals = [checks.leaf(inp[n]) for n in ("q", "k", "v")]
        o, o_dot = torch.func.jvp(impl, tuple(primals), tuple(inp[n] for n in ("q_dot", "k_dot", "v_dot")))
        loss = (o * inp["grad_o"]).sum() + (o_dot * inp["grad_o_dot"]).sum()
        results.append((o, o_dot, torch.autograd.grad(loss, primals)))
    (o, o_dot, grads), (o_ref, o_dot_ref, grads_ref) = results
    checks.assert_close(o, o_ref, TOL[torch.float64], "o", seed)
    checks.assert_close(o_dot, o_dot_ref, TOL[torch.float64], "o_dot", seed)
    for name, g, g_ref in zip(("q", "k", "v"), grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[torch.float64], f"d{name}", seed)


def test_attention_forward_ad(seed):
    inp = _attn_inputs(seed, (1, 2, 48, 16), torch.float64)
    _, o_dot_ref = attention_dual_reference(inp["q"], inp["q_dot"], inp["k"], None, inp["v"], inp["v_dot"])
    with fwAD.dual_level():
        q = fwAD.make_dual(inp["q"], inp["q_dot"])
        v = fwAD.make_dual(inp["v"], inp["v_dot"])
        o_dot = fwAD.unpack_dual(cpu.attention_cpp(q, inp["k"], v)).tangent
    checks.assert_close(o_dot, o_dot_ref, TOL[torch.float64], "o_dot", seed)


def test_attention_invalid_shapes_raise():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="expected q, k, v"):
        cpu.attention_cpp(q, torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 16))


# ----------------------------------------------------------------------------------------------
# Dispatcher, torch.compile, opcheck
# ----------------------------------------------------------------------------------------------


@pytest.mark.skipif(bool(os.environ.get("FASTFLOW_OPS_BACKEND")), reason="FASTFLOW_OPS_BACKEND forces a backend")
def test_dispatcher_uses_cpp_on_cpu(seed):
    from fastflow import ops

    assert ops.fused_backend_for(torch.device("cpu")) == "cpp"
    inp = _gn_inputs(seed, *SMALL[:1], torch.float64)
    y = ops.gn_film_silu(inp["x"], inp["weight"], inp["bias"], inp["scale"], inp["shift"], groups=SMALL[1],
                         fused=True)
    y_ref = gn_film_silu_reference(inp["x"], inp["weight"], inp["bias"], inp["scale"], inp["shift"], SMALL[1])
    checks.assert_close(y, y_ref, TOL[torch.float64], "y", seed)


def _fused_loss(gn_plain, gn_dual, attn_plain, attn_dual, gn_inp, attn_inp, groups):
    """A tiny block: GN-FiLM-SiLU → dual GN → attention over the flattened map → dual attention."""

    def loss(x, x_dot, weight, scale, q):
        y = gn_plain(x, weight, gn_inp["bias"], scale, gn_inp["shift"], groups, EPS, True)
        y2, y2_dot = gn_dual(y, x_dot, weight, None, scale, gn_inp["scale_dot"], None, None, groups, EPS, False)
        seq = y2.flatten(2).transpose(1, 2).unsqueeze(1)  # (N, 1, HW, C)
        seq_dot = y2_dot.flatten(2).transpose(1, 2).unsqueeze(1)
        o = attn_plain(q, seq, seq)
        o2, o2_dot = attn_dual(q, attn_inp["q_dot"], seq, seq_dot, seq, seq_dot)
        return o.square().sum() + (o2 * o2_dot).sum() + (y2_dot * gn_inp["grad_y_dot"]).sum()

    return loss


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend, seed):
    """All four ops trace without graph breaks (fake + autograd registrations) and match eager
    (1e-5); eager matches the reference computed in float64. This chained loss is ill-conditioned
    at some seeds (softmax rows at P = 0.9995 over GN outputs), where the float32 reference's own
    loss error reached 3.6e-5 relative (so it is no yardstick here). Over 200 seeds the fused ops'
    gradients stayed within 7e-5 of max |g| (median 1.6e-6; 4.4e-4 before the dual attention
    backward computed its P-term in centred form, csrc/attention.cpp), hence 5e-4."""
    torch._dynamo.reset()
    shape, groups = (2, 8, 3, 3), 2
    gn_inp = _gn_inputs(seed, shape, torch.float32)
    attn_inp = _attn_inputs(seed, (2, 1, 5, 8), torch.float32)
    names = ("x", "x_dot", "weight", "scale")
    args = [gn_inp[n] for n in names] + [attn_inp["q"]]
    fused = _fused_loss(cpu.gn_film_silu_cpp, cpu.gn_film_silu_dual_cpp, cpu.attention_cpp,
                        cpu.attention_dual_cpp, gn_inp, attn_inp, groups)
    gn64, attn64 = ({k: v.double() for k, v in d.items()} for d in (gn_inp, attn_inp))
    reference = _fused_loss(gn_film_silu_reference, gn_film_silu_dual_reference, attention_reference,
                            attention_dual_reference, gn64, attn64, groups)
    compiled = torch.compile(fused, backend=backend, fullgraph=True)

    def loss_and_grads(fn, inputs):
        leaves = [checks.leaf(t) for t in inputs]
        loss = fn(*leaves)
        return loss, torch.autograd.grad(loss, leaves)

    loss, grads = loss_and_grads(compiled, args)
    loss_eager, grads_eager = loss_and_grads(fused, args)
    loss_ref, grads_ref = loss_and_grads(reference, [t.double() for t in args])
    checks.assert_close(loss, loss_eager, 1e-5, "loss (compiled vs eager)", seed)
    checks.assert_close(loss_eager, loss_ref.float(), TOL[torch.float32], "loss", seed)
    for name, g, g_eager, g_ref in zip(names + ("q",), grads, grads_eager, grads_ref):
        checks.assert_close(g, g_eager, 1e-5, f"d{name} (compiled vs eager)", seed)
        checks.assert_close(g_eager, g_ref.float(), 5e-4, f"d{name}", seed)


@pytest.mark.slow
@pytest.mark.compile
def test_opcheck(seed):
    """torch.library.opcheck: schema, fake kernels, autograd registration, AOT dispatch."""
    ops = torch.ops.fastflow_cpp
    gn_inp = {k: checks.leaf(v) for k, v in _gn_inputs(seed, (2, 4, 3, 3), torch.float32).items()}
    plain = tuple(gn_inp[n] for n in PLAIN_NAMES) + (2, EPS, True)
    dual = tuple(gn_inp[n] for n in DUAL_NAMES) + (2, EPS, True)
    torch.library.opcheck(ops.gn_film_silu_fwd, plain)
    torch.library.opcheck(ops.gn_film_silu_fwd, (gn_inp["x"], None, None, None, None, 2, EPS, False))
    torch.library.opcheck(ops.gn_film_silu_dual_fwd, dual)
    torch.library.opcheck(ops.gn_film_silu_dual_fwd, (gn_inp["x"], None) + dual[2:7] + (None, 2, EPS, True))
    attn_inp = {k: checks.leaf(v) for k, v in _attn_inputs(seed, (1, 2, 9, 8), torch.float32).items()}
    torch.library.opcheck(ops.attention_fwd, (attn_inp["q"], attn_inp["k"], attn_inp["v"]))
    torch.library.opcheck(ops.attention_dual_fwd, tuple(attn_inp[n] for n in ATTN_NAMES))
    torch.library.opcheck(ops.attention_dual_fwd, (attn_inp["q"], None, attn_inp["k"], attn_inp["k_dot"],
                                                   attn_inp["v"], None))
