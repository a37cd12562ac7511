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
    handler_before = signal.getsignal(signal.SIGTERM)
    summary = trainer.train()
    assert summary["interrupted"] and summary["step"] == 2 and summary["signal"] == signal.SIGTERM
    assert Path(summary["checkpoint"]).is_file()
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the trainer's handler is gone

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


def test_resume_from_an_earlier_step_sets_later_checkpoints_aside(tiny_config):
    """Resuming a run from step 6 when it already holds step 8 branches it: 8 is moved aside (kept),
    so pruning by step cannot delete the new step 7 and --resume auto picks the new branch."""
    first = Trainer(tiny_config("flow_matching", "training.num_iterations=8", "training.save_every=2",
                                "checkpoint.keep_last=2"), quiet=True).train()
    ckdir = Path(first["checkpoint"]).parent
    branch = Trainer(tiny_config("flow_matching", "training.num_iterations=7", "training.save_every=1",
                                 "checkpoint.keep_last=1"), resume=str(ckdir / "checkpoint_00000006.pt"), quiet=True)
    summary = branch.train()
    assert Path(summary["checkpoint"]).is_file() and Path(summary["checkpoint"]).name == "checkpoint_00000007.pt"
    asides = [p for p in ckdir.iterdir() if p.name.startswith("superseded_")]
    assert len(asides) == 1 and "after_step_00000006" in asides[0].name
    assert sorted(p.name for p in asides[0].iterdir()) == ["checkpoint_00000008.pt"]
    assert ckpt_io.latest_checkpoint(ckdir).name == "checkpoint_00000007.pt"
    auto = Trainer(tiny_config("flow_matching", "training.num_iterations=9"), resume="auto", quiet=True)
    assert auto.step == 7


def test_torchrun_restart_continues_from_its_own_checkpoint(tiny_config, monkeypatch):
    """A job started with --resume <base> that torchrun restarts resumes from its own newest
    checkpoint, not from <base> again (which would rewind everything trained since)."""
    base = Trainer(tiny_config("flow_matching", "training.num_iterations=2", "logging.run_name=base"), quiet=True).train()
    job_cfg = tiny_config("flow_matching", "training.num_iterations=5", "logging.run_name=job")
    job = Trainer(job_cfg, resume=base["checkpoint"], quiet=True)
    assert job.step == 2
    job_ckpt = job.train()["checkpoint"]
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    restarted = Trainer(tiny_config("flow_matching", "training.num_iterations=6", "logging.run_name=job"),
                        resume=base["checkpoint"], quiet=True)
    assert restarted.step == 5 and restarted.resume_path == Path(job_ckpt)
    fresh = Trainer(tiny_config("flow_matching", "training.num_iterations=6", "logging.run_name=other"),
                    resume=base["checkpoint"], quiet=True)
    assert fresh.step == 2  # a restart with nothing of its own yet: the given checkpoint


def test_resume_with_a_different_model_names_file_and_keys(tiny_config):
    ckpt = Trainer(tiny_config("flow_matching", "training.num_iterations=1"), quiet=True).train()["checkpoint"]
    with pytest.raises(ckpt_io.CheckpointError) as info:
        Trainer(tiny_config("flow_matching", "model.base_channels=8", "logging.run_name=other"), resume=ckpt, quiet=True)
    message = str(info.value)
    assert ckpt in message and "model.base_channels (checkpoint 16, now 8)" in message
    with pytest.raises(ckpt_io.CheckpointError, match=r"training.batch_size \(checkpoint 16, now 8\)"):
        Trainer(tiny_config("flow_matching", "training.batch_size=8", "logging.run_name=other2"), resume=ckpt, quiet=True)


def test_a_failed_resume_moves_no_checkpoint_aside(tiny_config):
    """A resume from an earlier step that fails, before loading (another model) or while loading
    (another batch size: the data position does not fit), leaves the run's later checkpoints where
    they were, so --resume auto still finds the newest."""
    first = Trainer(tiny_config("flow_matching", "training.num_iterations=6", "training.save_every=2",
                                "checkpoint.keep_last=3"), quiet=True).train()
    ckdir = Path(first["checkpoint"]).parent
    before = sorted(p.name for p in ckdir.iterdir())
    assert before == ["checkpoint_00000002.pt", "checkpoint_00000004.pt", "checkpoint_00000006.pt"]
    with pytest.raises(ckpt_io.CheckpointError, match=r"model.num_res_blocks \(checkpoint 1, now 2\)"):
        Trainer(tiny_config("flow_matching", "model.num_res_blocks=2"), resume=str(ckdir / "checkpoint_00000002.pt"),
                quiet=True)
    assert sorted(p.name for p in ckdir.iterdir()) == before
    with pytest.raises(ckpt_io.CheckpointError, match=r"training.batch_size \(checkpoint 16, now 8\)"):
        Trainer(tiny_config("flow_matching", "training.batch_size=8"), resume=str(ckdir / "checkpoint_00000002.pt"),
                quiet=True)
    assert sorted(p.name for p in ckdir.iterdir()) == before
    assert Trainer(tiny_config("flow_matching", "training.num_iterations=7"), resume="auto", quiet=True).step == 6


def test_a_run_folder_with_checkpoints_is_never_started_over(tiny_config, monkeypatch):
    """A fresh start, or a resume from another run's checkpoint, into a run that already holds
    checkpoints is refused (naming the run, its newest checkpoint and the way out) and writes nothing."""
    first = Trainer(tiny_config("flow_matching", "training.num_iterations=2"), quiet=True).train()
    ckpt = Path(first["checkpoint"])
    data = ckpt.read_bytes()
    with pytest.raises(ckpt_io.CheckpointError) as info:
        Trainer(tiny_config("flow_matching", "training.num_iterations=2"), quiet=True)
    message = str(info.value)
    assert "'test'" in message and ckpt.name in message and "--resume auto" in message and "logging.run_name" in message
    other = Trainer(tiny_config("flow_matching", "training.num_iterations=1", "logging.run_name=other"),
                    quiet=True).train()["checkpoint"]
    with pytest.raises(ckpt_io.CheckpointError, match="another run's checkpoint"):
        Trainer(tiny_config("flow_matching", "training.num_iterations=3"), resume=other, quiet=True)
    assert ckpt.read_bytes() == data and sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]
    # continuing it is fine
    assert Trainer(tiny_config("flow_matching", "training.num_iterations=3"), resume="auto", quiet=True).step == 2

    # torchrun --max-restarts names a run by its run id; the default id 'none' would share a folder
    from fastflow.config import ConfigError

    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="set logging.run_name"):
        Trainer(tiny_config("flow_matching", "logging.run_name=null"), quiet=True)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    assert Trainer(tiny_config("flow_matching", "logging.run_name=null"), quiet=True).run_name == "flow_matching-job42"


def test_resume_refuses_another_objective_and_takes_the_configs_optimizer_settings(tiny_config, capsys):
    """Keys that set the method's buffers must match (a changed DDPM schedule would otherwise be
    overwritten by the checkpoint's, silently); the learning rate, betas and weight decay come
    from the config, not from the checkpoint's optimizer state; fused kernels may be switched."""
    ckpt = Trainer(tiny_config("ddpm", "training.num_iterations=2", "training.learning_rate=1e-3"),
                   quiet=True).train()["checkpoint"]
    with pytest.raises(ckpt_io.CheckpointError, match=r"ddpm.beta_end \(checkpoint 0.02, now 0.03\)"):
        Trainer(tiny_config("ddpm", "ddpm.beta_end=0.03"), resume=ckpt, quiet=True)
    resumed = Trainer(tiny_config("ddpm", "training.num_iterations=3", "training.learning_rate=5e-4",
                                  "training.betas=[0.8, 0.99]", "training.weight_decay=0.0",
                                  "model.fused_kernels=true"), resume=ckpt)
    assert resumed.step == 2
    for group in resumed.optimizer.param_groups:
        assert group["lr"] == 5e-4 and tuple(group["betas"]) == (0.8, 0.99) and group["weight_decay"] == 0.0
    assert len(resumed.optimizer.state) > 0  # the moments did load
    out = capsys.readouterr().out
    assert "lr 0.001 -> 0.0005" in out and "training.learning_rate 0.001 -> 0.0005" in out
    resumed.train()
    assert ckpt_io.load_checkpoint(Path(ckpt).parent)["optimizer"]["param_groups"][0]["lr"] == 5e-4


def test_a_plain_state_dict_is_refused_by_name(tiny_config, tmp_path):
    """--resume (or sample.py --checkpoint) on a torch file that is not a fastflow checkpoint
    names the file and what it lacks, instead of a bare KeyError."""
    trainer = Trainer(tiny_config("flow_matching"), quiet=True)
    plain = tmp_path / "weights.pt"
    torch.save(trainer.method.model.state_dict(), plain)
    with pytest.raises(ckpt_io.CheckpointError) as info:
        Trainer(tiny_config("flow_matching", "logging.run_name=other"), resume=str(plain), quiet=True)
    assert str(plain) in str(info.value) and "iteration" in str(info.value) and "optimizer" in str(info.value)
    res = subprocess.run([sys.executable, str(REPO / "sample.py"), "--checkpoint", str(plain), "--method", "FlowMatching",
                          "--output", str(tmp_path / "s.png")], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert res.returncode != 0 and "lacks config, model" in res.stderr and str(plain) in res.stderr


def test_prune_keeps_the_checkpoint_just_written(tmp_path):
    for step in (1, 5, 9):
        ckpt_io.atomic_torch_save({"iteration": step}, tmp_path / f"checkpoint_{step:08d}.pt")
    ckpt_io.prune_checkpoints(tmp_path, keep_last=1, keep=tmp_path / "checkpoint_00000005.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00000005.pt", "checkpoint_00000009.pt"]


@pytest.mark.parametrize("zipfile", [True, False])
def test_load_checkpoint_mmap_reads_either_format(tmp_path, zipfile):
    """The run-name look-up maps the file (no full read); a file in torch's older format is read."""
    path = tmp_path / "checkpoint_00000001.pt"
    torch.save({"run_name": "r", "model": {"w": torch.arange(4.0)}}, path, _use_new_zipfile_serialization=zipfile)
    ckpt = ckpt_io.load_checkpoint(path, mmap=True, require=("model",))
    assert ckpt["run_name"] == "r" and torch.equal(ckpt["model"]["w"], torch.arange(4.0))


def test_a_checkpoint_is_written_before_the_sample_grid_of_the_same_step(tiny_config, monkeypatch):
    """A sampler that fails at a step that is also a save step loses no training."""
    trainer = Trainer(tiny_config("flow_matching", "training.num_iterations=4", "training.save_every=2",
                                  "training.sample_every=2"), quiet=True)

    def boom(tag):
        raise RuntimeError(f"sampler failed at {tag}")

    monkeypatch.setattr(trainer, "sample_grid", boom)
    with pytest.raises(RuntimeError, match="sampler failed at 00000002"):
        trainer.train()
    assert ckpt_io.latest_checkpoint(trainer.ckpt_dir).name == "checkpoint_00000002.pt"


def test_throughput_window_excludes_sampling_and_checkpoints(tiny_config, monkeypatch):
    """img/s and s/1k img time only the training steps: on a fake clock where a step takes 1 s and
    sampling or saving 1000 s, every logged window reads 1 s per step."""
    from fastflow.train import loop

    clock = [0.0]

    class FakeTime:
        perf_counter = staticmethod(lambda: clock[0])
        strftime = staticmethod(loop.time.strftime)

    monkeypatch.setattr(loop, "time", FakeTime)
    cfg = tiny_config("flow_matching", "training.num_iterations=6", "training.log_every=2",
                      "training.sample_every=1", "training.save_every=3")
    trainer = Trainer(cfg, quiet=True)
    step, sample, save = trainer._train_step, trainer.sample_grid, trainer.save_checkpoint

    def advance(fn, seconds):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            clock[0] += seconds
            return out
        return wrapped

    monkeypatch.setattr(trainer, "_train_step", advance(step, 1.0))
    monkeypatch.setattr(trainer, "sample_grid", advance(sample, 1000.0))
    monkeypatch.setattr(trainer, "save_checkpoint", advance(save, 1000.0))
    logged = []
    monkeypatch.setattr(trainer, "_report", lambda metrics, progress: logged.append(metrics))
    trainer.train()
    assert len(logged) == 3
    for metrics in logged:
        assert metrics["sec_per_1k_img"] == pytest.approx(1000.0 / 16)
        assert metrics["img_per_s"] == pytest.approx(16.0)


@pytest.mark.parametrize("log_every", [1, 2])
def test_compile_step_is_not_throughput(tiny_config, monkeypatch, log_every):
    """Under torch.compile the first step is the compile (here faked as 50 s on a fake clock, steps
    1 s each): it leaves the throughput window; a window holding only it logs no img/s at all."""
    from fastflow.train import loop

    clock = [0.0]

    class FakeTime:
        perf_counter = staticmethod(lambda: clock[0])
        strftime = staticmethod(loop.time.strftime)

    monkeypatch.setattr(loop, "time", FakeTime)
    monkeypatch.setattr(loop, "compile_scope", lambda cfg: "model")  # as if compiled; runs eagerly
    trainer = Trainer(tiny_config("flow_matching", "training.num_iterations=4", f"training.log_every={log_every}"),
                      quiet=True)
    step, calls = trainer._train_step, []

    def timed(batch):
        out = step(batch)
        clock[0] += 50.0 if not calls else 1.0
        calls.append(1)
        return out

    monkeypatch.setattr(trainer, "_train_step", timed)
    logged = []
    monkeypatch.setattr(trainer, "_report", lambda metrics, progress: logged.append(metrics))
    trainer.train()
    assert len(logged) == 4 // log_every and all("loss" in m for m in logged)
    timed_windows = logged[1:] if log_every == 1 else logged
    if log_every == 1:
        assert "img_per_s" not in logged[0] and "mfu" not in logged[0]
    for metrics in timed_windows:
        assert metrics["img_per_s"] == pytest.approx(16.0), metrics


def test_logged_metrics_are_window_means(tiny_config, monkeypatch):
    """Each log line averages its window's steps (one rank here; the mean over ranks is one
    all-reduce of the same vector), not the last step's noisy value."""
    trainer = Trainer(tiny_config("flow_map_matching", "training.num_iterations=6", "training.log_every=3"), quiet=True)
    original, per_step, logged = trainer._train_step, [], []

    def step(batch):
        metrics = original(batch)
        per_step.append({k: float(v) for k, v in metrics.items()})
        return metrics

    monkeypatch.setattr(trainer, "_train_step", step)
    monkeypatch.setattr(trainer, "_report", lambda metrics, progress: logged.append(metrics))
    trainer.train()
    assert len(logged) == 2
    for window, metrics in zip((per_step[:3], per_step[3:]), logged):
        for key in ("loss", "derivative_loss", "grad_norm", "current_gap", "t_mean"):
            assert metrics[key] == pytest.approx(np.mean([m[key] for m in window]), rel=1e-6), key
    assert logged[0]["loss"] != pytest.approx(per_step[2]["loss"], rel=1e-6)


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


def test_train_cli_overrides_around_flags_and_exit_status(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))
    import train as train_cli

    config = str(REPO / "configs/fmm_digits.yaml")
    assert train_cli.main(["--config", config, "training.batch_size=3", "--print-config", "model.num_heads=1"]) == 0
    printed = capsys.readouterr().out
    assert "batch_size: 3" in printed and "num_heads: 1" in printed
    summaries = {"done": {"interrupted": False, "signal": None},
                 "sigterm": {"interrupted": True, "signal": signal.SIGTERM},
                 "ctrl-c": {"interrupted": True, "signal": signal.SIGINT}}
    for name, expected in (("done", 0), ("sigterm", 143), ("ctrl-c", 130)):
        monkeypatch.setattr("fastflow.train.train_from_config", lambda config, **kw: summaries[name])
        assert train_cli.main(["--config", config]) == expected, name

    def missing(config, **kw):
        raise ckpt_io.CheckpointError(f"checkpoint not found: {tmp_path / 'nope.pt'}")

    monkeypatch.setattr("fastflow.train.train_from_config", missing)
    assert train_cli.main(["--config", config, "--resume", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--num_steps", "0"], "--num_steps must be at least 1"),
    (["--eta", "nan"], "--eta must be a number in [0, 1]"),
    (["--eta", "1.5"], "--eta must be a number in [0, 1]"),
    (["--output", "grid.jpg"], "--output must end in .png or .npz"),
    (["--output", "afile/out.npz"], "--output afile/out.npz: cannot create its folder"),
    (["--output", "adir.png"], "--output adir.png is a folder"),
])
def test_sample_cli_rejects_bad_arguments_before_loading(args, message, capsys, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "adir.png").mkdir()
    import sample as sample_cli

    with pytest.raises(SystemExit) as info:
        sample_cli.parse_args(["--checkpoint", "unused.pt", "--method", "DDIM", *args])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def sample_checkpoints(tmp_path_factory):
    """One 2-step checkpoint per method (shared by the sample.py tests below)."""
    from conftest import TINY_OVERRIDES
    from fastflow.config import load_config

    root = tmp_path_factory.mktemp("sample_ckpts")
    out = {}
    for method in ("ddpm", "flow_matching", "flow_map_matching"):
        cfg = load_config(None, [f"method={method}", *TINY_OVERRIDES, f"checkpoint.dir={root}/ckpt",
                                 f"logging.dir={root}/logs", f"logging.run_name={method}", "training.num_iterations=2"])
        out[method] = Trainer(cfg, quiet=True).train()["checkpoint"]
    return out


def _sample_npz(monkeypatch, tmp_path, ckpt, method, *args):
    monkeypatch.syspath_prepend(str(REPO))
    import sample as sample_cli

    out = tmp_path / f"{method}_{len(list(tmp_path.iterdir()))}.npz"
    code = sample_cli.main(["--checkpoint", ckpt, "--method", method, "--num_samples", "5", "--device", "cpu",
                            "--output", str(out), *args])
    return code, (np.load(out)["images"] if code == 0 else None)


@pytest.mark.parametrize("method,ckpt_key,extra", [
    ("DDIM", "ddpm", ["--num_steps", "4", "--eta", "0"]),
    ("FlowMatching", "flow_matching", ["--num_steps", "3"]),
    ("FlowMapMatching", "flow_map_matching", ["--num_steps", "2"]),
])
def test_deterministic_samples_do_not_depend_on_the_batch_size(sample_checkpoints, monkeypatch, tmp_path,
                                                                method, ckpt_key, extra):
    """Sample i starts from noise of (seed, i) alone, and DDIM at eta 0 draws no other noise: the
    same --seed gives the same images in batches of 5 or of 2 + 2 + 1. A new seed changes them."""
    ckpt = sample_checkpoints[ckpt_key]
    _, whole = _sample_npz(monkeypatch, tmp_path, ckpt, method, "--batch_size", "5", *extra)
    _, split = _sample_npz(monkeypatch, tmp_path, ckpt, method, "--batch_size", "2", *extra)
    _, other = _sample_npz(monkeypatch, tmp_path, ckpt, method, "--batch_size", "5", "--seed", "1", *extra)
    assert whole.shape == (5, 8, 8, 1)
    assert np.abs(whole.astype(int) - split.astype(int)).max() <= 1  # float rounding of a batched conv
    assert np.abs(whole.astype(int) - other.astype(int)).max() > 10


def test_sample_cli_refuses_non_finite_samples_and_warns_on_ignored_flags(sample_checkpoints, monkeypatch,
                                                                         tmp_path, capsys):
    """A diverged checkpoint's NaN samples would be written as black pixels with exit status 0:
    nothing is written, status 2. Flags a method does not read are named on stderr."""
    from fastflow.methods.flow_matching import FlowMatching

    def nan_sample(self, batch_size, image_shape, **kwargs):
        return torch.full((batch_size, *image_shape), float("nan"))

    monkeypatch.setattr(FlowMatching, "sample", nan_sample)
    code, _ = _sample_npz(monkeypatch, tmp_path, sample_checkpoints["flow_matching"], "FlowMatching", "--eta", "0.5")
    err = capsys.readouterr().err
    assert code == 2 and "5 of samples 0…4 are not finite" in err and not list(tmp_path.glob("*.npz"))
    assert "FlowMatching ignores --eta" in err


def test_sample_cli_use_ema_on_broken_ema_entries_names_the_file(sample_checkpoints, monkeypatch, tmp_path, capsys):
    ckpt = torch.load(sample_checkpoints["flow_matching"], weights_only=False)
    for label, ema in (("none", {"decay": 0.9}), ("shape", {**ckpt["ema"], "shadow": {
            k: (v[:1] if i == 0 else v) for i, (k, v) in enumerate(ckpt["ema"]["shadow"].items())}})):
        path = tmp_path / f"ema_{label}.pt"
        torch.save({**ckpt, "ema": ema}, path)
        code, _ = _sample_npz(monkeypatch, tmp_path, str(path), "FlowMatching", "--use_ema", "--num_steps", "2")
        err = capsys.readouterr().err
        assert code == 2 and str(path) in err, err
        assert ("holds no EMA weights" if label == "none" else "EMA weights do not fit") in err, err


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


def test_resumed_tensorboard_keeps_the_checkpoint_steps_events(tiny_config):
    """A run resumed from step 2 (after its predecessor reached step 4) purges the events after
    step 2 and keeps step 2's own: each logged step appears once, none is lost."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config("flow_matching", "training.num_iterations=4", "logging.tensorboard=true",
                      "training.log_every=2", "training.save_every=2", "training.sample_every=100")
    first = Trainer(cfg, quiet=True)
    first.train()
    resumed = Trainer(cfg, resume=str(first.ckpt_dir / "checkpoint_00000002.pt"), quiet=True)
    assert resumed.step == 2
    resumed.train()
    acc = EventAccumulator(str(first.run_dir / "tensorboard"))
    acc.Reload()
    assert [event.step for event in acc.Scalars("train/loss")] == [2, 4]


def test_profile_schedule_fits_the_steps_left():
    from fastflow.train.loop import profile_schedule

    assert profile_schedule(2, 2, 3, 100) == (2, 2, 3) and profile_schedule(2, 2, 3, 7) == (2, 2, 3)
    assert profile_schedule(2, 2, 3, 5) == (0, 2, 3)  # the wait goes first
    assert profile_schedule(2, 2, 3, 3) == (0, 2, 1)  # then the active steps, down to one
    assert profile_schedule(2, 2, 3, 1) == (0, 0, 1)  # then the warmup
    for steps in range(1, 9):
        for asked in ((1, 1, 2), (0, 0, 1), (3, 0, 4), (0, 5, 2)):
            got = profile_schedule(*asked, steps)
            assert sum(got) <= steps and got[2] >= 1 and all(g <= a for g, a in zip(got, asked)), (asked, steps, got)


@pytest.mark.parametrize("steps", [2, 3])
def test_profiler_on_a_run_shorter_than_its_schedule(tiny_config, steps, capsys):
    """A run with fewer steps than wait+warmup+active still writes a trace, of real training steps
    only (before: none at 2 steps, and a last ProfilerStep holding no training step), and says
    how it shrank the schedule."""
    import json

    cfg = tiny_config("flow_matching", f"training.num_iterations={steps}", "logging.profile=true",
                      "logging.profile_wait=1", "logging.profile_warmup=1", "logging.profile_active=2")
    trainer = Trainer(cfg, quiet=False)
    trainer.train()
    assert "profiling with wait=0" in capsys.readouterr().out
    traces = sorted((trainer.run_dir / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1, traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert names == {f"ProfilerStep#{i}" for i in range(1, steps)}, names  # step 0 warms up
    assert sum(e.get("name") == "aten::convolution" for e in events) > 0


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


def test_bad_image_mid_run_checkpoints_and_resumes_with_skip(tiny_config, tmp_path):
    """data.on_bad_image=error meeting an unreadable file at step 2: the error names the file and
    how to go on, the two steps done are checkpointed, and a resume with skip finishes exactly as a
    run with skip from the start (the failed batch was not consumed)."""
    from PIL import Image

    from fastflow.data import BadImageError, epoch_plan

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(16):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / f"{k:02d}.png")
    folder = ["data.dataset=folder", f"data.root={root}", "training.batch_size=4", "training.num_iterations=4"]
    seed = tiny_config("flow_matching").infrastructure.seed
    bad = int(epoch_plan(16, seed=seed, epoch=0)[0][2 * 4 + 1])  # in the 3rd batch
    (root / f"{bad:02d}.png").write_bytes(b"not a png")

    with pytest.raises(BadImageError) as info:
        Trainer(tiny_config("flow_matching", *folder, "logging.run_name=err"), quiet=True).train()
    message = str(info.value)
    assert f"{bad:02d}.png" in message and "set data.on_bad_image=skip to go on with this run" in message
    assert "changes the dataset size" in message
    ckpt = Path(tmp_path) / "ckpt" / "err" / "checkpoint_00000002.pt"
    assert str(ckpt) in message and sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]

    with pytest.warns(RuntimeWarning, match="skipped 1 unreadable"):
        resumed = Trainer(tiny_config("flow_matching", *folder, "logging.run_name=err", "data.on_bad_image=skip"),
                          resume="auto", quiet=True)
        assert resumed.step == 2
        resumed.train()
        straight = Trainer(tiny_config("flow_matching", *folder, "logging.run_name=skip", "data.on_bad_image=skip"),
                           quiet=True)
        straight.train()
    for key, value in _weights(straight).items():
        assert torch.equal(value, resumed.method.state_dict()[key]), key


@pytest.mark.parametrize("change", ["data.augment=true", "infrastructure.seed=1"])
def test_failed_resume_names_the_data_keys_to_set_back(tiny_config, change):
    ckpt = Trainer(tiny_config("flow_matching", "training.num_iterations=1"), quiet=True).train()["checkpoint"]
    key = change.split("=")[0]
    with pytest.raises(ckpt_io.CheckpointError, match=rf"set back {key}=.*; config keys that differ from the "
                                                      rf"checkpoint's: {key} \(checkpoint"):
        Trainer(tiny_config("flow_matching", change, "training.num_iterations=2"), resume=ckpt, quiet=True)


def test_ranks_with_other_files_are_refused():
    """Node-local copies: different counts keep the size message; the same count with other files
    (a renamed one) is refused naming the ranks that differ and data.root."""
    from fastflow.train.loop import check_same_data

    check_same_data([(6, "a"), (6, "a")], "/data")
    with pytest.raises(ValueError, match="rank 0: 6, rank 1: 5.*data.root=/data.*same data"):
        check_same_data([(6, "a"), (5, "b")], "/data")
    with pytest.raises(ValueError, match=r"rank\(s\) 1, 3 see other files than rank 0 under data.root=/data"):
        check_same_data([(6, "a"), (6, "b"), (6, "a"), (6, "c")], "/data")


def test_sampling_batch_size_sets_the_grid_chunks_and_sample_cli_default(tiny_config, sample_checkpoints,
                                                                        monkeypatch, tmp_path):
    """sampling.batch_size is the number of images per sampler call: the training grid of
    training.num_samples images and sample.py without --batch_size (its checkpoint's value)."""
    from fastflow.methods.flow_matching import FlowMatching

    calls = []
    original = FlowMatching.sample

    def recording(self, batch_size, image_shape, **kwargs):
        calls.append(batch_size)
        return original(self, batch_size, image_shape, **kwargs)

    monkeypatch.setattr(FlowMatching, "sample", recording)
    trainer = Trainer(tiny_config("flow_matching", "training.num_samples=8", "sampling.batch_size=3",
                                  "sampling.num_steps=2"), quiet=True)
    path = trainer.sample_grid("chunks")
    assert calls == [3, 3, 2] and path.is_file()

    calls.clear()
    ckpt = sample_checkpoints["flow_matching"]
    saved = torch.load(ckpt, weights_only=False)
    saved["config"]["sampling"]["batch_size"] = 2
    edited = tmp_path / "checkpoint_00000002.pt"
    torch.save(saved, edited)
    code, images = _sample_npz(monkeypatch, tmp_path, str(edited), "FlowMatching", "--num_steps", "2")
    assert code == 0 and images.shape[0] == 5 and calls == [2, 2, 1]
    calls.clear()
    code, _ = _sample_npz(monkeypatch, tmp_path, str(edited), "FlowMatching", "--num_steps", "2", "--batch_size", "4")
    assert code == 0 and calls == [4, 1]


def test_console_line_has_lr_and_the_summary_names_tensorboard_only_when_it_is_on(tiny_config, capsys):
    """The README promises lr in the console; with logging.tensorboard=false the run writes no
    event files, so its summary must not point at a tensorboard/ folder that does not exist."""
    for on in (True, False):
        cfg = tiny_config("flow_matching", "training.num_iterations=2", "training.log_every=1",
                          "logging.progress_bar=false", f"logging.tensorboard={str(on).lower()}",
                          f"logging.run_name=tb-{on}")
        summary = Trainer(cfg).train()
        out = capsys.readouterr().out
        step_lines = [line for line in out.splitlines() if line.startswith("step ")]
        assert len(step_lines) == 2 and all(" | lr " in line for line in step_lines), out
        assert (summary["tensorboard"] is not None) == on
        assert ("TensorBoard: tensorboard --logdir" in out) == on, out
        assert (Path(summary["run_dir"]) / "tensorboard").is_dir() == on


def test_resume_auto_of_a_finished_run_says_it_is_complete(tiny_config, capsys):
    """`make demo` runs with --resume auto: a second run of a finished demo trains nothing and says so."""
    cfg = tiny_config("flow_matching", "training.num_iterations=2", "logging.progress_bar=false")
    Trainer(cfg, quiet=True).train()
    again = Trainer(cfg, resume="auto")
    summary = again.train()
    out = capsys.readouterr().out
    assert summary["step"] == 2 and "is complete (step 2 of training.num_iterations=2)" in out, out
