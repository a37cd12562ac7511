"""Datasets: an image folder, a Hugging Face Hub dataset, a prepared ``.npy`` array, and the
built-in scikit-learn digits (no download).

Every dataset here shares one shape of API (:class:`ImageDataset`):

- ``dataset[i]`` -> float32 ``(C, S, S)`` in ``[-1, 1]``, randomly flipped when ``augment``
  (torch's global RNG: for standalone use; the loaders make their own seeded flip decisions);
- ``dataset.load_uint8(i)`` -> uint8 ``(C, S, S)``, never flipped: what loaders move around
  (4x fewer bytes than float32);
- ``dataset.num_skipped`` / ``dataset.bad_files``: unreadable files met so far.

Unreadable files are found lazily, when an index is first loaded (an up-front decode of 200k
files would cost tens of seconds every start; ``prepare_folder`` and the ``gpu_cache`` loader
decode everything once anyway). With ``on_bad_image='error'`` the first one raises
:class:`BadImageError` naming the file. With ``'skip'`` index ``i`` is served by the next
readable index ``i+1, i+2, ...`` (wrapping): a pure function of the files, so batches stay the
same whichever worker process loads them and across resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import _check_channels, pil_to_uint8, uint8_to_float

__all__ = [
    "BadImageError",
    "DatasetUnavailableError",
    "ImageDataset",
    "ImageFolderDataset",
    "HubDataset",
    "ArrayDataset",
    "DigitsDataset",
    "IMAGE_EXTENSIONS",
    "create_dataset_from_config",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ON_BAD_IMAGE = ("error", "skip")


class BadImageError(OSError):
    """An image that cannot be decoded; the message names the file."""


class DatasetUnavailableError(RuntimeError):
    """A dataset source that cannot be used here (package missing, hub unreachable, ...)."""


def warn_skipped(count_before: int, count_after: int, names: Sequence[str], source: str) -> None:
    """Warn when the number of skipped files reaches 1, 2, 4, 8, ... (a few names, not a flood)."""
    if count_after <= count_before or not names:
        return
    crossed = any(count_before < 2**k <= count_after for k in range(0, 64))
    if crossed:
        shown = ", ".join(str(n) for n in list(names)[:5])
        more = " ..." if len(names) > 5 else ""
        warnings.warn(
            f"{source}: skipped {count_after} unreadable image file(s) so far "
            f"(data.on_bad_image=skip); newest: {shown}{more}",
            RuntimeWarning,
            stacklevel=3,
        )


class ImageDataset(Dataset):
    """Base class: square images of side ``image_size`` with ``channels`` (1 or 3) channels.

    Subclasses implement ``__len__``, ``_decode(i) -> uint8 (C, S, S)`` (raising
    :class:`BadImageError` for an unreadable item) and ``_describe(i)`` (the item's name).
    """

    source: str = "<dataset>"

    def __init__(self, image_size: int, channels: int, augment: bool, on_bad_image: str = "error"):
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        _check_channels(channels)
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.augment = bool(augment)
        self.on_bad_image = on_bad_image
        self.bad_files: Set[str] = set()
        self._bad_indices: Set[int] = set()

    # -- subclass hooks -------------------------------------------------------------------
    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _decode(self, index: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        return f"{self.source}[{index}]"

    def as_uint8_tensor(self) -> Optional[Tensor]:
        """The whole dataset as uint8 ``(N, C, S, S)`` when it is already in memory, else None."""
        return None

    @property
    def fingerprint(self) -> str:
        """A cheap digest of which images this dataset holds, in which order (no decoding): ranks
        compare it, so that node-local copies holding other files are refused. Here: the source's
        name and size; subclasses that know their files say more."""
        return f"{self.source}:{len(self)}"

    # -- shared behaviour ------------------------------------------------------------------
    @property
    def num_skipped(self) -> int:
        """Number of distinct unreadable files met so far (``on_bad_image='skip'``)."""
        return len(self.bad_files)

    def load_with_report(self, index: int) -> Tuple[Tensor, Tuple[str, ...]]:
        """uint8 ``(C, S, S)`` for ``index`` (or its substitute) and the names of files newly
        found unreadable on the way (what worker processes report back to the loader)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {self.source} with {n} images")
        index %= n
        newly_bad: List[str] = []
        for step in range(n):
            candidate = (index + step) % n
            if candidate in self._bad_indices:
                continue
            try:
                return self._decode(candidate), tuple(newly_bad)
            except BadImageError:
                if self.on_bad_image == "error":
                    raise
                name = self._describe(candidate)
                self._bad_indices.add(candidate)
                self.bad_files.add(name)
                newly_bad.append(name)
        raise BadImageError(f"{self.source}: none of its {n} images could be decoded")

    def load_uint8(self, index: int) -> Tensor:
        """uint8 ``(C, S, S)`` for ``index``: no flip; unreadable files handled per ``on_bad_image``."""
        before = self.num_skipped
        image, newly_bad = self.load_with_report(index)
        warn_skipped(before, self.num_skipped, newly_bad, self.source)
        return image

    def __getitem__(self, index: int) -> Tensor:
        """float32 ``(C, S, S)`` in ``[-1, 1]``; flipped left-right with probability 1/2 if ``augment``."""
        image = self.load_uint8(index)
        if self.augment and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return uint8_to_float(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.source}, n={len(self)}, size={self.image_size}, "
            f"channels={self.channels}, augment={self.augment})"
        )


# ----------------------------------------------------------------------------------- folder
def list_image_files(root: Path) -> List[Path]:
    """All ``.jpg/.jpeg/.png`` files (any case) under ``root``, recursively, sorted by relative
    POSIX path (deterministic across filesystems). Hidden files and folders (``.*``, e.g. macOS
    ``._x.jpg`` resource forks) are ignored. Symbolic links to folders are followed, but each
    folder is read once: a link cycle or a second link to the same folder adds nothing. A folder
    that cannot be listed (permission denied, stale NFS handle) raises ``OSError`` naming it:
    left out, its images would silently vanish from the dataset."""
    found: List[Tuple[str, Path]] = []
    seen_dirs = set()  # (st_dev, st_ino) of every folder walked: links are followed, once each

    def unlistable(exc: OSError) -> None:
        raise OSError(
            exc.errno, f"cannot list the folder {exc.filename} under data.root={root} ({exc.strerror}): its "
            f"images would be left out; fix its permissions or mount, or move it out of data.root"
        ) from exc

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen_dirs:  # a link cycle (a/up -> ..) or a second alias
            dirnames[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath) / name
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


_EXIF_ORIENTATION = 0x0112


def upright(image: Image.Image) -> Image.Image:
    """``image`` as viewers show it: its EXIF orientation (set by phone cameras, which store the
    sensor's pixels and a rotation tag) applied; the image itself when it has no such tag."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def decode_image_file(path: Path, image_size: int, channels: int) -> Tensor:
    """Decode one file to uint8 ``(C, S, S)`` (see :func:`~fastflow.data.transforms.pil_to_uint8`),
    turned upright by its EXIF orientation (:func:`upright`); a decoder failure becomes
    :class:`BadImageError` naming the file. Errors of the system, not of the file's content
    (permission denied, I/O errors: an ``OSError`` with an errno; out of memory) propagate:
    ``on_bad_image=skip`` must not replace images it merely failed to read."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG" and min(image.size) >= 2 * image_size:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below image_size).
                image.draft("L" if channels == 1 else "RGB", (image_size, image_size))
            image.load()
            return pil_to_uint8(upright(image), image_size, channels)
    except FileNotFoundError as exc:
        raise BadImageError(f"image file disappeared: {path} ({exc})") from exc
    except MemoryError:
        raise
    except OSError as exc:
        if exc.errno is not None:  # EACCES, EIO, ESTALE, ...: the system's, not the file's
            raise
        raise BadImageError(f"cannot decode image file {path}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadImageError(f"cannot decode image file {path}: {type(exc).__name__}: {exc}") from exc


class ImageFolderDataset(ImageDataset):
    """Every ``.jpg/.jpeg/.png`` under ``root`` (recursive, case-insensitive, sorted).

    Decoded to RGB (``channels=3``) or L (``channels=1``), turned upright by its EXIF orientation,
    center-cropped to a square if needed, resized to ``image_size`` (bicubic), scaled to
    ``[-1, 1]``; random horizontal flip when ``augment``. A missing folder or one without images raises ``FileNotFoundError`` naming it.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int = 64,
        channels: int = 3,
        augment: bool = True,
        on_bad_image: str = "error",
    ):
        super().__init__(image_size, channels, augment, on_bad_image)
        self.root = Path(root).expanduser()
        self.source = str(self.root)
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root} (set data.root to a folder of images)")
        if not self.root.is_dir():
            raise NotADirectoryError(f"data.root is not a folder: {self.root}")
        self.files = list_image_files(self.root)
        if not self.files:
            raise FileNotFoundError(
                f"no image files ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {self.root}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> Tensor:
        return decode_image_file(self.files[index], self.image_size, self.channels)

    def _describe(self, index: int) -> str:
        return str(self.files[index])

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the sorted relative paths: a file renamed, added or removed changes it."""
        listing = "\n".join(path.relative_to(self.root).as_posix() for path in self.files)
        return "folder:" + hashlib.sha256(listing.encode()).hexdigest()


# -------------------------------------------------------------------------------------- hub
def _hub_help(repo_name: str) -> str:
    return (
        f"cannot load the Hugging Face dataset {repo_name!r}. Use a local copy instead: "
        f"data.dataset=folder data.root=/path/to/images (or data.dataset=digits for the built-in "
        f"demo data). With `datasets` installed and the data cached, HF_DATASETS_OFFLINE=1 "
        f"HF_HUB_OFFLINE=1 loads it without a network."
    )


def _import_datasets(what: str) -> Any:
    try:
        import datasets  # noqa: F401  (optional dependency)
    except ImportError as exc:
        raise DatasetUnavailableError(
            f"the `datasets` package is not installed; {what}"
        ) from exc
    return datasets


class HubDataset(ImageDataset):
    """A Hugging Face dataset with an image column (``datasets.load_dataset(repo_name, split)``),
    or one saved with ``save_to_disk`` (:meth:`from_disk`).

    ``datasets`` is optional: without it, or without access to the hub, construction raises
    :class:`DatasetUnavailableError` naming the repo and the local-folder alternative.
    """

    def __init__(
        self,
        repo_name: str,
        split: str = "train",
        image_size: int = 64,
        channels: int = 3,
        augment: bool = True,
        on_bad_image: str = "error",
        *,
        data: Any = None,
    ):
        super().__init__(image_size, channels, augment, on_bad_image)
        self.repo_name = repo_name
        self.split = split
        self.source = f"hub:{repo_name}[{split}]"
        if data is None:
            datasets = _import_datasets(_hub_help(repo_name))
            try:
                data = datasets.load_dataset(repo_name, split=split)
            except Exception as exc:  # network, auth, missing repo/split: all end the same way
                raise DatasetUnavailableError(f"{_hub_help(repo_name)} ({type(exc).__name__}: {exc})") from exc
        self._data = data
        self._column = self._image_column(data)
        if len(data) == 0:
            raise DatasetUnavailableError(f"{self.source} has no rows")

    @property
    def fingerprint(self) -> str:
        """The Arrow dataset's own fingerprint (``datasets`` hashes its data files and every
        transform applied; ``save_to_disk`` keeps it), with the split and size; the source's name
        and size for data without one."""
        own = getattr(self._data, "_fingerprint", None)
        if own is None:
            return super().fingerprint
        return f"hub:{self.split}:{len(self)}:{own}"

    @classmethod
    def from_disk(cls, path: str | os.PathLike, split: str = "train", **kwargs: Any) -> "HubDataset":
        """A dataset written by ``datasets.save_to_disk`` (a ``DatasetDict`` or a ``Dataset``)."""
        datasets = _import_datasets(f"cannot read the saved Hugging Face dataset at {path}")
        loaded = datasets.load_from_disk(str(path))
        if hasattr(loaded, "keys") and not hasattr(loaded, "column_names"):
            if split not in loaded:
                raise DatasetUnavailableError(f"{path}: no split {split!r} (has {', '.join(loaded.keys())})")
            loaded = loaded[split]
        dataset = cls(f"disk:{path}", split, data=loaded, **kwargs)
        dataset.source = f"{path}[{split}]"
        return dataset

    @staticmethod
    def _image_column(data: Any) -> str:
        names = list(getattr(data, "column_names", None) or [])
        if "image" in names:
            return "image"
        features = getattr(data, "features", None) or {}
        for name in names:
            if type(features.get(name)).__name__ == "Image":
                return name
        for name in ("img", "images"):
            if name in names:
                return name
        raise DatasetUnavailableError(f"no image column among {names} (expected 'image')")

    def __len__(self) -> int:
        return len(self._data)

    def _decode(self, index: int) -> Tensor:
        try:
            item = self._data[index][self._column]
            if isinstance(item, dict):  # undecoded Image feature: {"bytes": ..., "path": ...}
                import io

                source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
                with Image.open(source) as image:
                    image.load()
                    return pil_to_uint8(upright(image), self.image_size, self.channels)
            item.load()
            return pil_to_uint8(upright(item), self.image_size, self.channels)
        except Exception as exc:
            raise BadImageError(f"cannot decode image {self._describe(index)}: {type(exc).__name__}: {exc}") from exc


# ------------------------------------------------------------------------------------ array
MANIFEST_FORMAT = "fastflow-prepared-images/1"


def manifest_path(dst: str | os.PathLike) -> Path:
    """``<dst>.json``: the manifest written next to a prepared array."""
    dst = Path(dst).expanduser()
    return dst.with_name(dst.name + ".json")


def read_manifest(dst: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The manifest of a prepared array, or None if it has none; a clear error if it is unreadable."""
    path = manifest_path(dst)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable manifest of a prepared array ({exc}); prepare it again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: not a fastflow manifest (format {MANIFEST_FORMAT!r} expected); prepare it again")
    return manifest


class ArrayDataset(ImageDataset):
    """A prepared uint8 array ``(N, S, S, C)`` in a ``.npy`` file (see ``prepare_folder``),
    memory-mapped: no decoding at all. Its size and channels must match the config, and its shape
    its manifest's (``<file>.npy.json``, if present; ``python -m fastflow.data.prepare --check``
    compares it with the source folder)."""

    def __init__(self, path: str | os.PathLike, image_size: int = 64, channels: int = 3, augment: bool = True):
        super().__init__(image_size, channels, augment, "error")
        self.path = Path(path).expanduser()
        self.source = str(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"prepared image array not found: {self.path}")
        try:
            self._array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as exc:  # truncated, not a .npy, pickled objects, ...
            raise ValueError(
                f"{self.path}: cannot be read as a prepared image array ({type(exc).__name__}: {exc}); "
                f"prepare it again (python -m fastflow.data.prepare SRC {self.path})"
            ) from exc
        shape = tuple(self._array.shape)
        if self._array.dtype != np.uint8 or len(shape) != 4:
            raise ValueError(f"{self.path}: expected a uint8 array (N, H, W, C), got {self._array.dtype} {shape}")
        if shape[1:] != (image_size, image_size, channels):
            raise ValueError(
                f"{self.path}: holds {shape[1]}x{shape[2]}x{shape[3]} images but the config asks for "
                f"{image_size}x{image_size}x{channels}; prepare it again with that size"
            )
        if shape[0] == 0:
            raise FileNotFoundError(f"prepared image array {self.path} holds no images")
        manifest = read_manifest(self.path)
        if manifest is not None and manifest["shape"] != list(shape):
            raise ValueError(
                f"{self.path} holds {list(shape)} but its manifest {manifest_path(self.path).name} says "
                f"{manifest['shape']} (an interrupted or mixed-up copy?); prepare it again"
            )
        self.manifest = manifest

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def _decode(self, index: int) -> Tensor:
        return torch.from_numpy(np.array(self._array[index], copy=True)).permute(2, 0, 1).contiguous()

    @property
    def fingerprint(self) -> str:
        """Shape, dtype and the manifest's digest of the source listing (when there is a manifest)."""
        listing = (self.manifest or {}).get("listing_sha256", "no-manifest")
        return f"array:{list(self._array.shape)}:{self._array.dtype}:{listing}"

    def as_uint8_tensor(self) -> Tensor:
        # a copy: with one channel the transpose is already contiguous and would stay on the read-only map
        return torch.from_numpy(np.array(self._array.transpose(0, 3, 1, 2), order="C", copy=True))


# ----------------------------------------------------------------------------------- digits
_DIGITS_CACHE: Dict[Tuple[int, int], Tensor] = {}


@functools.lru_cache(maxsize=1)
def _load_digit_pixels() -> np.ndarray:
    """float32 ``(1797, 8, 8)``, values 0..16: the CSV bundled in scikit-learn, read directly
    (``import sklearn.datasets`` alone takes ~3 s); ``load_digits()`` if the file moved."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DatasetUnavailableError(
            "data.dataset=digits needs scikit-learn (its bundled digits need no download); "
            "install scikit-learn or use data.dataset=folder data.root=..."
        )
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float32)  # 64 pixels + label per row
        return table[:, :64].reshape(-1, 8, 8)
    from sklearn.datasets import load_digits

    return load_digits().images.astype(np.float32)


def _digits_uint8(image_size: int, channels: int) -> Tensor:
    """scikit-learn's 1797 bundled 8x8 digits (values 0..16) as uint8 ``(N, C, S, S)``: scaled to
    ``[0, 1]``, resized with antialiased bilinear interpolation, quantised to 8 bits."""
    key = (image_size, channels)
    if key not in _DIGITS_CACHE:
        pixels = torch.from_numpy(_load_digit_pixels() / np.float32(16.0)).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
        if image_size != pixels.shape[-1]:
            pixels = torch.nn.functional.interpolate(
                pixels, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
            )
        images = pixels.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        if channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        _DIGITS_CACHE[key] = images
    return _DIGITS_CACHE[key]


class DigitsDataset(ImageDataset):
    """The built-in demo/test dataset: scikit-learn's ``load_digits()`` (1797 grayscale 8x8
    images, 17 levels, shipped inside the package: no download).

    Scaled to ``[0, 1]``, resized to ``image_size`` (bilinear, antialias), stored as uint8 in
    memory (~7 MB at 32x32x3), replicated to 3 channels when ``channels=3``, served in
    ``[-1, 1]``. ``augment`` is honoured as given, but digits are not mirror-symmetric: the small
    configs set ``data.augment: false``.
    """

    def __init__(self, image_size: int = 32, channels: int = 1, augment: bool = False):
        super().__init__(image_size, channels, augment, "error")
        self.source = "sklearn-digits"
        self.images = _digits_uint8(self.image_size, self.channels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _decode(self, index: int) -> Tensor:
        return self.images[index]

    @property
    def fingerprint(self) -> str:
        return "sklearn-digits"  # shipped inside scikit-learn: the same everywhere

    def as_uint8_tensor(self) -> Tensor:
        return self.images


# ----------------------------------------------------------------------------------- config
def _resolve_folder_root(root: Optional[str], split: str, dataset: str) -> Path:
    if not root:
        raise FileNotFoundError(
            f"data.dataset={dataset} needs data.root (a folder of .jpg/.png images or a prepared .npy); "
            f"or use data.dataset=hub / data.from_hub=true, or data.dataset=digits"
        )
    path = Path(root).expanduser()
    # The course layout is <root>/<split>/images/*.png: read only the split when it exists.
    if (path / split).is_dir():
        return path / split
    return path


def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json"))


def _build_folder(data: Any, split: str) -> ImageDataset:
    root = Path(data.root).expanduser() if data.root else None
    if root is not None and _is_saved_hf_dataset(root):
        return HubDataset.from_disk(
            root, split, image_size=data.image_size, channels=data.channels, augment=data.augment,
            on_bad_image=data.on_bad_image,
        )
    if root is not None and root.suffix == ".npy":
        return ArrayDataset(root, data.image_size, data.channels, data.augment)
    return ImageFolderDataset(
        _resolve_folder_root(data.root, split, data.dataset), data.image_size, data.channels, data.augment,
        data.on_bad_image,
    )


def _build_hub(data: Any, split: str) -> ImageDataset:
    return HubDataset(data.repo_name, split, data.image_size, data.channels, data.augment, data.on_bad_image)


def _build_celeba(data: Any, split: str) -> ImageDataset:
    return _build_hub(data, split) if data.from_hub else _build_folder(data, split)


def _build_digits(data: Any, split: str) -> ImageDataset:
    return DigitsDataset(data.image_size, data.channels, data.augment)


DATASET_BUILDERS: Dict[str, Callable[[Any, str], ImageDataset]] = {
    "digits": _build_digits,
    "folder": _build_celeba,  # a folder; from_hub=true switches to the hub, as for celeba
    "celeba": _build_celeba,
    "hub": _build_hub,
}


def create_dataset_from_config(config: Any, split: str = "train") -> ImageDataset:
    """The dataset named by ``config.data.dataset`` (``digits | folder | celeba | hub``).

    ``folder``/``celeba``: ``data.root`` is a folder of images (``<root>/<split>`` is used when it
    exists, matching the course layout ``<root>/train/images``), a prepared ``.npy`` array, or a
    ``save_to_disk`` Hugging Face dataset; ``data.from_hub=true`` loads ``data.repo_name`` instead.
    """
    data = config.data
    try:
        builder = DATASET_BUILDERS[data.dataset]
    except KeyError:
        raise ValueError(
            f"data.dataset={data.dataset!r} is not one of {', '.join(DATASET_BUILDERS)}"
        ) from None
    return builder(data, split)
