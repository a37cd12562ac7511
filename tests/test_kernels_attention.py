"""Triton attention kernels (kernels/attention.py) against the PyTorch reference (float64).

On the CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set below unless the
environment says otherwise); bf16 and large shapes only run on a GPU:
    TRITON_INTERPRET=0 pytest tests/test_kernels_attention.py
Every run draws fresh random inputs; the seed is in each assertion message and
FASTFLOW_TEST_SEED=<seed> replays it. Output buffers are NaN-poisoned before each launch so an
element a kernel fails to write shows up as NaN.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import torch.autograd.forward_ad as fwAD  # noqa: E402

from fastflow.ops.reference import attention_dual_reference, attention_reference  # noqa: E402
from kernels import attention as attn  # noqa: E402
import _op_checks as checks  # noqa: E402  (tests/_op_checks.py)

_INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if _INTERPRET else "cuda"
if not _INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
requires_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 dots / large shapes need a GPU")

# Max error relative to max(1, max |reference|). Measured on the CPU (L <= 100): fp32 ~5e-7,
# fp16 ~6e-4 (outputs, P and dS tiles rounded to 11 bits); the GPU's longer rows get headroom.
TOL = {torch.float32: 5e-6, torch.float16: 3e-3, torch.bfloat16: 3e-2}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}

SHAPES = [(1, 2, 48, 16), (2, 1, 100, 32), (1, 1, 64, 64)]  # (B, H, L, D)
SHAPE_IDS = ["L48-D16", "L100-D32", "L64-D64"]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(attn, "DEBUG_POISON_OUTPUTS", True)


def _randn(gen, shape, dtype, scale=1.0):
    """Standard normal drawn in float64 on the CPU, rounded to ``dtype``, moved to DEVICE."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _make(seed, shape_q, dtype, shape_k=None, head_dim_v=None):
    """q, q̇, k, k̇, v, v̇ and upstream gradients G, Ġ in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    batch, heads, seqlen_q, head_dim = shape_q
    seqlen_k = seqlen_q if shape_k is None else shape_k
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q_shape, k_shape = shape_q, (batch, heads, seqlen_k, head_dim)
    v_shape, o_shape = (batch, heads, seqlen_k, head_dim_v), (batch, heads, seqlen_q, head_dim_v)
    names = ["q", "q_dot", "k", "k_dot", "v", "v_dot", "grad_o", "grad_o_dot"]
    shapes = [q_shape, q_shape, k_shape, k_shape, v_shape, v_shape, o_shape, o_shape]
    return {n: _randn(gen, s, dtype) for n, s in zip(names, shapes)}


def _leaf(x, dtype=None):
    return None if x is None else x.detach().to(dtype or x.dtype).requires_grad_()


def _assert_close(actual, expected, tol, what, seed):
    assert actual is not None and expected is not None, f"{what}: missing tensor (seed={seed})"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual64 = actual.detach().double()
    assert torch.isfinite(actual64).all(), (
        f"{what}: {int((~torch.isfinite(actual64)).sum())} non-finite elements "
        f"(unwritten output?) (seed={seed})")
    scale = max(1.0, expected.detach().abs().max().item())
    err = (actual64 - expected.detach().double().to(actual64.device)).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g} (seed={seed})"


def _dual_grads(fn, x, tangents, grad_o, grad_o_dot, dtype=None):
    """(O, Ȯ, grads of <G, O> + <Ġ, Ȯ> w.r.t. q, q̇, k, k̇, v, v̇) of a dual attention fn."""
    q, k, v = (_leaf(x[n], dtype) for n in ("q", "k", "v"))
    q_dot, k_dot, v_dot = (_leaf(t, dtype) for t in tangents)
    o, o_dot = fn(q, q_dot, k, k_dot, v, v_dot)
    loss = 0.0
    if grad_o is not None:
        loss = loss + (o * grad_o.to(o.dtype)).sum()
    if grad_o_dot is not None:
        loss = loss + (o_dot * grad_o_dot.to(o_dot.dtype)).sum()
    leaves = [t for t in (q, q_dot, k, k_dot, v, v_dot) if t is not None]
    # A loss without Ȯ does not reach the tangents in the reference: unused means zero.
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = iter(torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads))
    all_grads = [None if t is None else next(grads) for t in (q, q_dot, k, k_dot, v, v_dot)]
    return o, o_dot, all_grads


GRAD_NAMES = ("dq", "dq_dot", "dk", "dk_dot", "dv", "dv_dot")


def _check_dual(x, tangents, grad_o, grad_o_dot, dtype, seed):
    """The dual kernel's O, Ȯ and all six gradients against the float64 reference; returns (O, Ȯ)."""
    o, o_dot, grads = _dual_grads(attn.attention_dual_triton, x, tangents, grad_o, grad_o_dot)
    o64, o_dot64, grads64 = _dual_grads(attention_dual_reference, x, tangents, grad_o, grad_o_dot, torch.float64)
    _assert_close(o, o64, TOL[dtype], "O", seed)
    _assert_close(o_dot, o_dot64, TOL[dtype], "O_dot", seed)
    for name, g, g64 in zip(GRAD_NAMES, grads, grads64):
        assert (g is None) == (g64 is None), f"{name}: None mismatch (seed={seed})"
        if g is not None:
            _assert_close(g, g64, GRAD_TOL[dtype], name, seed)
    return o, o_dot


def _check_plain(x, dtype, seed, label=""):
    """The plain kernel's O and dQ, dK, dV against the float64 reference; returns O."""
    q, k, v = (_leaf(x[n]) for n in ("q", "k", "v"))
    o = attn.attention_triton(q, k, v)
    grads = torch.autograd.grad((o * x["grad_o"]).sum(), (q, k, v))
    q64, k64, v64 = (_leaf(x[n], torch.float64) for n in ("q", "k", "v"))
    o64 = attention_reference(q64, k64, v64)
    grads64 = torch.autograd.grad((o64 * x["grad_o"].double()).sum(), (q64, k64, v64))
    _assert_close(o, o64, TOL[dtype], f"{label}O", seed)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        _assert_close(g, g64, GRAD_TOL[dtype], f"{label}{name}", seed)
    return o


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_forward_and_backward(shape, dtype, seed):
    """O, dQ, dK, dV of the plain op against the float64 reference."""
    x = _make(seed, shape, dtype)
    assert _check_plain(x, dtype, seed).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_dual_forward_and_backward(shape, dtype, seed):
    """O, Ȯ and the gradients of <G, O> + <Ġ, Ȯ> w.r.t. all six inputs."""
    x = _make(seed, shape, dtype)
    tangents = (x["q_dot"], x["k_dot"], x["v_dot"])
    o, o_dot = _check_dual(x, tangents, x["grad_o"], x["grad_o_dot"], dtype, seed)
    assert o.dtype == dtype and o_dot.dtype == dtype


@pytest.mark.parametrize(
    "present, upstream",
    [
        ((True, False, False), "both"),
        ((False, True, False), "both"),
        ((False, False, True), "both"),
        ((True, True, True), "o_only"),
        ((True, False, True), "o_dot_only"),
    ],
    ids=["q_dot", "k_dot", "v_dot", "grad-O-only", "grad-Odot-only"],
)
def test_dual_partial_tangents_and_grads(present, upstream, seed):
    """None tangents (= zero) and losses that use only O or only Ȯ (None upstream gradients)."""
    dtype = torch.float32
    x = _make(seed, (1, 2, 48, 32), dtype)
    tangents = tuple(x[n] if p else None for n, p in zip(("q_dot", "k_dot", "v_dot"), present))
    grad_o = None if upstream == "o_dot_only" else x["grad_o"]
    grad_o_dot = None if upstream == "o_only" else x["grad_o_dot"]
    _check_dual(x, tangents, grad_o, grad_o_dot, dtype, seed)


@pytest.mark.parametrize("form", ["plain", "dual"])
def test_fp32_grads_at_peaked_rows_near_autograd_precision(form, seed):
    """float32 gradients where the softmax is peaked (scores up to ~±30), 48 heads: per head, the
    RMS error of every gradient against the float64 reference, summed, as a ratio to float32
    autograd's through the reference on the same inputs; the median over heads within 2x.
    Measured (interpreter, 60 draws each, lse saved in base 2): plain 1.35–1.69, median 1.52
    (the recomputed P carries the rounding of the saved lse and of the base-2 scores); dual
    1.02–1.35, median 1.19. On the same measure a float32 emulation of a backward that trusts the
    rounded lse without renormalising the row gives 2.0–3.0x (plain; see the C++ test). The
    pooled ratio this test used before (6 heads, bound 3x) is decided by one ill-conditioned
    head; see _op_checks.median_head_error_ratio.
    The interpreter only: on CUDA, float32 dots are 3xTF32/TF32 and autograd's are cuBLAS's."""
    if DEVICE == "cuda":
        pytest.skip("compares float32 rounding with autograd's on the CPU")
    x = _make(seed, (24, 2, 23, 8), torch.float32)
    x["q"] = x["q"] * 8.0

    def grads(fn, dtype):
        if form == "plain":
            q, k, v = (_leaf(x[n], dtype) for n in ("q", "k", "v"))
            return torch.autograd.grad((fn(q, k, v) * x["grad_o"].to(dtype)).sum(), (q, k, v))
        tangents = (x["q_dot"], x["k_dot"], x["v_dot"])
        return _dual_grads(fn, x, tangents, x["grad_o"], x["grad_o_dot"], dtype)[2]

    kernel, reference = ((attn.attention_triton, attention_reference) if form == "plain"
                         else (attn.attention_dual_triton, attention_dual_reference))
    ratio = checks.median_head_error_ratio(grads(kernel, torch.float32), grads(reference, torch.float32),
                                           grads(reference, torch.float64))
    assert ratio <= 2.0, (
        f"seed={seed}: {form} Triton float32 gradient error is {ratio:.2f}x autograd's (median over heads)")


def test_func_grad(seed):
    x = _make(seed, (1, 2, 37, 16), torch.float32)
    checks.check_attention_func_grad(attn.attention_triton, attn.attention_dual_triton, attention_reference,
                                     attention_dual_reference, x, GRAD_TOL[torch.float32], seed)


def test_double_backward_raises(seed):
    x = _make(seed, (1, 2, 37, 16), torch.float32)
    checks.check_attention_double_backward(attn.attention_triton, attn.attention_dual_triton, attention_reference,
                                           attention_dual_reference, x, GRAD_TOL[torch.float32], seed)


def test_dual_without_tangents_returns_none(seed):
    x = _make(seed, (1, 1, 48, 16), torch.float32)
    o, o_dot = attn.attention_dual_triton(x["q"], None, x["k"], None, x["v"], None)
    assert o_dot is None
    _assert_close(o, attention_reference(x["q"].double(), x["k"].double(), x["v"].double()),
                  TOL[torch.float32], "O", seed)


def test_cross_attention_shapes_and_tiles(seed, monkeypatch):
    """Lq != Lk, value head dim != query head dim, and asymmetric 16×32 / 32×16 tiles."""
    dtype = torch.float32
    monkeypatch.setattr(attn, "DEBUG_BLOCK_OVERRIDE", {
        "fwd": (16, 32), "dual": (32, 16), "bwd_dkdv": (16, 32), "bwd_dq": (32, 16),
        "dual_bwd_dkdv": (32, 16), "dual_bwd_dq": (16, 32)})
    x = _make(seed, (1, 2, 40, 32), dtype, shape_k=77, head_dim_v=16)
    tangents = (x["q_dot"], x["k_dot"], x["v_dot"])
    _check_dual(x, tangents, x["grad_o"], x["grad_o_dot"], dtype, seed)
    _check_plain(x, dtype, seed, "plain ")


def test_dual_large_row_offset_in_s_dot(seed):
    """Ṡ with a large per-row constant (k̇ = common vector u) leaves Ȯ unchanged; in fp16 the
    centred accumulation must not lose Ȯ to cancellation against μ·O."""
    dtype = torch.float16
    x = _make(seed, (1, 2, 64, 32), dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(1, 2, 1, 32, generator=gen, dtype=torch.float64) * 30.0
    k_dot = (u + 0.1 * x["k_dot"].double().cpu()).to(dtype).to(DEVICE)
    o, o_dot = attn.attention_dual_triton(x["q"], x["q_dot"], x["k"], k_dot, x["v"], x["v_dot"])
    d = {n: x[n].double() for n in ("q", "q_dot", "k", "v", "v_dot")}
    o64, o_dot64 = attention_dual_reference(d["q"], d["q_dot"], d["k"], k_dot.double(), d["v"], d["v_dot"])
    _assert_close(o, o64, TOL[dtype], "O", seed)
    _assert_close(o_dot, o_dot64, TOL[dtype], "O_dot", seed)


def test_func_jvp_then_backward_through_tangent(seed):
    """torch.func.jvp of the plain op uses the dual kernel; backward through Ȯ reaches all six."""
    x = _make(seed, (1, 2, 48, 16), torch.float32)
    leaves = {n: _leaf(x[n]) for n in ("q", "q_dot", "k", "k_dot", "v", "v_dot")}
    o, o_dot = torch.func.jvp(attn.attention_triton, (leaves["q"], leaves["k"], leaves["v"]),
                              (leaves["q_dot"], leaves["k_dot"], leaves["v_dot"]))
    loss = (o * x["grad_o"]).sum() + (o_dot * x["grad_o_dot"]).sum()
    grads = torch.autograd.grad(loss, [leaves[n] for n in ("q", "q_dot", "k", "k_dot", "v", "v_dot")])
    tangents = (x["q_dot"], x["k_dot"], x["v_dot"])
    o64, o_dot64, grads64 = _dual_grads(attention_dual_reference, x, tangents, x["grad_o"],
                                        x["grad_o_dot"], torch.float64)
    _assert_close(o, o64, TOL[torch.float32], "O", seed)
    _assert_close(o_dot, o_dot64, TOL[torch.float32], "O_dot", seed)
    for name, g, g64 in zip(GRAD_NAMES, grads, grads64):
        _assert_close(g, g64, GRAD_TOL[torch.float32], name, seed)


def test_forward_ad_make_dual(seed):
    x = _make(seed, (1, 1, 48, 16), torch.float32)
    with fwAD.dual_level():
        o = attn.attention_triton(fwAD.make_dual(x["q"], x["q_dot"]), x["k"],
                                  fwAD.make_dual(x["v"], x["v_dot"]))
        o_dot = fwAD.unpack_dual(o).tangent
    d = {n: x[n].double() for n in ("q", "q_dot", "k", "v", "v_dot")}
    _, o_dot64 = attention_dual_reference(d["q"], d["q_dot"], d["k"], None, d["v"], d["v_dot"])
    _assert_close(o_dot, o_dot64, TOL[torch.float32], "O_dot", seed)


def test_compile_fullgraph(seed):
    """Both public functions trace into one graph (custom ops + fake kernels), fwd and bwd."""
    torch._dynamo.reset()
    x = _make(seed, (1, 1, 48, 16), torch.float32)

    def loss_fn(q, q_dot, k, k_dot, v, v_dot):
        o, o_dot = attn.attention_dual_triton(q, q_dot, k, k_dot, v, v_dot)
        return (attn.attention_triton(q, k, v) * o).sum() + o_dot.square().sum()

    names = ("q", "q_dot", "k", "k_dot", "v", "v_dot")
    eager_in = [_leaf(x[n]) for n in names]
    compiled_in = [_leaf(x[n]) for n in names]
    eager = loss_fn(*eager_in)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)(*compiled_in)
    eager_grads = torch.autograd.grad(eager, eager_in)
    compiled_grads = torch.autograd.grad(compiled, compiled_in)
    _assert_close(compiled, eager, 1e-6, "loss", seed)
    for name, g, ge in zip(GRAD_NAMES, compiled_grads, eager_grads):
        _assert_close(g, ge, 1e-6, name, seed)


@pytest.mark.slow
def test_compile_inductor(seed):
    torch._dynamo.reset()
    x = _make(seed, (1, 1, 48, 16), torch.float32)
    fn = torch.compile(lambda q, k, v: attn.attention_triton(q, k, v) * 2.0, fullgraph=True)
    q, k, v = (_leaf(x[n]) for n in ("q", "k", "v"))
    o = fn(q, k, v)
    grads = torch.autograd.grad((o * x["grad_o"]).sum(), (q, k, v))
    q64, k64, v64 = (_leaf(x[n], torch.float64) for n in ("q", "k", "v"))
    o64 = attention_reference(q64, k64, v64) * 2.0
    grads64 = torch.autograd.grad((o64 * x["grad_o"].double()).sum(), (q64, k64, v64))
    _assert_close(o, o64, TOL[torch.float32], "O", seed)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        _assert_close(g, g64, GRAD_TOL[torch.float32], name, seed)


@pytest.mark.slow
@pytest.mark.parametrize("op_name", ["attention_fwd", "attention_dual_fwd"])
def test_opcheck(op_name, seed):
    """Schema, fake kernel, autograd registration and AOT dispatch of the custom ops."""
    x = _make(seed, (1, 1, 32, 16), torch.float32)
    q, q_dot, k, k_dot, v, v_dot = (_leaf(x[n]) for n in ("q", "q_dot", "k", "k_dot", "v", "v_dot"))
    op = getattr(torch.ops.fastflow_triton, op_name).default
    args = (q, k, v) if op_name == "attention_fwd" else (q, q_dot, k, None, v, v_dot)
    torch.library.opcheck(op, args)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dual_multi_head_d64(dtype, seed):
    """A few more heads and rows: B·H = 4, L = 130 (5 tiles of 32, last one ragged), D = 64."""
    x = _make(seed, (2, 2, 130, 64), dtype)
    tangents = (x["q_dot"], x["k_dot"], x["v_dot"])
    _check_dual(x, tangents, x["grad_o"], x["grad_o_dot"], dtype, seed)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 4, 1000, 128), (1, 2, 4096, 64), (4, 4, 256, 32)],
                         ids=["L1000-D128", "L4096-D64", "L256-D32"])
def test_gpu_dual_large(shape, dtype, seed):
    """GPU only: production tile sizes, bf16, long sequences (reference in float64 on the GPU)."""
    x = _make(seed, shape, dtype)
    tangents = (x["q_dot"], x["k_dot"], x["v_dot"])
    _check_dual(x, tangents, x["grad_o"], x["grad_o_dot"], dtype, seed)
    _check_plain(x, dtype, seed, "plain ")
