"""Trend of each benchmark of a device: its latest result against the one before it.

    python bench/compare.py                          # every device in bench/results/ with results
    python bench/compare.py --device nvidia-h200     # one device
    python bench/compare.py OLD.json NEW.json        # two given files (ours or --benchmark-json ones)

Result files are ``bench/results/<device-slug>_<YYYY-MM-DD>[_<tag>].json`` (written by
``pytest bench/ --benchmark-only --bench-save`` and by the GPU suite; bench/dist_step.py adds the
tag ``_dist``). A day's file holds the suites
run that day, so a benchmark's latest and previous results can lie in different files: per device,
each benchmark (at each bench size) is followed through all of the device's files and its newest
two results are compared, with their dates. For each it prints the median time, img/s (when the
case reports it) and the change in percent; a positive img/s change and a negative time change are
improvements. Two given files are compared with each other only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def load_results(path: Path) -> Dict[str, Any]:
    """A result file (``bench.utils.write_results``'s, or pytest-benchmark's ``--benchmark-json``) as
    ``{'device': {..., 'slug', 'date'}, 'benchmarks': [...], 'path', 'source', 'bench_size'}``."""
    path = Path(path)
    doc = json.loads(path.read_text())
    device = doc.get("device")
    if device is None:  # pytest-benchmark's own JSON: bench/conftest.py adds machine_info['fastflow_device']
        machine = doc.get("machine_info", {})
        device = dict(machine.get("fastflow_device") or {})
        if doc.get("datetime"):
            device.setdefault("date", str(doc["datetime"])[:10])
    named = parse_result_name(path)
    if named is not None:
        device.setdefault("slug", named[0])
        if not device.get("date"):
            device["date"] = named[1]
    device.setdefault("slug", path.stem)
    device.setdefault("device_name", device["slug"])
    return {"device": device, "benchmarks": doc.get("benchmarks", []), "path": str(path),
            "source": doc.get("source", "pytest"), "bench_size": doc.get("bench_size")}


_RESULT_NAME = re.compile(r"^(?P<slug>.+)_(?P<date>\d{4}-\d{2}-\d{2})(?:_(?P<tag>\w+))?$")


def parse_result_name(path: Path) -> Optional[Tuple[str, str, str]]:
    """(device slug, date, tag) of ``<slug>_<YYYY-MM-DD>[_<tag>].json`` (tag e.g. ``dist`` for
    bench/dist_step.py's file; '' when absent), or None for any other name."""
    match = _RESULT_NAME.match(Path(path).stem)
    if match is None:
        return None
    return match["slug"], match["date"], match["tag"] or ""


def result_files(results_dir: Path) -> Dict[str, List[Path]]:
    """slug -> result files sorted oldest → newest (by the date in the name, then mtime)."""
    by_slug: Dict[str, List[Tuple[str, float, Path]]] = defaultdict(list)
    for path in Path(results_dir).glob("*.json"):
        named = parse_result_name(path)
        if named is not None:
            slug, date, _ = named
            by_slug[slug].append((date, path.stat().st_mtime, path))
    return {slug: [p for _, _, p in sorted(items)] for slug, items in by_slug.items()}


def format_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_rate(value: Optional[float]) -> str:
    return "-" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")


def change(old: Optional[float], new: Optional[float]) -> str:
    if not old or new is None:
        return "-"
    return f"{100.0 * (new - old) / old:+.1f}%"


def _key(record: Dict[str, Any]) -> str:
    return record.get("fullname") or record["name"]


def _median(record: Optional[Dict[str, Any]]) -> Optional[float]:
    return None if record is None else (record.get("stats") or {}).get("median")


def _img_s(record: Optional[Dict[str, Any]]) -> Optional[float]:
    return None if record is None else (record.get("extra_info") or {}).get("img_per_s")


def trend_rows(old: Optional[Dict[str, Any]], new: Dict[str, Any]) -> List[List[str]]:
    old_by = {_key(r): r for r in (old or {}).get("benchmarks", [])}
    new_by = {_key(r): r for r in new["benchmarks"]}
    names = sorted(set(old_by) | set(new_by), key=lambda k: ((new_by.get(k) or old_by.get(k)).get("group") or "", k))
    rows = []
    for name in names:
        o, n = old_by.get(name), new_by.get(name)
        rec = n or o
        label = f"{rec.get('group') or ''}: {rec['name']}".strip(": ")
        if n is None:
            label += " (gone)"
        elif o is None and old is not None:
            label += " (new)"
        rows.append([
            label, format_time(_median(o)), format_time(_median(n)), change(_median(o), _median(n)),
            format_rate(_img_s(o)), format_rate(_img_s(n)), change(_img_s(o), _img_s(n)),
        ])
    return rows


Entry = Tuple[str, Dict[str, Any], Dict[str, Any]]  # (date, record, device) of one result


def device_history(paths: Sequence[Path]) -> Dict[Tuple[str, str], List[Entry]]:
    """(bench size, benchmark) -> its results, oldest → newest, over one device's result files
    (``paths`` sorted oldest → newest, as ``result_files`` gives them)."""
    history: Dict[Tuple[str, str], List[Entry]] = defaultdict(list)
    for path in paths:
        result = load_results(path)
        for record in result["benchmarks"]:
            # the record's own size first: a same-day merge keeps records of another run's size
            size = (record.get("extra_info") or {}).get("bench_size") or result["bench_size"] or ""
            history[(str(size), _key(record))].append(
                (str(result["device"].get("date", "?")), record, result["device"]))
    return dict(history)


def labels(history: Dict[Tuple[str, str], List[Entry]]) -> Dict[Tuple[str, str], str]:
    """'group: name' per benchmark, with ' [size]' where a device has it at more than one size."""
    sizes: Dict[str, int] = defaultdict(int)
    for _, key in history:
        sizes[key] += 1
    out = {}
    for size, key in history:
        record = history[(size, key)][-1][1]
        label = f"{record.get('group') or ''}: {record['name']}".strip(": ")
        out[(size, key)] = label + (f" [{size or '?'}]" if sizes[key] > 1 else "")
    return out


def latest_entries(paths: Sequence[Path]) -> List[Tuple[str, Entry]]:
    """(label, newest result) of every benchmark of a device, whichever file holds it."""
    history = device_history(paths)
    names = labels(history)
    return [(names[key], entries[-1]) for key, entries in history.items()]


def history_rows(history: Dict[Tuple[str, str], List[Entry]]) -> List[List[str]]:
    rows = []
    names = labels(history)
    for key in sorted(history, key=lambda k: (history[k][-1][1].get("group") or "", names[k])):
        entries = history[key]
        new_date, n, _ = entries[-1]
        old_date, o, _ = entries[-2] if len(entries) > 1 else ("-", None, None)
        label = names[key]
        rows.append([
            label, old_date, format_time(_median(o)), new_date, format_time(_median(n)),
            change(_median(o), _median(n)), format_rate(_img_s(o)), format_rate(_img_s(n)),
            change(_img_s(o), _img_s(n)),
        ])
    return rows


def _file_date(path: Path) -> str:
    named = parse_result_name(path)
    return named[1] if named is not None else "?"


def compare_device(slug: str, paths: Sequence[Path]) -> str:
    """Each benchmark's newest result against its previous one, over a device's files."""
    device = load_results(paths[-1])["device"]
    title = (f"{device.get('device_name', slug)} [{slug}]: {len(paths)} result file(s), "
             f"{_file_date(paths[0])} … {_file_date(paths[-1])}")
    headers = ["benchmark", "old date", "median old", "new date", "median new", "Δ time",
               "img/s old", "img/s new", "Δ img/s"]
    return title + "\n" + render(history_rows(device_history(paths)), headers)


def render(rows: Sequence[Sequence[str]], headers: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def compare(old_path: Optional[Path], new_path: Path) -> str:
    new = load_results(new_path)
    old = load_results(old_path) if old_path is not None else None
    dev = new["device"]
    title = f"{dev.get('device_name', dev.get('slug'))} [{dev.get('slug')}]: "
    title += f"{Path(old_path).name} -> {Path(new_path).name}" if old_path else f"{Path(new_path).name} (no earlier result)"
    headers = ["benchmark", "median old", "median new", "Δ time", "img/s old", "img/s new", "Δ img/s"]
    return title + "\n" + render(trend_rows(old, new), headers)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="OLD NEW result files (default: every device's history)")
    parser.add_argument("--device", help="device slug, e.g. nvidia-h200 or cpu-amd-epyc-2t")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.files:
        if len(args.files) != 2:
            parser.error("give two files (OLD NEW) or none")
        print(compare(args.files[0], args.files[1]))
        return 0
    files = result_files(args.results_dir)
    if args.device:
        files = {k: v for k, v in files.items() if k == args.device}
    if not files:
        print(f"no result files{' for ' + args.device if args.device else ''} in {args.results_dir}")
        return 1
    print("\n\n".join(compare_device(slug, files[slug]) for slug in sorted(files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
