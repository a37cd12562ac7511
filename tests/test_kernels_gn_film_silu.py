"""Triton GroupNorm+FiLM+SiLU kernels (kernels/gn_film_silu.py) against the PyTorch reference.

The reference (fastflow/ops/reference.py) computes in float32, so it is the yardstick in float32
(tight) and float16 (looser: outputs and grads round to 11 bits). Checked: y, every gradient, the
tangent ẏ, and every gradient through ẏ (w.r.t. x, ẋ, weight, bias, scale, ṡ, shift, ṫ), over round
and odd shapes; torch.func.jvp / forward_ad / func.grad; torch.compile(fullgraph=True).

On the CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below unless the
environment says otherwise); on a GPU: ``TRITON_INTERPRET=0 pytest tests/test_kernels_gn_film_silu.py``.
Every run draws fresh random inputs; the seed is in each assertion message and
FASTFLOW_TEST_SEED=<seed> replays it. Output buffers are NaN-poisoned before each launch so an
element a kernel fails to write shows up as NaN.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")


from fastflow.ops.reference import gn_film_silu_dual_reference, gn_film_silu_reference  # noqa: E402
from kernels import gn_film_silu as gn  # noqa: E402
import _op_checks as checks  # noqa: E402  (tests/_op_checks.py)

_INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
if not _INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

EPS = 1e-5
# Max error relative to max(1, max |reference|). Both sides compute in float32; fp16 differs by
# the final rounding of y / grads (and fp16 weight grads summed over N in different orders).
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 6e-2}

# (shape, groups): odd spatial 5x7 with 12 channels/group; 4 groups of 4; 2 channels x 256;
# 3-D spatial; no spatial dims.
ROUND_ODD = [((2, 384, 5, 7), 32), ((3, 16, 8, 8), 4), ((1, 64, 16, 16), 32)]
EXTRA = [((2, 6, 3, 4, 5), 3), ((4, 32), 8)]
SMALL = ((3, 16, 8, 8), 4)


def _ids(cases):
    return ["x".join(map(str, shape)) + f"-g{groups}" for shape, groups in cases]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(gn, "_POISON_OUTPUTS", True)


def _make(seed, shape, dtype, param_dtype=None):
    """x (mean 0.5, std 2: the statistics must not assume centred data), tangents, params, grads."""
    gen = torch.Generator().manual_seed(seed)
    n_batch, channels = shape[0], shape[1]
    param_dtype = param_dtype or dtype

    def randn(size, dtype_, scale=1.0, offset=0.0):
        return (torch.randn(size, generator=gen, dtype=torch.float64) * scale + offset).to(dtype_).to(DEVICE)

    return {
        "x": randn(shape, dtype, 2.0, 0.5),
        "x_dot": randn(shape, dtype),
        "weight": randn((channels,), param_dtype, 0.5, 1.0),
        "bias": randn((channels,), param_dtype, 0.5),
        "scale": randn((n_batch, channels), dtype, 0.3),
        "scale_dot": randn((n_batch, channels), dtype),
        "shift": randn((n_batch, channels), dtype),
        "shift_dot": randn((n_batch, channels), dtype),
        "grad_y": randn(shape, dtype),
        "grad_y_dot": randn(shape, dtype),
    }


def _grads(loss, leaves):
    """Grads of ``loss`` w.r.t. the non-None leaves; unused leaves get zeros, None stays None."""
    present = [t for t in leaves if t is not None]
    grads = iter(
        torch.zeros_like(t) if g is None else g
        for t, g in zip(present, torch.autograd.grad(loss, present, allow_unused=True))
    )
    return [None if t is None else next(grads) for t in leaves]


PLAIN_NAMES = ("x", "weight", "bias", "scale", "shift")


def _plain_run(fn, inp, groups, silu, present):
    leaves = [checks.leaf(inp[n]) if n in present else None for n in PLAIN_NAMES]
    y = fn(*leaves, groups, EPS, silu)
    return y, _grads((y * inp["grad_y"]).sum(), leaves)


def _check_plain(seed, shape, groups, dtype, silu, present, param_dtype=None, tol_scale=1.0, channels_last=False):
    inp = _make(seed, shape, dtype, param_dtype)
    if channels_last:
        inp = _channels_last(inp, "all")
    y, grads = _plain_run(gn.gn_film_silu_triton, inp, groups, silu, present)
    y_ref, grads_ref = _plain_run(gn_film_silu_reference, inp, groups, silu, present)
    checks.assert_close(y, y_ref, TOL[dtype] * tol_scale, "y", seed)
    for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
        if name in present:
            checks.assert_close(g, g_ref, GRAD_TOL[dtype] * tol_scale, f"d{name}", seed)


ALL_PLAIN = PLAIN_NAMES
NO_FILM = ("x", "weight", "bias")


@pytest.mark.parametrize("shape,groups", ROUND_ODD + EXTRA, ids=_ids(ROUND_ODD + EXTRA))
def test_forward_backward_fp32(shape, groups, seed):
    """y and d(x, weight, bias, scale, shift) with everything present, SiLU on."""
    _check_plain(seed, shape, groups, torch.float32, True, ALL_PLAIN)


@pytest.mark.parametrize(
    "present,silu",
    [(NO_FILM, False), (NO_FILM, True), (("x",), True), (("x", "scale"), False), (("x", "weight", "shift"), True)],
    ids=["attn-norm", "no-film", "bare", "scale-only-noact", "weight-shift"],
)
def test_forward_backward_optional_inputs(present, silu, seed):
    """None weight/bias/scale/shift and silu=False (the attention block's norm)."""
    _check_plain(seed, *SMALL, torch.float32, silu, present)


def test_forward_backward_fp16(seed):
    _check_plain(seed, *SMALL, torch.float16, True, ALL_PLAIN)


def test_forward_backward_fp16_with_fp32_params(seed):
    """Mixed precision: fp16 activations and FiLM, fp32 GroupNorm parameters."""
    _check_plain(seed, *SMALL, torch.float16, True, ALL_PLAIN, param_dtype=torch.float32)


DUAL_NAMES = ("x", "x_dot", "weight", "bias", "scale", "scale_dot", "shift", "shift_dot")


def _dual_run(fn, inp, groups, silu, present, upstream=("grad_y", "grad_y_dot")):
    leaves = [checks.leaf(inp[n]) if n in present else None for n in DUAL_NAMES]
    y, y_dot = fn(*leaves, groups, EPS, silu)
    loss = 0.0
    if "grad_y" in upstream:
        loss = loss + (y * inp["grad_y"]).sum()
    if "grad_y_dot" in upstream:
        loss = loss + (y_dot * inp["grad_y_dot"]).sum()
    return y, y_dot, _grads(loss, leaves)


def _check_dual(seed, shape, groups, dtype, silu, present, upstream=("grad_y", "grad_y_dot"), tol_scale=1.0,
                channels_last=False):
    inp = _make(seed, shape, dtype)
    if channels_last:
        inp = _channels_last(inp, "all")
    y, y_dot, grads = _dual_run(gn.gn_film_silu_dual_triton, inp, groups, silu, present, upstream)
    y_ref, y_dot_ref, grads_ref = _dual_run(gn_film_silu_dual_reference, inp, groups, silu, present, upstream)
    checks.assert_close(y, y_ref, TOL[dtype] * tol_scale, "y", seed)
    checks.assert_close(y_dot, y_dot_ref, TOL[dtype] * tol_scale, "y_dot", seed)
    for name, g, g_ref in zip(DUAL_NAMES, grads, grads_ref):
        if name in present:
            checks.assert_close(g, g_ref, GRAD_TOL[dtype] * tol_scale, f"d{name}", seed)


ALL_DUAL = DUAL_NAMES


@pytest.mark.parametrize("shape,groups", ROUND_ODD + EXTRA[:1], ids=_ids(ROUND_ODD + EXTRA[:1]))
def test_dual_fp32(shape, groups, seed):
    """y, ẏ and the grads of <G, y> + <Ġ, ẏ> w.r.t. all eight inputs, SiLU on."""
    _check_dual(seed, shape, groups, torch.float32, True, ALL_DUAL)


@pytest.mark.parametrize(
    "present,silu",
    [
        (("x", "weight", "bias", "scale", "scale_dot", "shift", "shift_dot"), True),  # first ResBlock: ẋ None
        (("x", "x_dot", "weight", "bias"), False),  # attention norm
        (("x", "x_dot", "shift", "shift_dot"), True),
        (("x", "x_dot", "scale", "shift"), True),
        (("x", "scale_dot"), True),
    ],
    ids=["no-x-dot", "attn-norm", "shift-only", "no-film-tangents", "scale-dot-only"],
)
def test_dual_optional_inputs(present, silu, seed):
    _check_dual(seed, *SMALL, torch.float32, silu, present)


@pytest.mark.parametrize("upstream", [("grad_y",), ("grad_y_dot",)], ids=["y-only", "y-dot-only"])
def test_dual_one_sided_upstream(upstream, seed):
    """A loss that uses only y (or only ẏ): the missing upstream grad arrives as None."""
    _check_dual(seed, *SMALL, torch.float32, True, ALL_DUAL, upstream)


def test_dual_fp16(seed):
    _check_dual(seed, *SMALL, torch.float16, True, ALL_DUAL)


def test_dual_without_tangents_returns_none(seed):
    shape, groups = SMALL
    inp = _make(seed, shape, torch.float32)
    args = (inp["x"], None, inp["weight"], inp["bias"], inp["scale"], None, inp["shift"], None)
    y, y_dot = gn.gn_film_silu_dual_triton(*args, groups, EPS, True)
    assert y_dot is None
    checks.assert_close(y, gn_film_silu_dual_reference(*args, groups, EPS, True)[0], TOL[torch.float32], "y", seed)


def test_multi_block_loops(monkeypatch, seed):
    """Tiny tiles force several channel blocks and several (partial) spatial blocks per group."""
    monkeypatch.setattr(gn, "_TILE_ELEMENTS", {kind: 128 for kind in gn._TILE_ELEMENTS})
    shape, groups = (2, 6, 12, 12), 2
    # 3 channels/group -> 3 channel blocks of 1; 144 positions -> 2 spatial blocks, the second partial.
    assert gn._launch_config(3, 144, "dual_bwd")[:2] == (1, 128)
    _check_plain(seed, shape, groups, torch.float32, True, ALL_PLAIN)
    _check_dual(seed, shape, groups, torch.float32, True, ALL_DUAL)


@pytest.mark.slow
def test_large_offset_group(seed):
    """A 131k-element group (32 ch x 64x64) far from zero: single-read Welford statistics hold up."""
    shape, groups = (1, 64, 64, 64), 2
    inp = _make(seed, shape, torch.float32)
    inp["x"] = inp["x"] + 100.0
    present = ("x", "weight", "bias", "scale", "shift")
    y, grads = _plain_run(gn.gn_film_silu_triton, inp, groups, True, present)
    y_ref, grads_ref = _plain_run(gn_film_silu_reference, inp, groups, True, present)
    checks.assert_close(y, y_ref, TOL[torch.float32], "y", seed)
    for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[torch.float32], f"d{name}", seed)


def test_broadcast_and_strided_film(seed):
    """scale as (C,), (1, C), (N, C, 1, 1) and (1, C, 1, 1) (broadcast over N), shift as a strided chunk of an embedding."""
    shape, groups = (2, 8, 3, 5), 2
    inp = _make(seed, shape, torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    emb = torch.randn(2, 24, generator=gen).to(DEVICE)
    for scale in (inp["scale"][0], inp["scale"][:1], emb[:, 8:16],
                  inp["scale"][:, :, None, None], inp["scale"][:1, :, None, None]):
        shift = emb[:, 16:]  # non-contiguous rows
        leaves_k = [checks.leaf(t) for t in (inp["x"], inp["weight"], inp["bias"], scale, shift)]
        leaves_r = [checks.leaf(t) for t in (inp["x"], inp["weight"], inp["bias"], scale, shift)]
        y = gn.gn_film_silu_triton(*leaves_k, groups, EPS, True)
        y_ref = gn_film_silu_reference(*leaves_r, groups, EPS, True)
        checks.assert_close(y, y_ref, TOL[torch.float32], f"y (scale {tuple(scale.shape)})", seed)
        grads = torch.autograd.grad((y * inp["grad_y"]).sum(), leaves_k)
        grads_ref = torch.autograd.grad((y_ref * inp["grad_y"]).sum(), leaves_r)
        for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
            checks.assert_close(g, g_ref, GRAD_TOL[torch.float32], f"d{name} (scale {tuple(scale.shape)})", seed)


def test_float64_refused_and_dispatched_to_the_reference(monkeypatch, seed):
    """The kernels compute in float32 at most: a float64 x is a TypeError here (it was computed in
    float32 and stored back as float64), and fastflow.ops sends float64 to the reference even
    where the fused backend is Triton."""
    from fastflow import ops

    inp = _make(seed, SMALL[0], torch.float32)
    args = [inp[n].double() for n in ("x", "weight", "bias", "scale", "shift")]
    with pytest.raises(TypeError, match="float64"):
        gn.gn_film_silu_triton(*args, SMALL[1], EPS, True)
    monkeypatch.setenv("FASTFLOW_OPS_BACKEND", "triton")
    assert ops.fused_backend_for(args[0].device) == "triton"
    y = ops.gn_film_silu(*args, groups=SMALL[1], eps=EPS, fused=True)
    assert y.dtype == torch.float64
    checks.assert_close(y, gn_film_silu_reference(*args, SMALL[1], EPS, True), 1e-12, "y", seed)


def test_func_jvp_and_backward_through_tangent(seed):
    """torch.func.jvp uses the Function's jvp (dual kernel); a loss on (y, ẏ) then backpropagates."""
    inp = _make(seed, SMALL[0], torch.float32)
    checks.check_gn_jvp_then_backward(gn.gn_film_silu_triton, gn_film_silu_reference, inp, SMALL[1], EPS,
                               TOL[torch.float32], GRAD_TOL[torch.float32], seed)


def test_func_jvp_parameter_tangents(seed):
    """Tangents on weight/bias (PyTorch term) together with an x tangent (kernel)."""
    inp = _make(seed, SMALL[0], torch.float32)
    checks.check_gn_jvp_parameter_tangents(gn.gn_film_silu_triton, gn_film_silu_reference, inp, SMALL[1], EPS,
                                    TOL[torch.float32], GRAD_TOL[torch.float32], seed)


def test_forward_ad(seed):
    inp = _make(seed, SMALL[0], torch.float32)
    checks.check_gn_forward_ad(gn.gn_film_silu_triton, gn_film_silu_reference, inp, SMALL[1], EPS, TOL[torch.float32], seed)


def test_func_grad(seed):
    """torch.func.grad through both Functions (custom ops with register_autograd cannot)."""
    inp = _make(seed, SMALL[0], torch.float32)
    checks.check_gn_func_grad(gn.gn_film_silu_triton, gn.gn_film_silu_dual_triton, gn_film_silu_reference,
                       gn_film_silu_dual_reference, inp, SMALL[1], EPS, GRAD_TOL[torch.float32], seed)


def test_double_backward_raises(seed):
    """create_graph=True keeps first-order gradients right; a gradient penalty through the
    backward kernels raises by name instead of returning wrong gradients."""
    inp = _make(seed, SMALL[0], torch.float32)
    checks.check_gn_double_backward(gn.gn_film_silu_triton, gn.gn_film_silu_dual_triton, gn_film_silu_reference,
                                    gn_film_silu_dual_reference, inp, SMALL[1], EPS, GRAD_TOL[torch.float32], seed)


def test_invalid_groups_raises():
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="divisible"):
        gn.gn_film_silu_triton(x, None, None, None, None, 4, EPS, True)


def _compiled_loss(impl_plain, impl_dual, groups, inp):
    def loss(x, x_dot, weight, scale):
        y = impl_plain(x, weight, inp["bias"], scale, inp["shift"], groups, EPS, True)
        y2, y2_dot = impl_dual(
            y, x_dot, weight, None, scale, inp["scale_dot"], None, inp["shift_dot"], groups, EPS, False
        )
        return (y2 * inp["grad_y"]).sum() + (y2_dot * inp["grad_y_dot"]).sum()
    return loss


@pytest.mark.compile
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph(backend, seed):
    """The custom ops trace without graph breaks (fake + autograd registrations) and match eager."""
    torch._dynamo.reset()
    shape, groups = (2, 8, 3, 3), 2
    inp = _make(seed, shape, torch.float32)
    names = ("x", "x_dot", "weight", "scale")
    compiled = torch.compile(_compiled_loss(gn.gn_film_silu_triton, gn.gn_film_silu_dual_triton, groups, inp),
                             backend=backend, fullgraph=True)
    leaves = [checks.leaf(inp[n]) for n in names]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    leaves_ref = [checks.leaf(inp[n]) for n in names]
    loss_ref = _compiled_loss(gn_film_silu_reference, gn_film_silu_dual_reference, groups, inp)(*leaves_ref)
    grads_ref = torch.autograd.grad(loss_ref, leaves_ref)
    checks.assert_close(loss, loss_ref, TOL[torch.float32], "loss", seed)
    for name, g, g_ref in zip(names, grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[torch.float32], f"d{name}", seed)


@pytest.mark.slow
@pytest.mark.compile
def test_opcheck(seed):
    """torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch."""
    shape, groups = (2, 4, 3, 3), 2
    inp = {k: v.requires_grad_() if k in ("x", "x_dot", "weight", "scale") else v
           for k, v in _make(seed, shape, torch.float32).items()}
    plain = tuple(inp[n] for n in PLAIN_NAMES) + (groups, EPS, True)
    dual = tuple(inp[n] for n in DUAL_NAMES) + (groups, EPS, True)
    torch.library.opcheck(gn._fwd_op, plain)
    torch.library.opcheck(gn._fwd_op, (inp["x"], None, None, None, None, groups, EPS, False))
    torch.library.opcheck(gn._dual_op, dual)
    torch.library.opcheck(gn._dual_op, (inp["x"], None) + dual[2:7] + (None, groups, EPS, True))


requires_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 / large shapes need a GPU")
GPU_CASES = [((8, 256, 32, 32), 32), ((4, 128, 64, 64), 32), ((2, 512, 8, 8), 32), ((3, 96, 17, 9), 8)]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,groups", GPU_CASES, ids=_ids(GPU_CASES))
def test_gpu_shapes(shape, groups, dtype, layout, seed):
    """UNet-sized shapes (multi-block loops at real tile sizes) and bf16, on the GPU only, in both
    layouts (channels_last: the grouped kernels at real tile sizes and warp counts).

    fp32 gets 3x the CPU tolerance: up to 131k-element group sums in a different order.
    """
    cl = layout == "channels_last"
    _check_plain(seed, shape, groups, dtype, True, ALL_PLAIN, param_dtype=torch.float32, tol_scale=3.0,
                 channels_last=cl)
    _check_dual(seed, shape, groups, dtype, True, ALL_DUAL, tol_scale=3.0, channels_last=cl)


CL = torch.channels_last
# (shape, groups, which tensors are channels_last): all of them (a channels_last UNet); x alone
# (tangent and upstream grads NCHW: converted to x's layout); CPG = 12 (2 groups = 24 of a 32-wide
# channel block per program); CPG = 16 with H·W = 81 (several position blocks); 10 groups of 4
# (8 groups per program: the second program's block is partly empty).
CL_CASES = [
    ((2, 24, 5, 7), 6, "all"),
    ((2, 24, 5, 7), 6, "x-only"),
    ((1, 384, 5, 7), 32, "all"),
    ((2, 32, 9, 9), 2, "all"),
    ((2, 40, 3, 5), 10, "all"),
]


class _CountingKernel:
    """Stands in for a JIT kernel in ``gn._CL_KERNELS``: counts launches, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _channels_last(inp, which):
    return {k: (v.contiguous(memory_format=CL) if v.dim() == 4 and (which == "all" or k == "x") else v)
            for k, v in inp.items()}


@pytest.mark.parametrize("kernels", ["grouped", "per-group"])
@pytest.mark.parametrize("shape,groups,which", CL_CASES,
                         ids=[f"{'x'.join(map(str, s))}-g{g}-{w}" for s, g, w in CL_CASES])
def test_channels_last_inputs(shape, groups, which, kernels, seed, monkeypatch):
    """channels_last x (infrastructure.channels_last): the kernels run that layout in place and
    return y, ẏ and dx in it (so a channels_last UNet stays channels_last through its norms), with
    the reference's numbers on the contiguous tensors for the plain op, the dual op and all grads.
    ``grouped``: the channels_last kernels (several groups per program; all four must run);
    ``per-group``: the strided per-group kernels they fall back to for groups wider than a tile."""
    counters = {kind: _CountingKernel(k) for kind, k in gn._CL_KERNELS.items()}
    for kind, counter in counters.items():
        monkeypatch.setitem(gn._CL_KERNELS, kind, counter)
    if kernels == "per-group":
        monkeypatch.setattr(gn, "_cl_launch_config", lambda *args: None)
    inp = _make(seed, shape, torch.float32)
    cl = _channels_last(inp, which)
    assert not cl["x"].is_contiguous() and cl["x"].is_contiguous(memory_format=CL)
    x_strides = cl["x"].stride()
    y, grads = _plain_run(gn.gn_film_silu_triton, cl, groups, True, PLAIN_NAMES)
    y_ref, grads_ref = _plain_run(gn_film_silu_reference, inp, groups, True, PLAIN_NAMES)
    assert y.stride() == x_strides and grads[0].stride() == x_strides, (y.stride(), grads[0].stride())
    checks.assert_close(y, y_ref, TOL[torch.float32], "y", seed)
    for name, g, g_ref in zip(PLAIN_NAMES, grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[torch.float32], f"d{name}", seed)
    y, y_dot, grads = _dual_run(gn.gn_film_silu_dual_triton, cl, groups, True, DUAL_NAMES)
    y_ref, y_dot_ref, grads_ref = _dual_run(gn_film_silu_dual_reference, inp, groups, True, DUAL_NAMES)
    assert y.stride() == y_dot.stride() == grads[0].stride() == x_strides
    checks.assert_close(y, y_ref, TOL[torch.float32], "y", seed)
    checks.assert_close(y_dot, y_dot_ref, TOL[torch.float32], "y_dot", seed)
    for name, g, g_ref in zip(DUAL_NAMES, grads, grads_ref):
        checks.assert_close(g, g_ref, GRAD_TOL[torch.float32], f"d{name}", seed)
    launches = {kind: c.launches for kind, c in counters.items()}
    assert all(launches.values()) if kernels == "grouped" else not any(launches.values()), launches


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "mixed", "strided"])
def test_fake_kernels_match_real_layouts(layout, seed):
    """Every operator's fake (meta) kernel gives the real outputs' shapes, dtypes and strides —
    torch.compile plans the code after an operator from the fake's strides, so a fake that says
    channels_last while the kernel writes NCHW (or back) would be silently wrong numbers."""
    shape, groups = (2, 8, 3, 5), 2
    inp = _make(seed, shape, torch.float32)
    if layout == "channels_last":
        inp = _channels_last(inp, "all")
    elif layout == "mixed":
        inp = _channels_last(inp, "x-only")
    elif layout == "strided":  # a non-dense view: copied to NCHW
        inp = {k: (torch.cat([v, v], dim=-1)[..., ::2] if v.dim() == 4 else v) for k, v in inp.items()}
    plain = tuple(inp[n] for n in PLAIN_NAMES)
    dual = tuple(inp[n] for n in DUAL_NAMES)
    y, mean, rstd = gn._fwd_op(*plain, groups, EPS, True)
    stats = gn._dual_op(*dual, groups, EPS, True)[2:]
    cases = [
        (gn._fwd_op, plain + (groups, EPS, True)),
        (gn._fwd_op, (inp["x"], None, None, None, None, groups, EPS, False)),
        (gn._bwd_op, (inp["grad_y"],) + plain + (mean, rstd, groups, True)),
        (gn._dual_op, dual + (groups, EPS, True)),
        (gn._dual_op, (inp["x"], None) + dual[2:] + (groups, EPS, True)),
        (gn._dual_bwd_op, (inp["grad_y"], inp["grad_y_dot"]) + dual + (*stats, groups, True, True)),
        (gn._dual_bwd_op, (None, inp["grad_y_dot"]) + dual + (*stats, groups, True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
