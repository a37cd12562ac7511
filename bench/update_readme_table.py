"""Render the latest committed benchmark result of each device as a markdown table in README.md.

    python bench/update_readme_table.py                 # replace between the markers in README.md
    python bench/update_readme_table.py --print         # only print the table
    python bench/update_readme_table.py --group unet-fwd_bwd --group data   # more groups
    python bench/update_readme_table.py --uncommitted   # also use result files git does not track yet

The table goes between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``; when README.md
lacks the markers the table is printed and the file left alone. "Committed" = tracked by git
(``git ls-files bench/results``); each row names the device and the date of its result file.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import RESULTS_DIR, format_rate, format_time, load_results  # noqa: E402

START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GROUPS = ("train_step",)


def committed_result_files(results_dir: Path, include_uncommitted: bool) -> List[Path]:
    on_disk = sorted(Path(results_dir).glob("*.json"))
    if include_uncommitted:
        return on_disk
    try:
        out = subprocess.run(["git", "ls-files", "--", str(results_dir)], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"git ls-files failed ({exc}); using every result file on disk", file=sys.stderr)
        return on_disk
    tracked = {(REPO_ROOT / line).resolve() for line in out.stdout.splitlines() if line.endswith(".json")}
    return [p for p in on_disk if p.resolve() in tracked]


def latest_per_device(paths: Sequence[Path]) -> Dict[str, Path]:
    latest: Dict[str, Path] = {}
    for path in sorted(paths, key=lambda p: (p.stem.rpartition("_")[2], p.stat().st_mtime)):
        slug, _, date = path.stem.rpartition("_")
        if slug and len(date) == 10:
            latest[slug] = path  # later dates overwrite earlier ones
    return latest


def _mfu(extra: Dict[str, Any]) -> str:
    if extra.get("mfu") is not None:
        return f"{100 * extra['mfu']:.1f}%"
    if extra.get("mfu_vs_measured") is not None:
        return f"{100 * extra['mfu_vs_measured']:.1f}%†"
    return "-"


def _device_label(device: Dict[str, Any]) -> str:
    name = device.get("device_name") or device.get("slug", "?")
    if device.get("device_type") == "cpu":
        name += f" ({device.get('torch_threads', '?')} thread(s))"
    return name


def render_table(files: Dict[str, Path], groups: Optional[Sequence[str]]) -> str:
    header = ["benchmark", "device", "date", "median", "img/s", "MFU", "peak mem"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|"]
    count = 0
    for slug in sorted(files):
        result = load_results(files[slug])
        device = result["device"]
        records = [r for r in result["benchmarks"] if groups is None or r.get("group") in groups]
        for rec in sorted(records, key=lambda r: (r.get("group") or "", r["name"])):
            extra = rec.get("extra_info") or {}
            cpu_rss = str(extra.get("peak_mem_kind", "")).startswith("cpu_")
            mem = extra.get("peak_mem_delta_mb" if cpu_rss else "peak_mem_mb")
            lines.append("| " + " | ".join([
                f"{rec.get('group') or ''}: {rec['name']}".strip(": "),
                _device_label(device),
                device.get("date", "?"),
                format_time((rec.get("stats") or {}).get("median")),
                format_rate(extra.get("img_per_s")),
                _mfu(extra),
                "-" if mem is None else (f"{mem / 1024:.2f} GiB" if mem >= 1024 else f"{mem:.0f} MiB") + ("‡" if cpu_rss else ""),
            ]) + " |")
            count += 1
    if count == 0:
        return "_No committed benchmark results yet: run `pytest bench/ --benchmark-only --bench-save` and commit bench/results/._"
    note = ("MFU: model FLOPs (FlopCounterMode, loss + backward) per second over the datasheet dense bf16 "
            "peak; † over the measured float32 matmul rate (CPUs). Peak memory: CUDA max allocated; "
            "‡ CPU: growth of the bytes malloc has in use during one step (sampled).")
    return "\n".join(lines) + "\n\n" + note


def replace_between_markers(text: str, table: str) -> Optional[str]:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        return None
    return text[: start + len(START)] + "\n" + table + "\n" + text[end:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--group", action="append", help=f"benchmark group to include (default: {', '.join(DEFAULT_GROUPS)})")
    parser.add_argument("--all", action="store_true", help="every group")
    parser.add_argument("--uncommitted", action="store_true", help="also use result files git does not track")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the table, leave README.md alone")
    args = parser.parse_args(argv)
    groups = None if args.all else (args.group or list(DEFAULT_GROUPS))
    files = latest_per_device(committed_result_files(args.results_dir, args.uncommitted))
    table = render_table(files, groups)
    if args.print_only:
        print(table)
        return 0
    text = args.readme.read_text() if args.readme.is_file() else ""
    updated = replace_between_markers(text, table)
    if updated is None:
        print(f"{args.readme}: no {START} ... {END} markers; the table:\n")
        print(table)
        return 0
    if updated != text:
        args.readme.write_text(updated)
        print(f"{args.readme}: perf table updated ({len(files)} device(s))")
    else:
        print(f"{args.readme}: perf table already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
