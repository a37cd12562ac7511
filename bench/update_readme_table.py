"""Render the latest committed result of each benchmark of each device as a markdown table in README.md.

    python bench/update_readme_table.py                 # replace between the markers in README.md
    python bench/update_readme_table.py --print         # only print the table
    python bench/update_readme_table.py --group unet-fwd_bwd --group data   # more groups
    python bench/update_readme_table.py --uncommitted   # also use result files git does not track yet

The table goes between ``<!-- perf-table:start -->`` and ``<!-- perf-table:end -->``; when README.md
lacks the markers the table is printed and the file left alone. "Committed" = tracked by git
(``git ls-files bench/results``). A day's file holds only the suites run that day, so each
benchmark's row comes from the newest file of its device that holds it, and names the device and
that file's date.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.compare import RESULTS_DIR, format_rate, format_time, latest_entries, result_files  # noqa: E402

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


def device_files(results_dir: Path, include_uncommitted: bool) -> Dict[str, List[Path]]:
    """slug -> that device's committed result files, oldest → newest."""
    keep = {p.resolve() for p in committed_result_files(results_dir, include_uncommitted)}
    by_slug = {slug: [p for p in paths if p.resolve() in keep] for slug, paths in result_files(results_dir).items()}
    return {slug: paths for slug, paths in by_slug.items() if paths}


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


def render_table(files: Dict[str, List[Path]], groups: Optional[Sequence[str]]) -> str:
    header = ["benchmark", "device", "date", "median", "img/s", "MFU", "peak mem"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * 4) + "|"]
    count = 0
    for slug in sorted(files):
        entries = [e for e in latest_entries(files[slug]) if groups is None or e[1][1].get("group") in groups]
        for label, (date, rec, device) in sorted(entries, key=lambda e: (e[1][1].get("group") or "", e[0])):
            extra = rec.get("extra_info") or {}
            cpu_rss = str(extra.get("peak_mem_kind", "")).startswith("cpu_")
            mem = extra.get("peak_mem_delta_mb" if cpu_rss else "peak_mem_mb")
            lines.append("| " + " | ".join([
                label,
                _device_label(device),
                date,
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
    files = device_files(args.results_dir, args.uncommitted)
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
