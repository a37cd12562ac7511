"""Shared test set-up: Triton in interpreter mode on CPU-only machines, tiny configs."""

import os

# Must happen before anything imports triton: without a GPU, kernels run in the interpreter.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import random

import pytest

TINY_OVERRIDES = [
    "data.dataset=digits",
    "data.image_size=8",
    "data.channels=1",
    "data.num_workers=0",
    "data.pin_memory=false",
    "data.augment=false",
    "model.base_channels=16",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[4]",
    "model.num_heads=2",
    "model.num_groups=4",
    "model.dropout=0.0",
    "training.batch_size=16",
    "training.learning_rate=0.002",
    "training.weight_decay=0.0",
    "training.ema_decay=0.99",
    "training.ema_start=10",
    "training.log_every=5",
    "training.sample_every=1000000",
    "training.save_every=1000000",
    "training.num_samples=4",
    "ddpm.num_timesteps=100",
    "flow_map_matching.warmup_steps=50",
    "sampling.num_steps=4",
    "infrastructure.device=cpu",
    "infrastructure.mixed_precision=false",
    "logging.progress_bar=false",
    "logging.tensorboard=false",
]


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: a tiny CPU config for ``method`` writing under tmp_path, plus extra overrides."""
    # Imported here, not at the top: the kernel tests need neither PyYAML nor the config, and the
    # GPU suite runs them on machines that have only what torch brought.
    from fastflow.config import load_config

    def make(method: str = "flow_map_matching", *overrides: str):
        return load_config(
            None,
            [f"method={method}", *TINY_OVERRIDES, f"checkpoint.dir={tmp_path}/ckpt",
             f"logging.dir={tmp_path}/logs", "logging.run_name=test", *overrides],
        )

    return make


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (FASTFLOW_TEST_SEED=<n> replays one); torch's global RNG is
    seeded with it. Tests put it in every failure message."""
    env = os.environ.get("FASTFLOW_TEST_SEED")
    value = int(env) if env else random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    return value
