"""End-to-end training: overfitting, exact resume, interruption, checkpoints, sample.py, CLI errors."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastflow.train import checkpoint as ckpt_io
from fastflow.train.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _weights(trainer: Trainer):
    return {k: v.clone() for k, v in trainer.method.state_dict().items()}


def _losses(trainer: Trainer, steps: int):
    """Run ``steps`` train steps directly, returning the per-step losses (no logging)."""
    trainer.method.train()
    trainer._data_iter = iter(trainer.loader)
    out = []
    for _ in range(steps):
        batch = trainer._next_batch()
        torch.manual_seed(1000 + trainer.step)
        metrics = trainer._train_step(batch)
        trainer.step += 1
        out.append(float(metrics["loss"]))
    return out


# The noise and times are redrawn every step, so even a memorised batch keeps an irreducible loss
# (the conditional variance of the target); FMM's derivative target is the noisiest.
@pytest.mark.parametrize("method,ratio", [("ddpm", 0.5), ("ddpm_x0", 0.5), ("flow_matching", 0.5), ("flow_map_matching", 0.7)])
def test_overfit_drives_loss_down(tiny_config, method, ratio):
    cfg = tiny_config(method, "training.num_iterations=100", "training.learning_rate=0.003")
    trainer = Trainer(cfg, overfit=True, quiet=True)
    losses = _losses(trainer, 100)
    start, end = np.mean(losses[:10]), np.mean(losses[-10:])
    assert end < ratio * start, f"{method}: loss {start:.4f} -> {end:.4f} on one fixed batch"


@pytest.mark.parametrize("method", ["flow_map_matching", "ddpm"])
def test_resume_is_exact(tiny_config, method):
    """N steps straight == k steps, checkpoint, new process state, N - k steps (bitwise on CPU)."""
    n, k = 6, 3
    straight = Trainer(tiny_config(method, f"training.num_iterations={n}", "logging.run_name=straight"), quiet=True)
    straight.train()

    first = Trainer(tiny_config(method, f"training.num_iterations={k}", "logging.run_name=split"), quiet=True)
    summary = first.train()
    assert Path(summary["checkpoint"]).name == f"checkpoint_{k:08d}.pt"
    torch.manual_seed(12345)  # a different global RNG state must not matter
    second = Trainer(
        tiny_config(method, f"training.num_iterations={n}", "logging.run_name=split"),
        resume=summary["checkpoint"], quiet=True,
    )
    assert second.step == k
    second.train()

    a, b = _weights(straight), _weights(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{method}: {key} differs after resume"
    for key in straight.ema.shadow:
        assert torch.equal(straight.ema.shadow[key], second.ema.shadow[key]), f"EMA {key} differs"
    assert straight.loader.state_dict() == second.loader.state_dict()


def test_sigterm_checkpoints_and_resume_continues(tiny_config, monkeypatch):
    """SIGTERM mid-run: the step finishes, a checkpoint is written, and --resume finishes the run
    with the same weights as an uninterrupted one."""
    n = 6
    straight = Trainer(tiny_config("flow_matching", f"training.num_iterations={n}", "logging.run_name=straight"), quiet=True)
    straight.train()

    trainer = Trainer(tiny_config("flow_matching", f"training.num_iterations={n}", "logging.run_name=killed"), quiet=True)
    original = trainer._train_step

    def step_then_signal(batch):
        out = original(batch)
        if trainer.step == 1:  # during the 3rd step (step counter is incremented after)
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer, "_train_step", step_then_signal)
    summary = trainer.train()
    assert summary["interrupted"] and summary["step"] == 2
    assert Path(summary["checkpoint"]).is_file()
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored (no crash on re-install)

    resumed = Trainer(tiny_config("flow_matching", f"training.num_iterations={n}", "logging.run_name=killed"),
                      resume="auto", quiet=True)
    assert resumed.step == 2
    resumed.train()
    for key, value in _weights(straight).items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key


def test_checkpoints_are_atomic_and_pruned(tiny_config, tmp_path):
    cfg = tiny_config("flow_matching", "training.num_iterations=8", "training.save_every=2", "checkpoint.keep_last=2")
    summary = Trainer(cfg, quiet=True).train()
    ckdir = Path(summary["checkpoint"]).parent
    names = sorted(p.name for p in ckdir.iterdir())
    assert names == ["checkpoint_00000006.pt", "checkpoint_00000008.pt"], names  # no temp files left
    ckpt = ckpt_io.load_checkpoint(ckdir)
    for key in ("iteration", "model", "optimizer", "ema", "config", "method_config", "rng", "data"):
        assert key in ckpt, key
    assert ckpt["iteration"] == 8 and ckpt["method_config"]["sigma_min"] == pytest.approx(1e-4)

    # A crash during torch.save leaves the previous file intact and no temp file behind.
    target = ckdir / "checkpoint_00000008.pt"
    before = target.read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("simulated crash mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        ckpt_io.atomic_torch_save({"x": Boom()}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in ckdir.iterdir()) == names

    with pytest.raises(ckpt_io.CheckpointError, match="not found"):
        ckpt_io.resolve_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt_io.CheckpointError, match="no checkpoint_"):
        ckpt_io.resolve_checkpoint(tmp_path / "empty")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError, match="cannot read"):
        ckpt_io.load_checkpoint(bad)


def test_train_writes_grid_tensorboard_and_sample_cli(tiny_config, tmp_path):
    cfg = tiny_config("flow_map_matching", "training.num_iterations=4", "logging.tensorboard=true",
                      "training.sample_every=2", "training.log_every=2")
    summary = Trainer(cfg, quiet=True).train()
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "samples_00000002.png").is_file() and Path(summary["samples"]).is_file()
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/derivative_loss", "train/reconstruction_loss", "perf/img_per_s", "train/grad_norm"):
        assert tag in scalars, (tag, scalars)
    assert "samples" in acc.Tags()["images"]

    ckpt = summary["checkpoint"]
    npz = tmp_path / "s.npz"
    res = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--checkpoint", ckpt, "--method", "FlowMapMatching",
         "--num_samples", "5", "--batch_size", "3", "--num_steps", "2", "--use_ema", "--output", str(npz),
         "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    images = np.load(npz)["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    png = tmp_path / "s.png"
    res = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(Path(ckpt).parent), "--method",
         "FlowMapMatching", "--num_samples", "4", "--output", str(png), "--device", "cpu"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    from PIL import Image

    assert Image.open(png).size[0] > 8
    # Wrong method for the checkpoint: a clear error naming both.
    res = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--checkpoint", ckpt, "--method", "DDIM", "--output", str(png)],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert res.returncode != 0 and "flow_map_matching" in res.stderr


def test_sample_cli_ddpm_ddim_and_prefixes(tiny_config, tmp_path):
    """DDPM/DDIM sampling from a checkpoint whose keys carry DDP/compile prefixes."""
    summary = Trainer(tiny_config("ddpm", "training.num_iterations=2"), quiet=True).train()
    ckpt = torch.load(summary["checkpoint"], weights_only=False)
    ckpt["model"] = {f"module._orig_mod.{k}": v for k, v in ckpt["model"].items()}
    prefixed = tmp_path / "prefixed.pt"
    torch.save(ckpt, prefixed)
    for method, extra in (("DDIM", ["--num_steps", "5", "--eta", "0.5"]), ("DDPM", [])):
        out = tmp_path / f"{method}.npz"
        res = subprocess.run(
            [sys.executable, str(REPO / "sample.py"), "--checkpoint", str(prefixed), "--method", method,
             "--num_samples", "2", "--output", str(out), "--device", "cpu", *extra],
            capture_output=True, text=True, env=ENV, timeout=300,
        )
        assert res.returncode == 0, res.stderr
        assert np.load(out)["images"].shape == (2, 8, 8, 1)


def test_bad_data_root_is_a_clear_error(tiny_config, tmp_path):
    missing = tmp_path / "no-such-folder"
    cfg = tiny_config("flow_matching", "data.dataset=folder", f"data.root={missing}")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Trainer(cfg, quiet=True)


def test_train_cli_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  batchsize: 3\n")
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(bad)],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 2 and "batchsize" in res.stderr and str(bad) in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/fmm_digits.yaml"),
                          "training.learning_rate=fast"], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 2 and "training.learning_rate" in res.stderr and "fast" in res.stderr


def test_channels_last_trains_like_contiguous(tiny_config):
    """infrastructure.channels_last: weights and every batch in channels_last (converted once, when
    the batch reaches the device); the numbers are those of the contiguous layout."""
    runs = {}
    for layout in ("false", "true"):
        trainer = Trainer(tiny_config("flow_map_matching", f"infrastructure.channels_last={layout}",
                                      f"logging.run_name=cl-{layout}"), quiet=True)
        moved = trainer._to_device(torch.randn(2, 3, 8, 8))  # 3 channels: the layouts differ (1 does not)
        conv = next(m for m in trainer.method.modules() if isinstance(m, torch.nn.Conv2d))
        expected = torch.channels_last if layout == "true" else torch.contiguous_format
        assert moved.is_contiguous(memory_format=expected) and conv.weight.is_contiguous(memory_format=expected)
        assert moved.is_contiguous() == (layout == "false")
        runs[layout] = _losses(trainer, 4)
    np.testing.assert_allclose(runs["true"], runs["false"], rtol=1e-5)


def test_profiler_writes_a_tensorboard_trace_with_shapes_and_memory(tiny_config):
    """logging.profile: torch.profiler on the wait/warmup/active schedule → <run>/profile/*.pt.trace.json."""
    import json

    cfg = tiny_config("flow_map_matching", "training.num_iterations=6", "logging.profile=true",
                      "logging.profile_wait=1", "logging.profile_warmup=1", "logging.profile_active=2")
    trainer = Trainer(cfg, quiet=True)
    trainer.train()
    traces = sorted((trainer.run_dir / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1, traces  # repeat=1: one active window, one trace
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}, steps  # steps 0 wait, 1 warmup, 2-3 active
    assert any("Input Dims" in e.get("args", {}) for e in events), "record_shapes: no input shapes in the trace"
    assert any(e.get("name") == "[memory]" for e in events), "profile_memory: no memory events in the trace"
    assert any(e.get("name") == "aten::convolution" for e in events)


@pytest.mark.parametrize("history", [False, True])
def test_oom_writes_a_memory_snapshot_and_reraises(tiny_config, monkeypatch, capsys, request, history):
    """train_from_config on a CUDA OOM: record history when asked, dump <run>/oom_snapshot_rank0.pickle,
    say where, re-raise. (CUDA is simulated: the CPU run raises the OOM itself.)"""
    from fastflow.train import loop

    calls = {"record": 0}

    def dump(path):
        Path(path).write_bytes(b"snapshot")

    def oom(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # train_from_config sets these on CUDA; put them back afterwards
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    request.addfinalizer(lambda: (setattr(torch.backends.cuda.matmul, "allow_tf32", flags[0]),
                                  setattr(torch.backends.cudnn, "allow_tf32", flags[1]),
                                  setattr(torch.backends.cudnn, "benchmark", flags[2])))
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.__setitem__("record", calls["record"] + 1))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    monkeypatch.setattr(loop.Trainer, "train", oom)
    cfg = tiny_config("flow_matching", f"logging.memory_history={str(history).lower()}")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        loop.train_from_config(cfg, quiet=True)
    snapshot = Path(cfg.logging.dir) / "test" / "oom_snapshot_rank0.pickle"
    assert snapshot.read_bytes() == b"snapshot"
    err = capsys.readouterr().err
    assert str(snapshot) in err and ("allocator state only" in err) == (not history)
    assert calls["record"] == int(history)
