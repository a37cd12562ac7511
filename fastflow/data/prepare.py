"""Prepare an image folder once into a uint8 ``.npy`` array (the fast local format).

``data.root=<file>.npy`` then loads it memory-mapped (:class:`~fastflow.data.datasets.ArrayDataset`):
no decoding at start-up or per batch, and the ``gpu_cache`` loader uploads it directly.

Next to the array, ``<file>.npy.json`` (the manifest) records what it was made from: the source
folder, the settings, how many images, which files were skipped, and a digest of the source
listing (relative path, size, mtime of every file). ``--check`` compares it with the folder now;
a run of ``prepare`` over an up-to-date array does nothing (``--force`` redoes it).

    python -m fastflow.data.prepare /data/celeba64/train /data/celeba64_train.npy --num-workers 8
    python -m fastflow.data.prepare --check /data/celeba64_train.npy
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from fastflow.io import atomic_write

from .datasets import MANIFEST_FORMAT, BadImageError, ImageFolderDataset, list_image_files, manifest_path, read_manifest
from .loaders import build_uint8_cache

__all__ = ["prepare_folder", "check_prepared", "manifest_path", "read_manifest", "main", "DECODER_VERSION"]

# What decoding does to a file, as a number the manifest keeps: raise it whenever a change of
# decode_image_file would give other pixels, so that `--check` reports arrays decoded the old way.
#   1: center crop + bicubic resize;  2: EXIF orientation applied first (photos upright).
DECODER_VERSION = 2

def _listing_digest(root: Path, files: Sequence[Path]) -> str:
    """sha256 over (relative path, size, mtime_ns) of every file: changes when any file is added,
    removed, renamed, rewritten or touched."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_prepared(
    dst: str | os.PathLike,
    src: Optional[str | os.PathLike] = None,
    image_size: Optional[int] = None,
    channels: Optional[int] = None,
) -> List[str]:
    """Why ``dst`` is not an up-to-date preparation of ``src`` (default: the manifest's source) with
    these settings (default: the manifest's); an empty list when it is."""
    dst = Path(dst).expanduser()
    if not dst.is_file():
        return [f"{dst} does not exist"]
    manifest = read_manifest(dst)
    if manifest is None:
        return [f"{dst} has no manifest {manifest_path(dst).name} (prepared by an older fastflow, or the "
                f"write was interrupted): its source is unknown"]
    reasons = []
    root = Path(src).expanduser().resolve() if src is not None else Path(manifest["source"])
    if str(root) != manifest["source"]:
        reasons.append(f"prepared from {manifest['source']}, not {root}")
    for key, want in (("image_size", image_size), ("channels", channels)):
        if want is not None and manifest[key] != want:
            reasons.append(f"prepared with {key}={manifest[key]}, not {want}")
    decoder = manifest.get("decoder", 1)  # manifests before the version was kept: 1
    if decoder != DECODER_VERSION:
        reasons.append(f"decoded by decoder version {decoder}, this fastflow decodes with version {DECODER_VERSION} "
                       f"(EXIF orientation applied): photos with a rotation tag may be stored sideways")
    try:
        shape = tuple(np.load(dst, mmap_mode="r").shape)
    except (OSError, ValueError) as exc:
        return reasons + [f"{dst} cannot be read as a .npy array ({exc})"]
    if list(shape) != manifest["shape"]:
        reasons.append(f"{dst} holds an array of shape {list(shape)}, its manifest says {manifest['shape']}")
    if not root.is_dir():
        return reasons + [f"source folder {root} is not there (cannot check the array is up to date)"]
    files = list_image_files(root)
    if len(files) != manifest["num_source_files"] or _listing_digest(root, files) != manifest["listing_sha256"]:
        reasons.append(f"{root} changed since the array was prepared ({manifest['num_source_files']} image files "
                       f"then, {len(files)} now, or files rewritten/renamed)")
    return reasons


def prepare_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    image_size: int = 64,
    channels: int = 3,
    *,
    num_workers: int = 0,
    on_bad_image: str = "error",
) -> Path:
    """Decode every image under ``src`` (as :class:`ImageFolderDataset` does: sorted, center crop,
    bicubic resize) into ``dst`` (``.npy``, uint8 ``(N, S, S, C)``) and its manifest.

    Both are written atomically (temp file + fsync + rename), the old manifest removed first, so
    an interrupted run leaves either the previous pair or an array without a manifest, which
    :func:`check_prepared` reports. ``on_bad_image='skip'`` leaves unreadable files out (and
    warns; the manifest lists them); ``'error'`` stops at the first, naming it. Returns ``dst``.
    """
    dst = Path(dst).expanduser()
    if dst.suffix != ".npy":
        raise ValueError(f"prepare_folder writes a .npy file, got {dst}")
    dataset = ImageFolderDataset(src, image_size, channels, augment=False, on_bad_image=on_bad_image)
    root = dataset.root.resolve()
    digest = _listing_digest(dataset.root, dataset.files)  # before decoding: a later change shows
    cache = build_uint8_cache(dataset, num_workers=num_workers)
    keep = [i for i, path in enumerate(dataset.files) if str(path) not in dataset.bad_files]
    if not keep:
        raise ValueError(f"{root}: none of its {len(dataset)} image files could be decoded")
    if len(keep) < len(dataset):
        cache = cache[keep]
    array = cache.permute(0, 2, 3, 1).contiguous().numpy()
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": str(root),
        "image_size": image_size,
        "channels": channels,
        "decoder": DECODER_VERSION,
        "shape": list(array.shape),
        "num_source_files": len(dataset),
        "listing_sha256": digest,
        "skipped": sorted(Path(p).relative_to(dataset.root).as_posix() for p in dataset.bad_files),
        "on_bad_image": on_bad_image,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest_path(dst).unlink(missing_ok=True)
    atomic_write(dst, lambda handle: np.save(handle, array))
    text = json.dumps(manifest, indent=1) + "\n"
    atomic_write(manifest_path(dst), lambda handle: handle.write(text.encode()))
    return dst


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastflow.data.prepare",
        description="Pack an image folder into one uint8 .npy array (+ a manifest) that data.root can name.")
    parser.add_argument("src", nargs="?", help="image folder (.jpg/.jpeg/.png, recursive)")
    parser.add_argument("dst", help="output .npy file")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--num-workers", type=int, default=0, help="decoding processes (0: in this process)")
    parser.add_argument("--on-bad-image", choices=("error", "skip"), default="error")
    parser.add_argument("--force", action="store_true", help="prepare again even if dst is up to date")
    parser.add_argument("--check", action="store_true",
                        help="only report whether dst is an up-to-date preparation (exit status 1 if not)")
    args = parser.parse_args(argv)
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.image_size <= 0:
        parser.error(f"--image-size must be positive, got {args.image_size}")
    if args.check:
        reasons = check_prepared(args.dst, args.src)
        for reason in reasons:
            print(f"stale: {reason}", file=sys.stderr)
        if not reasons:
            print(f"{args.dst}: up to date with {read_manifest(args.dst)['source']}")
        return 1 if reasons else 0
    if args.src is None:
        parser.error("SRC (the image folder) is needed unless --check")
    if not args.force and Path(args.dst).expanduser().is_file() and not check_prepared(
            args.dst, args.src, args.image_size, args.channels):
        print(f"{args.dst}: up to date, nothing to do (--force prepares it again)")
        return 0
    try:
        dst = prepare_folder(args.src, args.dst, args.image_size, args.channels,
                             num_workers=args.num_workers, on_bad_image=args.on_bad_image)
    except (BadImageError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    manifest = read_manifest(dst)
    skipped = len(manifest["skipped"])
    print(f"wrote {dst}: {manifest['shape'][0]} images of {args.image_size}x{args.image_size}x{args.channels}"
          f" ({dst.stat().st_size / 2**20:.1f} MiB){f', {skipped} unreadable files skipped' if skipped else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
