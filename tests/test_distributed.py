"""Distributed training on the CPU (gloo, 2 ranks via torchrun): DDP and FSDP2 against one process.

"Same global batch" here means: rank r draws its own data shard and its own noise/times from
``step_seed(seed, r, step)``, so the single-process reference computes, in one process,
mean_r loss(batch_r; seed_r) — every rank's loss with that rank's seed — and steps on its
gradient. After a step every rank must hold that gradient (which also shows that the gradient
sync ran: without it each rank would hold only its own loss's gradient).

This file is also the workers' script: ``torchrun tests/test_distributed.py <mode> <out> ...``.
Each torchrun launch runs several cases to amortise the ~10-20 s start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import TINY_OVERRIDES  # noqa: E402

STEPS = 3
SEED = 42
# Cases: "<parallelism>:<method>:<derivative>[:<compile>]".
# The FSDP FMM case also keeps gathered weights between forwards (reshard_after_forward=false) and
# samples with the EMA weights after every step: the swap must not leave stale gathered copies.
# ddp + jvp is in the default set: public reports say DDP skips the gradient sync when
# torch.func.jvp runs the module; here the jvp runs inside the DDP-wrapped method's forward.
DEFAULT_CASES = ["ddp:flow_matching:-", "fsdp:flow_map_matching:dual:reshard", "fsdp:flow_matching:-",
                 "ddp:flow_map_matching:dual", "ddp:flow_map_matching:jvp", "fsdp:flow_map_matching:jvp:fused"]
SLOW_CASES = [
    "ddp:flow_map_matching:finite_difference",
    "fsdp:flow_map_matching:jvp", "fsdp:flow_map_matching:finite_difference",
    "ddp:ddpm:-", "fsdp:ddpm_x0:-",
    "fsdp:flow_map_matching:dual:fused",
]
# Each UNet block compiled whole-graph before sharding (the derivative passes are plain forwards).
COMPILE_CASES = ["fsdp:flow_map_matching:dual:block", "fsdp:flow_map_matching:finite_difference:block"]


def _runs_here(case: str) -> bool:
    """FSDP2 + torch.func.jvp needs torch >= FSDP_JVP_MIN_TORCH (the Trainer refuses it earlier;
    test_precision_policy_and_unsupported_combinations checks the refusal)."""
    from fastflow.train.fsdp import FSDP_JVP_MIN_TORCH, torch_release

    return not (case.startswith("fsdp:flow_map_matching:jvp") and torch_release() < FSDP_JVP_MIN_TORCH)


DEFAULT_CASES = [c for c in DEFAULT_CASES if _runs_here(c)]
SLOW_CASES = [c for c in SLOW_CASES if _runs_here(c)]


def case_overrides(case: str) -> List[str]:
    parallelism, method, derivative, *flags = case.split(":")
    out = [f"method={method}", f"infrastructure.parallelism={parallelism}", "training.ema_start=0"]
    if derivative != "-":
        out.append(f"flow_map_matching.derivative={derivative}")
    for flag in flags:
        if flag == "reshard":
            out += ["infrastructure.reshard_after_forward=false", "training.sample_every=1"]
        elif flag == "fused":  # the C++ ops on the CPU (jvp through their forward-mode rules)
            out.append("model.fused_kernels=true")
        else:
            out.append(f"infrastructure.compile={flag}")
    return out


def make_config(tmp: Path, run_name: str, *overrides: str):
    from fastflow.config import load_config

    return load_config(None, [*TINY_OVERRIDES, f"checkpoint.dir={tmp}/ckpt", f"logging.dir={tmp}/logs",
                              f"logging.run_name={run_name}", f"infrastructure.seed={SEED}", *overrides])


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def full_state(trainer) -> Dict[str, Dict[str, torch.Tensor]]:
    """Full weights and EMA shadows (a collective under FSDP: every rank calls it)."""
    return {"weights": {n: _full(p) for n, p in trainer.method.named_parameters()},
            "ema": {n: _full(t) for n, t in trainer.ema.shadow.items()}}


# ------------------------------------------------------------------------------------ workers
def worker_grads(out: Path, cases: List[str]) -> None:
    """Per case: train STEPS steps; record step-0 gradients (after clipping), losses, weights."""
    from fastflow.train.loop import Trainer

    for case in cases:
        cfg = make_config(out, case.replace(":", "_"), *case_overrides(case), f"training.num_iterations={STEPS}")
        trainer = Trainer(cfg, quiet=True)
        record: Dict[str, object] = {"losses": []}

        def snapshot(optimizer, args, kwargs):  # noqa: ARG001
            if "grads" not in record:
                record["grads"] = {n: _full(p.grad) for n, p in trainer.method.named_parameters()}

        trainer.optimizer.register_step_pre_hook(snapshot)
        original = trainer._train_step

        def step(batch):
            metrics = original(batch)
            record["losses"].append(float(metrics["loss"]))
            return metrics

        trainer._train_step = step
        trainer.train()
        record.update(full_state(trainer))
        torch.save(record, out / f"grads_{case.replace(':', '_')}_rank{trainer.ctx.rank}.pt")


def worker_train(out: Path, tag: str, overrides: List[str]) -> None:
    """One Trainer run; full weights, EMA and the summary saved per rank under ``tag``. A tag
    starting with ``sigterm`` sends SIGTERM to rank 1 alone during its 2nd step; one starting with
    ``overfit`` trains with --overfit."""
    import signal

    from fastflow.train.loop import Trainer

    trainer = Trainer(make_config(out, tag, *overrides), overfit=tag.startswith("overfit"), quiet=True)
    if tag.startswith("sigterm") and trainer.ctx.rank == 1:
        original = trainer._train_step

        def step_then_signal(batch):
            metrics = original(batch)
            if trainer.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return metrics

        trainer._train_step = step_then_signal
    summary = trainer.train()
    torch.save({**full_state(trainer), "step": trainer.step, "summary": summary},
               out / f"{tag}_rank{trainer.ctx.rank}.pt")


def worker_restart(out: Path, overrides: List[str]) -> None:
    """First attempt: an uninterrupted run, then the same run with rank 1 dying after step 3.
    torchrun restarts the workers; the second attempt resumes the killed run (auto: restart)."""
    from fastflow.train.distributed import restart_count
    from fastflow.train.loop import FAULT_INJECT_ENV

    if restart_count() == 0:
        worker_train(out, "straight", overrides)
        os.environ[FAULT_INJECT_ENV] = "1:3"
    worker_train(out, "killed", overrides)
    (out / f"attempts_rank{os.environ['RANK']}.json").write_text(json.dumps({"restart_count": restart_count()}))


def worker_sizes(out: Path) -> None:
    """Each rank reads its own folder copy, rank 1's one image short: the Trainer must refuse."""
    from PIL import Image

    from fastflow.train.loop import train_from_config

    rank = int(os.environ["RANK"])
    root = out / f"images_rank{rank}"
    root.mkdir()
    for k in range(6 - rank):
        Image.new("L", (8, 8), 20 * k).save(root / f"{k}.png")
    try:  # the CLI's path: its teardown after a refused start is under test too (exit 0, not -6)
        train_from_config(make_config(out, "sizes", "data.dataset=folder", f"data.root={root}",
                                      "training.batch_size=2", "infrastructure.parallelism=ddp"), quiet=True)
        message = "no error"
    except ValueError as exc:
        message = str(exc)
    (out / f"sizes_rank{rank}.txt").write_text(message)


def worker_main(argv: List[str]) -> None:
    from fastflow.train.distributed import cleanup

    mode, out, *rest = argv
    out = Path(out)
    if mode == "grads":
        worker_grads(out, rest)
    elif mode == "train":  # tag overrides... [--next-- tag overrides...]
        jobs, job = [], []
        for arg in rest + ["--next--"]:
            if arg == "--next--":
                jobs.append(job)
                job = []
            else:
                job.append(arg)
        for job in jobs:
            worker_train(out, job[0], job[1:])
    elif mode == "restart":
        worker_restart(out, rest)
    elif mode == "sizes":
        worker_sizes(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
    cleanup()  # garbage first, then the group (a Trainer freed after it aborts the process)


# ------------------------------------------------------------------------------------ launcher
def torchrun(args: List[str], *, nproc: int = 2, max_restarts: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    # A fresh rendezvous store per restart attempt (pytorch/pytorch#135712: with the shared store,
    # restarted workers can read stale peer addresses and fail to connect).
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    env.pop("FASTFLOW_FAULT_INJECT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", str(Path(__file__).resolve()), *args]
    # Own session, so that a timeout takes the workers down with the launcher (killing torchrun
    # alone would orphan them).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s:\n{stdout[-4000:]}\n{stderr[-8000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert res.returncode == 0, f"torchrun failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-8000:]}"
    return res


# ------------------------------------------------------------------------------------ reference
def reference_run(tmp: Path, case: str, world_size: int = 2):
    """One process, the same global batch: per step, mean over ranks r of loss(batch_r; seed_r)."""
    from fastflow.data import create_dataloader_from_config
    from fastflow.methods import create_method_from_config
    from fastflow.train.ema import EMA
    from fastflow.train.loop import step_seed

    cfg = make_config(tmp, "reference", *case_overrides(case))
    cfg.infrastructure.parallelism = "none"
    cfg.infrastructure.compile = "none"
    train_cfg = cfg.training
    torch.manual_seed(SEED)
    method = create_method_from_config(cfg)
    optimizer = torch.optim.AdamW(list(method.parameters()), lr=train_cfg.learning_rate,
                                  betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay)
    ema = EMA(method.model, decay=train_cfg.ema_decay, warmup_steps=train_cfg.ema_start)
    loaders = [iter(create_dataloader_from_config(cfg, rank=r, world_size=world_size, seed=SEED)) for r in range(world_size)]
    has_counter = hasattr(method, "_step")
    grads, losses = None, [[] for _ in range(world_size)]
    method.train()
    for step in range(STEPS):
        batches = [next(it) for it in loaders]
        counter = method._step.clone() if has_counter else None
        for r in range(world_size):
            if has_counter:  # every rank's FMM step counter is at `step`
                method._step.copy_(counter)
            torch.manual_seed(step_seed(SEED, r, step))
            loss, _ = method(batches[r])
            (loss / world_size).backward()
            losses[r].append(loss.item())
        torch.nn.utils.clip_grad_norm_(list(method.parameters()), train_cfg.gradient_clip_norm)
        if grads is None:
            grads = {n: p.grad.detach().clone() for n, p in method.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update()
    weights = {n: p.detach().clone() for n, p in method.named_parameters()}
    return grads, losses, weights, {n: t.clone() for n, t in ema.shadow.items()}


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _fraction_off(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], atol: float = 1e-5) -> float:
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in b])
    return float((diff > atol).float().mean())


# Finite differences divide float32 rounding by 2h: their parameter gradients move by ~2e-4 of
# their scale with the accumulation order alone (one process, loss split 0.3 + 0.7 instead of
# 1.0: 2.1e-4; dual: 8.6e-7; measured 2026-12-06), so their cases get that much room, in the
# gradients and in the weights Adam makes of them.
FD_GRAD_RTOL, FD_WEIGHT_ATOL = 5e-4, 1e-4


def check_case(out: Path, tmp: Path, case: str, grad_rtol: float = 2e-5) -> None:
    weight_atol = 1e-5
    if ":finite_difference" in case:
        grad_rtol, weight_atol = max(grad_rtol, FD_GRAD_RTOL), FD_WEIGHT_ATOL
    ref_grads, ref_losses, ref_weights, ref_ema = reference_run(tmp, case)
    ranks = [torch.load(out / f"grads_{case.replace(':', '_')}_rank{r}.pt", weights_only=False) for r in range(2)]
    grad_scale = max(float(g.abs().max()) for g in ref_grads.values())
    for r, rec in enumerate(ranks):
        # Identical on every rank (the sync ran) and equal to the one-process gradient up to
        # float32 reduction order.
        assert _max_diff(rec["grads"], ranks[0]["grads"]) <= 1e-6 * grad_scale, f"{case}: rank {r} grads differ from rank 0"
        diff = _max_diff(rec["grads"], ref_grads)
        assert diff <= grad_rtol * grad_scale, f"{case}: rank {r} grads vs single process: {diff:.3g} (scale {grad_scale:.3g})"
        # Step 0's loss is computed from identical weights; later steps within Adam's amplification.
        assert rec["losses"][0] == pytest.approx(ref_losses[r][0], rel=1e-5), f"{case}: rank {r} loss"
        assert rec["losses"] == pytest.approx(ref_losses[r], rel=1e-3), f"{case}: rank {r} losses"
        # AdamW normalises each coordinate, so where a gradient is ~0 reduction-order noise can
        # move a weight by up to ~lr per step; typical coordinates agree far more tightly.
        lr = 0.002
        assert _max_diff(rec["weights"], ref_weights) <= 2 * lr * STEPS, f"{case}: rank {r} weights"
        assert _fraction_off(rec["weights"], ref_weights, weight_atol) < 0.01, \
            f"{case}: rank {r}: >1% of weights off by >{weight_atol:g}"
        # The same for the EMA: the bound alone would pass an EMA never updated on a rank.
        assert _max_diff(rec["ema"], ref_ema) <= 2 * lr * STEPS, f"{case}: rank {r} EMA"
        assert _fraction_off(rec["ema"], ref_ema, weight_atol) < 0.01, \
            f"{case}: rank {r}: >1% of EMA weights off by >{weight_atol:g}"


# ------------------------------------------------------------------------------------ tests
def run_grads(tmp_path_factory, name: str, cases: List[str], timeout: int) -> Path:
    """One torchrun (2 ranks) that trains every case and saves each rank's gradients and weights."""
    out = tmp_path_factory.mktemp(name)
    torchrun(["grads", str(out), *cases], timeout=timeout)
    return out


@pytest.fixture(scope="module")
def default_grads(tmp_path_factory):
    return run_grads(tmp_path_factory, "dist_grads", DEFAULT_CASES, timeout=240)


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_grads_and_weights_match_single_process(default_grads, tmp_path, case):
    check_case(default_grads, tmp_path, case)


@pytest.fixture(scope="module")
def slow_grads(tmp_path_factory):
    return run_grads(tmp_path_factory, "dist_grads_slow", SLOW_CASES, timeout=420)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES)
def test_grads_match_single_process_other_backends(slow_grads, tmp_path, case):
    check_case(slow_grads, tmp_path, case)


@pytest.fixture(scope="module")
def compile_grads(tmp_path_factory):
    return run_grads(tmp_path_factory, "dist_grads_compile", COMPILE_CASES, timeout=1500)


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("case", COMPILE_CASES)
def test_compiled_blocks_under_fsdp_match_single_process(compile_grads, tmp_path, case):
    # Inductor reorders float32 reductions; finite differences divide that noise by 2h.
    check_case(compile_grads, tmp_path, case, grad_rtol=2e-4)


FMM_FSDP = ["method=flow_map_matching", "infrastructure.parallelism=fsdp", "training.save_every=1000",
            "training.ema_start=0"]


def test_fsdp_save_on_2_ranks_resume_on_1(tmp_path):
    """2 ranks save a sharded checkpoint; one process (no process group) resumes it exactly and
    trains on; its export reads in sample.py."""
    from fastflow.train import checkpoint as ckpt_io
    from fastflow.train.loop import Trainer

    torchrun(["train", str(tmp_path), "run", *FMM_FSDP, "training.num_iterations=3",
              "--next--", "sigterm", *FMM_FSDP, "training.num_iterations=6"])
    # SIGTERM on rank 1 alone: both ranks stop after the same step, checkpoint together, exit 0.
    for r in range(2):
        stopped = torch.load(tmp_path / f"sigterm_rank{r}.pt", weights_only=False)
        assert stopped["step"] == 2 and stopped["summary"]["interrupted"], stopped["summary"]
        assert Path(stopped["summary"]["checkpoint"]).name == "step_00000002"

    saved = torch.load(tmp_path / "run_rank0.pt", weights_only=False)
    folder = Path(saved["summary"]["checkpoint"])
    assert folder.name == "step_00000003" and ckpt_io.is_sharded_checkpoint(folder)
    assert (folder.parent / "latest").read_text().strip() == folder.name
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("rank_")) == ["rank_0.pt", "rank_1.pt"]
    assert not list(folder.parent.glob(".tmp_*"))

    with pytest.warns(RuntimeWarning, match=r"data loader resumed approximately \(world_size: saved 2 vs now 1\)"):
        trainer = Trainer(make_config(tmp_path, "run", *FMM_FSDP, "training.num_iterations=5"), resume="auto", quiet=True)
    assert trainer.resume_path == folder and trainer.step == 3 and trainer.ema.step == 3
    assert int(trainer.method._step) == 3  # FMM's step counter (a buffer) came back
    state = full_state(trainer)
    assert _max_diff(state["weights"], saved["weights"]) == 0.0
    assert _max_diff(state["ema"], saved["ema"]) == 0.0
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}
    summary = trainer.train()  # on one process: a sharded checkpoint without a process group
    assert trainer.step == 5 and Path(summary["checkpoint"]).name == "step_00000005"

    import sample

    method, config = sample.load_method(str(folder), "FlowMapMatching", use_ema=True, device=torch.device("cpu"))
    ema_weights = {n: p.detach() for n, p in method.model.named_parameters()}
    assert _max_diff(ema_weights, saved["ema"]) == 0.0 and config.method == "flow_map_matching"


@pytest.mark.slow
def test_fsdp_save_on_1_resume_on_2(tmp_path):
    """The reverse: one process writes a sharded checkpoint and 2 FSDP ranks resume it; likewise a
    single-file checkpoint (parallelism none) resumes into FSDP on 2 ranks."""
    from fastflow.train.loop import Trainer

    first = Trainer(make_config(tmp_path, "run", *FMM_FSDP, "training.num_iterations=2"), quiet=True)
    first.train()
    single = Trainer(make_config(tmp_path, "single", *FMM_FSDP, "infrastructure.parallelism=none",
                                 "training.num_iterations=2"), quiet=True)
    single_summary = single.train()
    torchrun(["train", str(tmp_path), "run", *FMM_FSDP, "training.num_iterations=2", "checkpoint.resume=auto",
              "--next--", "single", *FMM_FSDP, "training.num_iterations=2",
              f"checkpoint.resume={single_summary['checkpoint']}"])
    for trainer, tag in ((first, "run"), (single, "single")):
        before = full_state(trainer)
        for r in range(2):
            resumed = torch.load(tmp_path / f"{tag}_rank{r}.pt", weights_only=False)
            assert resumed["step"] == 2  # nothing left to train: the loaded state comes straight back
            assert _max_diff(resumed["weights"], before["weights"]) == 0.0, tag
            assert _max_diff(resumed["ema"], before["ema"]) == 0.0, tag


def test_ddp_overfit_resume_keeps_every_ranks_batch(tmp_path):
    """--overfit under DDP: each rank trains on its own fixed batch, and a single-file checkpoint
    (written by rank 0) must still give each rank its own batch back on resume (it gave every rank
    rank 0's before). 2 steps, resume, 2 more = 4 steps straight, exactly; the file holds both."""
    ddp = ["method=flow_matching", "infrastructure.parallelism=ddp", "training.ema_start=0"]
    torchrun(["train", str(tmp_path), "overfit_straight", *ddp, "training.num_iterations=4",
              "--next--", "overfit", *ddp, "training.num_iterations=2",
              "--next--", "overfit", *ddp, "training.num_iterations=4", "checkpoint.resume=auto"])
    straight = torch.load(tmp_path / "overfit_straight_rank0.pt", weights_only=False)
    resumed = torch.load(tmp_path / "overfit_rank0.pt", weights_only=False)
    assert resumed["step"] == 4
    assert _max_diff(resumed["weights"], straight["weights"]) == 0.0
    assert _max_diff(resumed["ema"], straight["ema"]) == 0.0
    ckpt = torch.load(tmp_path / "ckpt" / "overfit" / "checkpoint_00000002.pt", weights_only=False)
    first, second = ckpt["overfit_batches"]
    assert first.shape == second.shape and not torch.equal(first, second)  # the ranks' own shards


def test_ranks_with_different_dataset_sizes_are_refused(tmp_path):
    """Node-local copies that differ by one file would shard overlapping ranges: every rank raises,
    naming each rank's count (none hangs waiting for the others), and exits cleanly: before the
    teardown collected garbage, 2 of 18 runs here aborted at exit (SIGABRT) after the refusal."""
    torchrun(["sizes", str(tmp_path)], timeout=180)
    for r in range(2):
        message = (tmp_path / f"sizes_rank{r}.txt").read_text()
        assert "rank 0: 6, rank 1: 5" in message and "same data" in message, message


def test_killed_rank_restarts_and_resumes_exactly(tmp_path):
    """torchrun --max-restarts=1: rank 1 dies after step 3 (last checkpoint: step 2); the restarted
    workers resume from step 2 and finish with the weights of an uninterrupted run."""
    overrides = [*FMM_FSDP, "training.num_iterations=6", "training.save_every=2", "checkpoint.keep_last=2"]
    res = torchrun(["restart", str(tmp_path), *overrides], max_restarts=1, timeout=300)
    attempts = [json.loads((tmp_path / f"attempts_rank{r}.json").read_text()) for r in range(2)]
    assert all(a["restart_count"] == 1 for a in attempts), (attempts, res.stderr[-2000:])
    straight = torch.load(tmp_path / "straight_rank0.pt", weights_only=False)
    killed = torch.load(tmp_path / "killed_rank0.pt", weights_only=False)
    assert killed["step"] == 6
    assert _max_diff(killed["weights"], straight["weights"]) == 0.0
    assert _max_diff(killed["ema"], straight["ema"]) == 0.0
    folders = sorted(p.name for p in (tmp_path / "ckpt" / "killed").iterdir())
    assert folders == ["latest", "step_00000004", "step_00000006"], folders  # keep_last=2, no leftovers


def test_sharded_checkpoints_atomic_pruned_and_found(tiny_config, monkeypatch):
    """One process with parallelism=fsdp writes sharded checkpoints (no process group): keep-last-K,
    the ``latest`` pointer, a crash mid-save that leaves the last good checkpoint in place, and
    ``--resume auto`` choosing the newest of either kind."""
    import torch.distributed.checkpoint as dcp

    from fastflow.train import checkpoint as ckpt_io
    from fastflow.train.loop import Trainer

    overrides = ["infrastructure.parallelism=fsdp", "training.save_every=2", "checkpoint.keep_last=2"]
    trainer = Trainer(tiny_config("flow_matching", "training.num_iterations=6", *overrides), quiet=True)
    summary = trainer.train()
    ckdir = Path(summary["checkpoint"]).parent
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert (ckdir / "latest").read_text().strip() == "step_00000006"
    assert ckpt_io.latest_checkpoint(ckdir) == ckdir / "step_00000006"

    # A crash in the middle of writing step 8: the folder stays hidden, `latest` is untouched.
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(dcp, "save", crash)
    trainer.config.training.num_iterations = 8
    with pytest.raises(RuntimeError, match="mid-save"):
        trainer.step = 8
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert (ckdir / ".tmp_step_00000008").is_dir()
    assert ckpt_io.latest_checkpoint(ckdir) == ckdir / "step_00000006"
    assert (ckdir / "latest").read_text().strip() == "step_00000006"
    with pytest.raises(ckpt_io.CheckpointError, match="incomplete"):
        ckpt_io.resolve_checkpoint(ckdir / ".tmp_step_00000008")

    # The newest of either kind wins (a run may switch between ddp and fsdp).
    single = Trainer(tiny_config("flow_matching", "training.num_iterations=7", "training.save_every=7",
                                 "logging.run_name=test"), resume="auto", quiet=True)
    assert single.step == 6 and single.resume_path == ckdir / "step_00000006"
    single.train()
    assert ckpt_io.latest_checkpoint(ckdir) == ckdir / "checkpoint_00000007.pt"
    resumed = Trainer(tiny_config("flow_matching", "training.num_iterations=8", *overrides), resume="auto", quiet=True)
    assert resumed.step == 7 and resumed.resume_path.name == "checkpoint_00000007.pt"
    resumed.train()  # the next save clears the crashed save's leftovers
    assert sorted(p.name for p in ckdir.iterdir() if not p.name.startswith("checkpoint_")) == [
        "latest", "step_00000006", "step_00000008"]


def test_precision_policy_and_unsupported_combinations(tiny_config, monkeypatch):
    from fastflow.train.fsdp import UnsupportedParallelism, check_fsdp_config, fsdp_param_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    bf16 = ["infrastructure.mixed_precision=true", "infrastructure.precision=bf16"]
    assert fsdp_param_dtype(tiny_config("flow_map_matching", *bf16), cuda) == torch.bfloat16
    assert fsdp_param_dtype(tiny_config("flow_map_matching", *bf16), cpu) == torch.float32
    # A float32 derivative pass outside autocast needs float32 weights (bf16 ones fail: measured).
    for backend in ("jvp", "finite_difference"):
        cfg = tiny_config("flow_map_matching", *bf16, f"flow_map_matching.derivative={backend}")
        assert fsdp_param_dtype(cfg, cuda) == torch.float32
        cfg.flow_map_matching.derivative_precision = "autocast"
        assert fsdp_param_dtype(cfg, cuda) == torch.bfloat16
    fp16 = tiny_config("flow_matching", "infrastructure.mixed_precision=true", "infrastructure.precision=fp16",
                       "infrastructure.parallelism=fsdp")
    with pytest.raises(UnsupportedParallelism, match="parallelism=fsdp with precision=fp16"):
        check_fsdp_config(fp16, cuda)
    # FSDP2 + torch.func.jvp crashes in backward before torch 2.13 (measured on 2.11 and 2.12).
    from fastflow.train import fsdp

    jvp = tiny_config("flow_map_matching", "flow_map_matching.derivative=jvp", "infrastructure.parallelism=fsdp")
    dual = tiny_config("flow_map_matching", "flow_map_matching.derivative=dual", "infrastructure.parallelism=fsdp")
    monkeypatch.setattr(fsdp.torch, "__version__", "2.11.0+cu130")
    with pytest.raises(UnsupportedParallelism, match=r"derivative=jvp needs torch >= 2\.13 \(this is torch 2\.11\.0"):
        check_fsdp_config(jvp, cuda)
    check_fsdp_config(dual, cuda)
    monkeypatch.setattr(fsdp.torch, "__version__", "2.13.0+cpu")
    check_fsdp_config(jvp, cpu)

    from fastflow.train.parallelize import check_compile_config

    for compile_flag in ("infrastructure.compile=block", "infrastructure.compile_model=true"):
        with pytest.raises(ValueError, match="derivative=jvp with infrastructure.compile=block"):
            check_compile_config(tiny_config("flow_map_matching", "flow_map_matching.derivative=jvp", compile_flag))
    check_compile_config(tiny_config("flow_map_matching", "flow_map_matching.derivative=dual", "infrastructure.compile=block"))


if __name__ == "__main__":
    worker_main(sys.argv[1:])
