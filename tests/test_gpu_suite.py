"""The one-shot GPU suite's plumbing, on the CPU (bench/gpu_suite.sh --cpu).

The suite runs once per lent GPU session with minutes of device time, so a broken section there
is a lost measurement: CI runs a subset of its CPU dry run (tiny sizes) and checks what comes back
— every section ok, the kernel micro-benchmarks timed back to back, the parallelism rows really
wrapped (ddp/fsdp at world size 1), results in the bench/results format, the summary last.
The sections left out (train_eager, kernel_tests, train_compiled) are the slow ones; the full
dry run is ``bash bench/gpu_suite.sh --cpu`` (~2 min).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "ceilings", "kernels_micro", "train_dist")


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OUT"] = str(out)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), "--cpu", "--sections", ",".join(SECTIONS)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_section_ok_and_summary_last(suite_out):
    out, stdout = suite_out
    doc = json.loads((out / "gpu_suite.json").read_text())
    assert {s: doc["sections"][s]["status"] for s in SECTIONS} == {s: "ok" for s in SECTIONS}, doc["sections"]
    tail = stdout.strip().splitlines()
    assert tail[-1].startswith("=" * 20) and any(line.startswith("fastflow GPU suite summary") for line in tail[-80:])
    assert (out / "gpu_suite.log").read_text().strip() == stdout.strip()


def test_kernel_micro_benchmarks_are_timed_back_to_back(suite_out):
    out, _ = suite_out
    micro = json.loads((out / "gpu_suite.json").read_text())["results"]["kernels_micro"]
    cases = {k: v for k, v in micro.items() if isinstance(v, dict) and v.get("status") == "ok" and "stats" in v}
    impls = {k.split("-")[-1].rstrip("]") for k in cases}
    assert {"fused", "fused_dual", "sdpa", "jvp_sdpa_math"} <= impls, sorted(cases)
    for key, rec in cases.items():
        assert 1 <= rec["calls_per_sample"] <= 64 and rec["single_call_median_s"] > 0, (key, rec)
        # each sample spans >= 2 ms of calls unless the cap of 64 calls is reached
        assert rec["calls_per_sample"] == 64 or rec["calls_per_sample"] * rec["single_call_median_s"] >= 2e-3, (key, rec)
        assert rec["stats"]["median"] > 0 and set(rec["stats"]) >= {"median", "iqr", "rounds"}, (key, rec)
    gn = [rec for key, rec in cases.items() if key.startswith("gn_film_silu[fwd-")]
    assert gn and all(0 < rec["fraction_of_copy_bw"] for rec in gn)


def test_parallelism_rows_are_wrapped(suite_out):
    out, _ = suite_out
    dist = json.loads((out / "gpu_suite.json").read_text())["results"]["train_dist"]
    rows = {v["parallelism"]: v for v in dist.values() if isinstance(v, dict) and v.get("parallelism")}
    assert set(rows) == {"none", "ddp", "fsdp"} and all(r["world_size"] == 1 for r in rows.values())
    # dist_step.py --wrap-single-rank: without it one process trains unwrapped and all three
    # rows time the same model
    assert rows["none"]["wrapper"] == "FlowMapMatching", rows["none"]
    assert rows["ddp"]["wrapper"] == "DistributedDataParallel", rows["ddp"]
    assert rows["fsdp"]["wrapper"].startswith("FSDP"), rows["fsdp"]  # fully_shard's FSDP<Class>
    assert all(r["peak_mem_mb"] > 0 for r in rows.values()), rows  # measured per case, max over ranks


def test_results_file_is_in_bench_format(suite_out):
    out, _ = suite_out
    files = [p for p in out.glob("*_????-??-??.json")]
    assert len(files) == 1, sorted(p.name for p in out.iterdir())
    doc = json.loads(files[0].read_text())
    assert doc["schema"] == "fastflow-bench/1" and doc["source"] == "gpu_suite:cpu"  # the profile
    groups = {r["group"] for r in doc["benchmarks"]}
    assert {"ceilings", "dist_step", "kernels-gn_film_silu", "kernels-attention", "kernels-attention_dual"} <= groups
    for rec in doc["benchmarks"]:
        assert rec["fullname"].startswith("gpu_suite::") and rec["stats"]["median"] > 0, rec


def test_section_budgets_fit_the_deadline():
    """Every section but the opportunistic last one (train_dist: only with time left) fits in the
    profile's deadline less the reserve: before, the full profile's budgets summed to 630 s against
    438 s, so train_compiled got whatever the earlier sections left."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_suite

    for name, profile in gpu_suite.PROFILES.items():
        planned = sum(v for k, v in profile.budgets.items() if k != gpu_suite.SECTIONS[-1])
        assert planned <= profile.total_s - gpu_suite.RESERVE_S, (name, planned, profile.total_s)


def _suite_module():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_suite

    return gpu_suite


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


@pytest.mark.parametrize("expected", [10e-6, None], ids=["bandwidth-known", "bandwidth-unknown"])
def test_pause_waits_until_the_queued_gpu_work_drains(expected):
    """After SIGSTOP the stopped process's queued kernels keep the GPU busy (our probe copies run
    time-sliced, ~1 ms instead of ~10 µs): the timing starts only once probes run at idle speed."""
    suite, clock = _suite_module(), _FakeClock()
    busy_until = 0.25  # a queued compile step of 250 ms

    def probe():
        took = 1.2e-3 if clock.now < busy_until else 11e-6
        clock.now += took
        return took

    got = suite.wait_until_idle(probe, expected, max_wait_s=3.0, clock=clock, sleep=clock.sleep)
    assert got["idle"] and busy_until <= got["waited_s"] < busy_until + 0.05, got


def test_pause_gives_up_on_a_gpu_that_stays_busy():
    suite, clock = _suite_module(), _FakeClock()

    def probe():
        clock.now += 1e-3
        return 1e-3

    got = suite.wait_until_idle(probe, 10e-6, max_wait_s=0.5, clock=clock, sleep=clock.sleep)
    assert not got["idle"] and 0.5 <= got["waited_s"] < 0.51, got
