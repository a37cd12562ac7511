"""Checks shared by the fused-op test files (C++ in test_cpp_ops.py, Triton in test_kernels_*.py):
one implementation against the PyTorch reference under autograd and the torch.func transforms.

``impl``/``reference`` follow the positional contract of ``fastflow.ops.reference``:
``gn(x, weight, bias, scale, shift, groups, eps, silu)`` and
``gn_dual(x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, groups, eps, silu)``.
``inp`` holds x, x_dot, weight, bias, scale, scale_dot, shift, shift_dot, grad_y, grad_y_dot.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD


def assert_close(actual, expected, tol, what, seed):
    """Max error relative to max(1, max |expected|), with shape/dtype/finiteness checks first."""
    assert actual is not None and expected is not None, f"{what}: missing tensor (seed={seed})"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} (seed={seed})"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype} (seed={seed})"
    actual64 = actual.detach().double()
    assert torch.isfinite(actual64).all(), (
        f"{what}: {int((~torch.isfinite(actual64)).sum())} non-finite elements (unwritten output?) (seed={seed})")
    scale = max(1.0, expected.detach().abs().max().item())
    err = (actual64 - expected.detach().double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g} (seed={seed})"


def median_head_error_ratio(grads, other_grads, reference_grads) -> float:
    """How much less precise ``grads`` is than ``other_grads`` (both against float64
    ``reference_grads``; tensors shaped (B, H, ...)): per (batch, head), the RMS error of every
    gradient summed, taken as the ratio grads / other_grads; the median of that over heads.

    The median, not a pooled figure: the float32 rounding of the scores S alone moves a pooled
    error by ~5x from draw to draw at peaked rows (float64 emulation with S rounded to float32
    only: dK RMS error 0.4e-5 ... 3.2e-5 on one head), so one ill-conditioned head decides a
    pooled ratio, whereas a defect of the algorithm (a recomputed P that is not renormalised)
    raises the ratio on every peaked head."""
    def per_head(gs):
        return sum((g.double() - r.double()).pow(2).flatten(2).mean(-1).sqrt()
                   for g, r in zip(gs, reference_grads))

    return (per_head(grads) / per_head(other_grads)).median().item()


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def check_gn_jvp_then_backward(impl, reference, inp, groups, eps, tol, grad_tol, seed):
    """torch.func.jvp runs the op's jvp rule (its dual kernel); a loss on (y, ẏ) then backpropagates
    to x, scale, shift and weight."""
    results = []
    for fn_impl in (impl, reference):
        primals = [leaf(inp[n]) for n in ("x", "scale", "shift")]
        weight = leaf(inp["weight"])
        fn = lambda x, scale, shift: fn_impl(x, weight, inp["bias"], scale, shift, groups, eps, True)  # noqa: E731
        y, y_dot = torch.func.jvp(fn, tuple(primals), tuple(inp[n] for n in ("x_dot", "scale_dot", "shift_dot")))
        loss = (y * inp["grad_y"]).sum() + (y_dot * inp["grad_y_dot"]).sum()
        results.append((y, y_dot, torch.autograd.grad(loss, primals + [weight])))
    (y, y_dot, grads), (y_ref, y_dot_ref, grads_ref) = results
    assert_close(y, y_ref, tol, "y", seed)
    assert_close(y_dot, y_dot_ref, tol, "y_dot", seed)
    for name, g, g_ref in zip(("x", "scale", "shift", "weight"), grads, grads_ref):
        assert_close(g, g_ref, grad_tol, f"d{name}", seed)


def check_gn_jvp_parameter_tangents(impl, reference, inp, groups, eps, tol, grad_tol, seed):
    """Tangents on weight/bias (the PyTorch term) together with an x tangent (the kernel), with and
    without the x tangent; then a loss on ẏ backpropagated to x, weight and bias."""
    tangent_sets = {"x+params": (inp["x_dot"], inp["scale_dot"][0], inp["shift_dot"][0]),
                    "params only": (torch.zeros_like(inp["x_dot"]), inp["scale_dot"][0], inp["shift_dot"][0])}
    for label, tangents in tangent_sets.items():
        results = []
        for fn in (impl, reference):
            primals = [leaf(inp[n]) for n in ("x", "weight", "bias")]
            _, y_dot = torch.func.jvp(lambda x, w, b: fn(x, w, b, inp["scale"], inp["shift"], groups, eps, True),
                                      tuple(primals), tangents)
            results.append((y_dot, torch.autograd.grad((y_dot * inp["grad_y_dot"]).sum(), primals)))
        (y_dot, grads), (y_dot_ref, grads_ref) = results
        assert_close(y_dot, y_dot_ref, tol, f"{label}: y_dot", seed)
        for name, g, g_ref in zip(("x", "weight", "bias"), grads, grads_ref):
            assert_close(g, g_ref, grad_tol, f"{label}: d{name} through y_dot", seed)


def check_gn_forward_ad(impl, reference, inp, groups, eps, tol, seed):
    """torch.autograd.forward_ad dual tensors through the op (tangents on x and scale)."""
    def plain(fn):
        return lambda x, scale, shift: fn(x, inp["weight"], inp["bias"], scale, shift, groups, eps, True)

    y_dot_ref = torch.func.jvp(plain(reference), (inp["x"], inp["scale"], inp["shift"]),
                               (inp["x_dot"], inp["scale_dot"], torch.zeros_like(inp["shift"])))[1]
    with fwAD.dual_level():
        x = fwAD.make_dual(inp["x"], inp["x_dot"])
        scale = fwAD.make_dual(inp["scale"], inp["scale_dot"])
        y_dot = fwAD.unpack_dual(plain(impl)(x, scale, inp["shift"])).tangent
    assert_close(y_dot, y_dot_ref, tol, "y_dot", seed)


def check_gn_func_grad(impl, impl_dual, reference, reference_dual, inp, groups, eps, grad_tol, seed):
    """torch.func.grad through the plain op and the dual op (custom ops with register_autograd
    alone cannot be transformed)."""
    def grads_of(fn_plain, fn_dual):
        def loss(x, scale):
            y = fn_plain(x, inp["weight"], inp["bias"], scale, inp["shift"], groups, eps, True)
            _, y_dot = fn_dual(y, inp["x_dot"], None, None, scale, inp["scale_dot"], None, None, groups, eps, False)
            return (y_dot * inp["grad_y_dot"]).sum()

        return torch.func.grad(loss, argnums=(0, 1))(inp["x"], inp["scale"])

    grads, grads_ref = grads_of(impl, impl_dual), grads_of(reference, reference_dual)
    for name, g, g_ref in zip(("x", "scale"), grads, grads_ref):
        assert_close(g, g_ref, grad_tol, f"d{name}", seed)


def check_attention_func_grad(impl, impl_dual, reference, reference_dual, inp, grad_tol, seed):
    """torch.func.grad through the plain and the dual attention (custom ops with
    register_autograd alone cannot be transformed): a loss on O of the plain op plus one on
    (O, Ȯ) of the dual, differentiated in q, q̇, k, v."""
    def grads_of(plain, dual):
        def loss(q, q_dot, k, v):
            o = plain(q, k, v)
            o2, o2_dot = dual(q, q_dot, k, inp["k_dot"], v, inp["v_dot"])
            return ((o + o2) * inp["grad_o"]).sum() + (o2_dot * inp["grad_o_dot"]).sum()

        return torch.func.grad(loss, argnums=(0, 1, 2, 3))(inp["q"], inp["q_dot"], inp["k"], inp["v"])

    grads, grads_ref = grads_of(impl, impl_dual), grads_of(reference, reference_dual)
    for name, g, g_ref in zip(("q", "q_dot", "k", "v"), grads, grads_ref):
        assert_close(g, g_ref, grad_tol, f"d{name}", seed)


def _assert_second_order_raises(penalty, wrt, op, seed, what):
    """A backward through the fused op's backward must raise the guard's error naming ``op``
    (fastflow/ops/autograd_guard.py), never return partial or None gradients."""
    import pytest

    with pytest.raises(RuntimeError, match=rf"fastflow\.ops\.{op}: the fused kernel's backward is not differentiable"):
        torch.autograd.grad(penalty, wrt, allow_unused=True)
        raise AssertionError(f"{what}: second-order gradient through {op} returned without error (seed={seed})")


def _check_double_backward(forms, inp, names, grad_tol, seed):
    """For each (form, op, loss(fn, a, b, square), fused, reference): the gradient in ``names[0]``
    with create_graph=True matches the reference's; a penalty on it, differentiated in
    ``names[1]``, raises the guard's error — with an upstream gradient that requires grad
    (square=True: Σ g·y²) and with a constant one (Σ g·y: only the saved inputs carry the
    dependence), and when the penalty also reaches ``names[1]`` by a path around the op (so a
    skipped node would go unnoticed)."""
    for form, op, loss_fn, fused, ref in forms:
        for square in (True, False):
            what = f"{form}, {'Σg·out²' if square else 'Σg·out'}"
            results = []
            for fn in (fused, ref):
                a, b = leaf(inp[names[0]]), leaf(inp[names[1]])
                results.append((b, torch.autograd.grad(loss_fn(fn, a, b, square), a, create_graph=True)[0]))
            (b, grad), (_, grad_ref) = results
            assert_close(grad, grad_ref, grad_tol, f"{what}: d{names[0]} with create_graph=True", seed)
            _assert_second_order_raises((grad * grad).sum(), b, op, seed, what)
            _assert_second_order_raises((grad * grad).sum() + (b * b).sum(), b, op, seed,
                                        f"{what} + a path around the op")


def check_gn_double_backward(impl, impl_dual, reference, reference_dual, inp, groups, eps, grad_tol, seed):
    """create_graph=True through GroupNorm+FiLM+SiLU (plain and dual) keeps dx right; a gradient
    penalty on dx w.r.t. the weight raises (the backward kernels have no derivative)."""
    def plain_loss(fn, x, weight, square):
        y = fn(x, weight, inp["bias"], inp["scale"], inp["shift"], groups, eps, True)
        return ((y * y if square else y) * inp["grad_y"]).sum()

    def dual_loss(fn, x, weight, square):
        y, y_dot = fn(x, inp["x_dot"], weight, inp["bias"], inp["scale"], inp["scale_dot"],
                      inp["shift"], inp["shift_dot"], groups, eps, True)
        return ((y_dot * y_dot if square else y_dot) * inp["grad_y_dot"]).sum() + (y * inp["grad_y"]).sum()

    _check_double_backward((("plain", "gn_film_silu", plain_loss, impl, reference),
                            ("dual", "gn_film_silu_dual", dual_loss, impl_dual, reference_dual)),
                           inp, ("x", "weight"), grad_tol, seed)


def check_attention_double_backward(impl, impl_dual, reference, reference_dual, inp, grad_tol, seed):
    """The attention counterpart of :func:`check_gn_double_backward` (penalty on dq, w.r.t. k)."""
    def plain_loss(fn, q, k, square):
        o = fn(q, k, inp["v"])
        return ((o * o if square else o) * inp["grad_o"]).sum()

    def dual_loss(fn, q, k, square):
        o, o_dot = fn(q, inp["q_dot"], k, inp["k_dot"], inp["v"], inp["v_dot"])
        return ((o_dot * o_dot if square else o_dot) * inp["grad_o_dot"]).sum() + (o * inp["grad_o"]).sum()

    _check_double_backward((("plain", "attention", plain_loss, impl, reference),
                            ("dual", "attention_dual", dual_loss, impl_dual, reference_dual)),
                           inp, ("q", "k"), grad_tol, seed)
