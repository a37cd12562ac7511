"""Fused kernels train like the reference: the tiny config trained a few hundred steps with
``model.fused_kernels=true`` and with ``false`` gives the same loss curve, for Flow Matching and for
Flow Map Matching with the ``dual`` derivative backend.

On the CPU the fused path is the C++ extension (``csrc/``); on CUDA (the GPU suite runs
``tests/test_kernels_*.py``) it is the Triton kernels. The Triton interpreter is far too slow for
hundreds of full-UNet steps, so under ``TRITON_INTERPRET=1`` only the C++ path runs here.

Both runs start from the same weights and see the same batches and the same noise (per-step seeds),
so they differ only by the kernels' float32 rounding. Training amplifies that difference step by
step, so the curves are compared as they would be read: the first steps almost exactly, then
moving averages over windows, and both must actually learn.
"""

import pytest

# The trainer's dependencies (the GPU suite runs this file on machines that have only what torch
# brought): a clear skip, not a collection error.
np = pytest.importorskip("numpy")
for _module in ("yaml", "PIL", "sklearn"):
    pytest.importorskip(_module, reason=f"the tiny training config needs {_module}")

import torch  # noqa: E402

from fastflow import ops  # noqa: E402
from fastflow.train.loop import Trainer, step_seed  # noqa: E402

STEPS = 200
WINDOW = 40
# (first-steps rtol, windowed-mean rtol). Measured on the CPU (C++ vs reference, 300 steps): first
# steps ≤ 2e-7, windows ≤ 2e-4 (FMM) and 0 (FM). CUDA allows for TF32 in the convolutions.
TOL = {"cpu": (1e-5, 1e-2), "cuda": (2e-3, 3e-2)}

DEVICES = [
    pytest.param("cpu", id="cpu-cpp"),
    pytest.param("cuda", id="cuda-triton", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ]),
]
CASES = [
    pytest.param("flow_matching", (), id="fm"),
    pytest.param("flow_map_matching", ("flow_map_matching.derivative=dual",), id="fmm-dual"),
]


def _count_calls(monkeypatch, backend: str) -> dict:
    """Wrap the backend's op table so the test can prove the fused implementation ran."""
    table = ops._load_backend(backend)
    assert table is not None, f"fused backend {backend!r} is not available in this process"
    counts = {name: 0 for name in table}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in list(table.items()):
        monkeypatch.setitem(table, name, counted(name, fn))
    return counts


def _loss_curve(cfg, steps: int):
    """Per-step training losses of a fresh Trainer on ``cfg`` (the loop's own step and seeding)."""
    torch.manual_seed(0)
    trainer = Trainer(cfg, quiet=True)
    trainer.method.train()
    trainer._data_iter = iter(trainer.loader)
    losses = []
    for _ in range(steps):
        batch = trainer._next_batch()
        torch.manual_seed(step_seed(cfg.infrastructure.seed, 0, trainer.step))
        metrics = trainer._train_step(batch)
        trainer.step += 1
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all(), losses
    return np.asarray(losses)


@pytest.mark.parametrize("method,extra", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_and_reference_loss_curves_agree(tiny_config, monkeypatch, device, method, extra):
    dev = torch.device(device)
    backend = ops.fused_backend_for(dev)
    expected = {"cpu": "cpp", "cuda": "triton"}[device]
    if backend != expected:
        pytest.skip(f"fused ops on {device} resolve to {backend!r} here (FASTFLOW_OPS_BACKEND or missing build)")

    def config(fused: bool):
        return tiny_config(method, *extra, f"infrastructure.device={device}", f"training.num_iterations={STEPS}",
                           f"model.fused_kernels={str(fused).lower()}", f"logging.run_name=fused-{fused}")

    reference = _loss_curve(config(False), STEPS)
    counts = _count_calls(monkeypatch, backend)
    fused = _loss_curve(config(True), STEPS)

    # The fused path really ran: every GroupNorm (+FiLM+SiLU) and the attention of each step; FMM's
    # dual backend also runs the dual forms.
    assert counts["gn_film_silu"] >= STEPS and counts["attention"] >= STEPS, counts
    if method == "flow_map_matching":
        assert counts["gn_film_silu_dual"] >= STEPS and counts["attention_dual"] >= STEPS, counts

    # Same start: identical weights, batch and noise; only float32 rounding differs.
    first_tol, window_tol = TOL[device]
    np.testing.assert_allclose(fused[:3], reference[:3], rtol=first_tol, err_msg=f"{method} on {device}: first steps")
    # Same curve: windowed means agree (FMM's derivative target is the noisier one).
    ref_w = reference.reshape(-1, WINDOW).mean(axis=1)
    fused_w = fused.reshape(-1, WINDOW).mean(axis=1)
    rel = np.abs(fused_w - ref_w) / ref_w
    assert rel.max() < window_tol, f"{method} on {device}: windowed loss means differ by {rel.max():.3%}\n{ref_w}\n{fused_w}"
    # And both learn: the last window is well below the first.
    for name, w in (("reference", ref_w), ("fused", fused_w)):
        assert w[-1] < 0.8 * w[0], f"{method} on {device}, {name}: loss {w[0]:.4f} -> {w[-1]:.4f} did not fall"
