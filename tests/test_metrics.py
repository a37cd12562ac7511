"""Throughput accounting: FLOP counts, device peaks, MFU in the training log."""

import pytest
import torch

from fastflow.train.loop import Trainer
from fastflow.train.metrics import count_flops, device_peak_flops, peak_flops_for_name


def test_count_flops_linear_forward_and_backward():
    batch, fan_in, fan_out = 7, 13, 5
    layer = torch.nn.Linear(fan_in, fan_out)
    x = torch.randn(batch, fan_in, requires_grad=True)

    def step():
        layer(x).sum().backward()

    # forward 2·B·I·O, backward 2·B·I·O for dx and 2·B·I·O for dW (bias adds are not counted)
    assert count_flops(step) == 6 * batch * fan_in * fan_out


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H200", 989.4e12), ("NVIDIA GH200 480GB", 989.4e12), ("NVIDIA H100 80GB HBM3", 989.4e12),
    ("NVIDIA H100 PCIe", 756.0e12), ("NVIDIA H200 NVL", 835.0e12), ("NVIDIA H100 NVL", 835.0e12),
    ("NVIDIA A100-SXM4-80GB", 312.0e12), ("NVIDIA A10G", 70.0e12),
    ("NVIDIA A10", 125.0e12), ("Tesla T4", None), ("NVIDIA A100 80GB PCIe", 312.0e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA L40S", 362.1e12),
    # names that hold a key as a substring only: no peak (before: the A100's, the A10's, the H100's)
    ("NVIDIA RTX A1000", None), ("NVIDIA RTX A10000", None), ("NVIDIA RTX A6000", None), ("NVIDIA XH1000", None),
])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops_for_name(name) == peak


def test_no_peak_on_the_cpu():
    assert device_peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("method", ["flow_matching", "flow_map_matching"])
def test_step_flops_probe_scales_to_the_batch_and_moves_no_state(tiny_config, method):
    """The Trainer counts a step's FLOPs on a 2-image probe and scales them to the batch: that must
    equal counting a full batch, and must not move the RNG or FMM's step counter."""
    trainer = Trainer(tiny_config(method, "training.batch_size=6"), quiet=True)
    torch.manual_seed(3)
    rng = torch.get_rng_state()
    state = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    probe_flops = trainer._measure_flops(6)
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in trainer.method.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed while counting FLOPs"
    assert all(p.grad is None for p in trainer.method.parameters())

    trainer.method.eval()
    batch = torch.randn(6, *trainer.image_shape)

    def full():
        loss, _ = trainer.method.compute_loss(batch)
        loss.backward()

    assert probe_flops == count_flops(full) > 0


def test_step_flops_count_the_fused_kernels_too(tiny_config):
    """The flop counter cannot see inside the fused (custom-op) kernels: without counting on the
    reference ops, fused_kernels=true dropped the attention matmuls from MFU."""
    counts = {}
    for fused in ("false", "true"):
        trainer = Trainer(tiny_config("flow_map_matching", "training.batch_size=4",
                                      f"model.fused_kernels={fused}"), quiet=True)
        counts[fused] = trainer._measure_flops(4)
    assert counts["true"] == counts["false"] > 0


def test_log_reports_mfu_img_per_s_and_seconds_per_1k(tiny_config):
    trainer = Trainer(tiny_config("flow_matching", "training.batch_size=8"), quiet=True)
    assert trainer.flops_per_step is None  # the CPU has no datasheet peak: no MFU claimed
    trainer.peak_flops, trainer.flops_per_step = 1e12, 5e10
    perf = trainer._perf(images=80, seconds=2.0)  # 10 steps of 8 images in 2 s: 5 steps/s
    assert perf["img_per_s"] == pytest.approx(40.0)
    assert perf["sec_per_1k_img"] == pytest.approx(25.0)
    assert perf["mfu"] == pytest.approx(5e10 * 5 / 1e12)
    assert perf["peak_mem_gb"] > 0
