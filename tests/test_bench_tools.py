"""bench/compare.py and bench/update_readme_table.py on result files made here.

A day's result file holds only the suites run that day, so a device's latest numbers for one
benchmark can sit in an older file than its latest numbers for another: the trend and the README
table must follow each benchmark through all of the device's files.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import compare, update_readme_table  # noqa: E402


def _record(group, name, median, img_per_s=None):
    extra = {} if img_per_s is None else {"img_per_s": img_per_s, "mfu": 0.25, "peak_mem_mb": 2048.0}
    return {"name": name, "fullname": f"bench/x.py::{name}", "group": group,
            "stats": {"median": median}, "extra_info": extra}


def _write(directory, slug, date, records, bench_size="small", name="Test GPU", tag=""):
    doc = {"schema": "fastflow-bench/1", "device": {"slug": slug, "date": date, "device_name": name,
                                                    "device_type": "cuda"},
           "bench_size": bench_size, "benchmarks": records}
    path = directory / f"{slug}_{date}{tag}.json"
    path.write_text(json.dumps(doc))
    return path


def _results(tmp_path):
    _write(tmp_path, "gpu-x", "2026-11-01", [_record("train_step", "step[fm]", 0.100, 1280.0),
                                             _record("kernels", "gn[fused]", 2e-3)])
    _write(tmp_path, "gpu-x", "2026-11-05", [_record("kernels", "gn[fused]", 1e-3)])  # kernels only
    _write(tmp_path, "gpu-x", "2026-11-07", [_record("train_step", "step[fm]", 0.080, 1600.0)],
           bench_size="default")  # another size: its own history
    _write(tmp_path, "gpu-x", "2026-11-07", [_record("dist_step", "dist_step[fm-ddp]", 0.200, 640.0)],
           tag="_dist")  # bench/dist_step.py's file: the same device and day, its own benchmarks
    (tmp_path / "gpu-x_latest.json").write_text("{}")  # not a dated result file: ignored
    return compare.result_files(tmp_path)


def test_history_follows_each_benchmark_through_the_device_files(tmp_path):
    files = _results(tmp_path)
    assert sorted(p.name for p in files["gpu-x"]) == ["gpu-x_2026-11-01.json", "gpu-x_2026-11-05.json",
                                                      "gpu-x_2026-11-07.json", "gpu-x_2026-11-07_dist.json"]
    assert [p.name[:16] for p in files["gpu-x"]][:2] == ["gpu-x_2026-11-01", "gpu-x_2026-11-05"]
    rows = {row[0]: row for row in compare.history_rows(compare.device_history(files["gpu-x"]))}
    assert set(rows) == {"kernels: gn[fused]", "train_step: step[fm] [small]", "train_step: step[fm] [default]",
                         "dist_step: dist_step[fm-ddp]"}
    assert rows["dist_step: dist_step[fm-ddp]"][3:5] == ["2026-11-07", "200 ms"]
    # kernel: 11-01 -> 11-05, half the time
    assert rows["kernels: gn[fused]"][1:6] == ["2026-11-01", "2 ms", "2026-11-05", "1 ms", "-50.0%"]
    # small-size train step: only in the 11-01 file, not hidden by the later kernel-only file
    assert rows["train_step: step[fm] [small]"][1:5] == ["-", "-", "2026-11-01", "100 ms"]
    assert rows["train_step: step[fm] [small]"][7] == "1,280"
    # the default-size result has no earlier one of its size: no change against the small one;
    # sizes are named only where a benchmark has more than one
    assert rows["train_step: step[fm] [default]"][5] == "-"
    text = compare.compare_device("gpu-x", files["gpu-x"])
    assert text.startswith("Test GPU [gpu-x]: 4 result file(s), 2026-11-01 … 2026-11-07")


def test_readme_table_takes_each_benchmark_from_its_newest_file(tmp_path):
    _results(tmp_path)
    files = update_readme_table.device_files(tmp_path, include_uncommitted=True)
    table = update_readme_table.render_table(files, ["train_step"])
    rows = [line for line in table.splitlines() if line.startswith("| train_step")]
    assert rows == [
        "| train_step: step[fm] [default] | Test GPU | 2026-11-07 | 80 ms | 1,600 | 25.0% | 2.00 GiB |",
        "| train_step: step[fm] [small] | Test GPU | 2026-11-01 | 100 ms | 1,280 | 25.0% | 2.00 GiB |",
    ]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{update_readme_table.START}\nold\n{update_readme_table.END}\nrest\n")
    assert update_readme_table.main(["--readme", str(readme), "--results-dir", str(tmp_path), "--uncommitted"]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| train_step: step[fm] [default] | Test GPU | 2026-11-07 | 80 ms |" in text


def test_readme_table_without_results_says_so(tmp_path):
    assert "No committed benchmark results" in update_readme_table.render_table({}, None)
