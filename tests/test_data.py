"""fastflow.data: pixel ranges, export helpers, datasets, sharded resumable loaders."""

from __future__ import annotations

import json
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow.config import load_config
from fastflow.data import (
    ArrayDataset,
    BadImageError,
    DatasetUnavailableError,
    DeviceCachedLoader,
    DigitsDataset,
    HubDataset,
    ImageFolderDataset,
    ResumableDataLoader,
    ShardPlan,
    create_dataloader_from_config,
    create_dataset_from_config,
    make_grid,
    normalize,
    prepare_folder,
    save_image,
    to_uint8_nhwc,
    uint8_to_float,
    unnormalize,
)


def _config(*overrides: str):
    return load_config(None, ["data.num_workers=0", *overrides])


def _take(loader, n: int):
    return [next(loader) for _ in range(n)]


# ------------------------------------------------------------------------------ transforms
def test_normalize_unnormalize_round_trip():
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    y = normalize(x)
    assert y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(unnormalize(y), x, rtol=0, atol=1e-12)
    assert unnormalize(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]  # clamped


def test_uint8_round_trip_is_exact():
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = uint8_to_float(pixels)
    assert x.dtype == torch.float32 and x.min() == -1.0 and x.max() == 1.0
    back = to_uint8_nhwc(x)
    assert back.shape == (1, 16, 16, 1) and back.dtype == np.uint8
    np.testing.assert_array_equal(back[0, :, :, 0], pixels[0, 0].numpy())
    np.testing.assert_array_equal(to_uint8_nhwc(unnormalize(x), value_range=(0, 1)), back)


def test_make_grid_shape_and_placement():
    images = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1).expand(10, 3, 8, 8)
    grid = make_grid(images, nrow=4, padding=2)
    assert grid.shape == (3, 3 * 10 + 2, 4 * 10 + 2)
    assert grid[0, 2 + 10, 2 + 10].item() == 5.0  # row 1, column 1 -> image 5
    assert grid[0, 0, 0].item() == -1.0  # black border in model space
    assert make_grid(images, nrow=None).shape == (3, 3 * 10 + 2, 4 * 10 + 2)  # ceil(sqrt(10)) = 4
    assert make_grid(images[0]).shape == (3, 12, 12)


def test_save_image_writes_readable_png(tmp_path):
    x = torch.rand(6, 3, 8, 8) * 2 - 1  # model space, as samplers return
    path = save_image(x, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (3 * 10 + 2, 2 * 10 + 2)
        first = np.asarray(image)
    assert first[0, 0].tolist() == [0, 0, 0]  # black border
    np.testing.assert_array_equal(first[2:10, 2:10], to_uint8_nhwc(x[:1])[0])
    save_image(unnormalize(x), tmp_path / "course.png", nrow=3, value_range=(0, 1))  # course idiom
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "course.png")), first)
    save_image(torch.rand(1, 1, 8, 8), tmp_path / "gray.png")
    with Image.open(tmp_path / "gray.png") as image:
        assert image.mode == "L" and image.size == (8, 8)


# ---------------------------------------------------------------------------------- digits
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_shapes_and_range(size, channels):
    dataset = DigitsDataset(image_size=size, channels=channels, augment=False)
    assert len(dataset) == 1797
    x = dataset[0]
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    everything = uint8_to_float(dataset.as_uint8_tensor())
    assert everything.min() == -1.0 and everything.max() > 0.9
    if channels == 3:
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_digits_from_config():
    dataset = create_dataset_from_config(_config("data.dataset=digits", "data.image_size=16", "data.channels=1"))
    assert isinstance(dataset, DigitsDataset) and dataset[5].shape == (1, 16, 16)


# ---------------------------------------------------------------------------- image folder
def _solid(color, size, mode="RGB"):
    return Image.new(mode, size, color)


@pytest.fixture
def image_tree(tmp_path):
    """Nested folder: PNG/JPEG, upper-case extensions, RGBA/L/P modes, non-square, plus noise."""
    root = tmp_path / "images"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "b").mkdir()
    _solid((255, 0, 0), (64, 64)).save(root / "a" / "red.png")
    _solid((0, 255, 0, 128), (40, 40), "RGBA").save(root / "a" / "deep" / "rgba.PNG")
    _solid(200, (32, 32), "L").save(root / "b" / "gray.png")
    _solid((0, 0, 255), (50, 70)).save(root / "b" / "blue.JPG", quality=95)
    _solid((10, 20, 30), (16, 16)).convert("P").save(root / "b" / "palette.png")
    wide = _solid((255, 0, 0), (96, 64))  # red | green 64x64 centre | red: the crop keeps green
    wide.paste(_solid((0, 255, 0), (64, 64)), (16, 0))
    wide.save(root / "wide.jpeg", quality=95)
    (root / "notes.txt").write_text("not an image")
    (root / "._red.png").write_bytes(b"resource fork")  # hidden: ignored
    return root


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    """PIL's convert() clips 16-bit greyscale at 255 (nearly all white): scaled to 8 bits instead."""
    ramp = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)  # 257·k -> k
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as image:
        assert image.mode.startswith("I;16")
    for channels in (1, 3):
        got = ImageFolderDataset(tmp_path, 16, channels, augment=False).load_uint8(0)
        assert got.shape == (channels, 16, 16)
        for c in range(channels):
            np.testing.assert_array_equal(got[c].numpy(), np.arange(256).reshape(16, 16))
    from fastflow.data.transforms import pil_to_uint8

    for mode, array in (("I", np.full((8, 8), 70000, np.int32)), ("F", np.full((8, 8), 0.5, np.float32))):
        with pytest.raises(ValueError, match=f"PIL mode {mode}\\)"):
            pil_to_uint8(Image.fromarray(array, mode=mode), 8, 1)


def test_linked_folders_are_read_once(tmp_path):
    """Links are followed, but a cycle (a/up -> ..) or a second link to a folder adds nothing."""
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "train").mkdir()
    _solid((1, 2, 3), (8, 8)).save(root / "a" / "x.png")
    _solid((4, 5, 6), (8, 8)).save(root / "train" / "y.png")
    (root / "a" / "up").symlink_to("..", target_is_directory=True)
    (root / "all").symlink_to("train", target_is_directory=True)
    external = tmp_path / "elsewhere"
    external.mkdir()
    _solid((7, 8, 9), (8, 8)).save(external / "z.png")
    (root / "more").symlink_to(external, target_is_directory=True)
    names = [p.relative_to(root).as_posix() for p in ImageFolderDataset(root, 8, augment=False).files]
    assert names == ["a/x.png", "all/y.png", "more/z.png"]


def test_system_errors_are_not_bad_images(tmp_path, monkeypatch):
    """Permission and I/O errors propagate (skip mode must not replace an image it failed to read);
    a file's bad content is a BadImageError naming it."""
    from fastflow.data import datasets

    _solid((1, 2, 3), (8, 8)).save(tmp_path / "x.png")
    dataset = ImageFolderDataset(tmp_path, 8, augment=False, on_bad_image="skip")
    for error in (PermissionError(13, "Permission denied", str(tmp_path / "x.png")), OSError(5, "Input/output error"),
                  MemoryError()):
        def raising(path, error=error):
            raise error

        monkeypatch.setattr(datasets.Image, "open", raising)
        with pytest.raises(type(error)):
            dataset.load_uint8(0)
    monkeypatch.setattr(datasets.Image, "open", lambda path: (_ for _ in ()).throw(OSError("image file is truncated")))
    with pytest.raises(BadImageError, match="x.png.*truncated"):
        datasets.decode_image_file(tmp_path / "x.png", 8, 3)


def test_unlistable_subfolder_is_an_error_naming_it(image_tree, monkeypatch):
    """A subfolder that cannot be listed (EACCES, stale NFS handle) raises naming it and data.root;
    left out silently, its images would vanish from the dataset and from prepare. (As root, chmod
    blocks nothing: the listing is made to fail instead.)"""
    import errno
    import os

    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(image_tree / "b"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match=f"cannot list the folder {image_tree / 'b'} under "
                                              f"data.root={image_tree} \\(Permission denied\\)"):
        ImageFolderDataset(image_tree, 8, augment=False)


def test_exif_orientation_is_applied(tmp_path):
    """A phone JPEG stores the sensor's landscape pixels and an orientation tag (6: rotate 90°
    clockwise to view): it is trained upright, as viewers show it, not sideways."""
    sensor = np.zeros((32, 64, 3), np.uint8)
    sensor[:, :32] = 255  # left half white: upright (rotated clockwise), the top half is white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(sensor).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    folder = ImageFolderDataset(tmp_path, 32, 3, augment=False)

    class Rows(list):
        column_names = ["image"]

    hub = HubDataset("phone", data=Rows([{"image": {"bytes": (tmp_path / "phone.jpg").read_bytes()}}]),
                     image_size=32, augment=False)
    for dataset in (folder, hub):
        image = dataset.load_uint8(0).to(torch.int32)
        # the 64x32 upright image, centre-cropped to its middle 32x32: white top half, black bottom half
        assert image[:, :12].min() > 230 and image[:, -12:].max() < 25, (dataset, image[0, :, 0].tolist())


def test_dali_decodes_exif_rotated_photos_upright(tmp_path):
    """DALI's decoder (CPU here; nvJPEG on CUDA takes the same argument) turns the phone JPEG
    upright as the PIL loaders do: the two loaders agree on the first batch."""
    pytest.importorskip("nvidia.dali")
    sensor = np.zeros((32, 64, 3), np.uint8)
    sensor[:, :32] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view: the top half is white upright
    for i in range(4):
        Image.fromarray(sensor).save(tmp_path / f"phone{i}.jpg", exif=exif, quality=95)
    dali = _folder_loader(tmp_path, "dali", "data.augment=false")
    reference = _folder_loader(tmp_path, "torch", "data.augment=false")
    a, b = next(dali), next(reference)
    assert a[:, :, :6].min() > 0.8 and a[:, :, -6:].max() < -0.8, a[0, 0, :, 0]
    assert ((a - b).abs() * 127.5).mean() < 5


def test_hub_fingerprint_uses_the_arrow_fingerprint():
    """Two node-local copies of a Hub dataset of one size but other content (other data files, or
    a different map()) carry other Arrow fingerprints: the ranks' check must see that."""

    class Rows(list):
        column_names = ["image"]

    def rows(fingerprint):
        data = Rows([{"image": None}] * 3)
        if fingerprint is not None:
            data._fingerprint = fingerprint
        return data

    same = [HubDataset("faces", data=rows("abc")).fingerprint for _ in range(2)]
    assert same[0] == same[1] and "abc" in same[0]
    assert HubDataset("faces", data=rows("abd")).fingerprint != same[0]
    assert HubDataset("faces", data=rows(None)).fingerprint == "hub:faces[train]:3"


def test_fingerprints_tell_copies_apart(tmp_path):
    """Ranks compare fingerprints: the same listing gives the same one, one renamed file (same
    count) another; a prepared array's depends on its shape and its manifest's listing."""
    copies = {}
    for name in ("n0", "n1", "n2"):
        (tmp_path / name / "sub").mkdir(parents=True)
        for k in range(4):
            file = "zzz.png" if name == "n2" and k == 0 else f"{k:03d}.png"
            _solid(30 * k, (8, 8), "L").save(tmp_path / name / ("sub" if k == 3 else ".") / file)
        copies[name] = ImageFolderDataset(tmp_path / name, 8, 1, augment=False)
    assert copies["n0"].fingerprint == copies["n1"].fingerprint
    assert copies["n2"].fingerprint != copies["n0"].fingerprint and len(copies["n2"]) == len(copies["n0"])
    loader = ResumableDataLoader(copies["n0"], batch_size=2)
    assert loader.fingerprint == copies["n0"].fingerprint
    assert DigitsDataset(8, 1).fingerprint == DigitsDataset(16, 3).fingerprint
    array = tmp_path / "a.npy"
    np.save(array, np.zeros((4, 8, 8, 1), np.uint8))
    shorter = tmp_path / "b.npy"
    np.save(shorter, np.zeros((3, 8, 8, 1), np.uint8))
    assert ArrayDataset(array, 8, 1).fingerprint != ArrayDataset(shorter, 8, 1).fingerprint


def test_image_folder_lists_decodes_and_resizes(image_tree):
    dataset = ImageFolderDataset(image_tree, image_size=32, channels=3, augment=False)
    names = [p.relative_to(image_tree).as_posix() for p in dataset.files]
    assert names == ["a/deep/rgba.PNG", "a/red.png", "b/blue.JPG", "b/gray.png", "b/palette.png", "wide.jpeg"]
    for i in range(len(dataset)):
        x = dataset[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    red = dataset.load_uint8(1)
    assert red[:, 5, 5].tolist() == [255, 0, 0]
    wide = dataset.load_uint8(5).to(torch.int32)  # centre crop: only the green middle survives
    assert wide[1].min() > 240 and wide[0].max() < 15 and wide[2].max() < 15
    gray = ImageFolderDataset(image_tree, image_size=16, channels=1, augment=False)
    assert gray[3].shape == (1, 16, 16) and gray.load_uint8(3).unique().tolist() == [200]


def test_image_folder_augment_flips(image_tree):
    dataset = ImageFolderDataset(image_tree, image_size=32, augment=True)
    half = Image.new("RGB", (32, 32), (0, 0, 0))
    half.paste(_solid((255, 255, 255), (16, 32)), (0, 0))
    half.save(image_tree / "a" / "red.png")
    torch.manual_seed(0)
    seen = {dataset[1][0, 0, 0].item() for _ in range(20)}
    assert seen == {-1.0, 1.0}


def test_missing_folder_error_names_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ImageFolderDataset(missing, 32)


def test_empty_folder_error_names_path(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        ImageFolderDataset(tmp_path / "empty", 32)


def test_folder_config_needs_root():
    with pytest.raises(FileNotFoundError, match="data.root"):
        create_dataset_from_config(_config("data.dataset=folder"))


def test_corrupt_file_error_names_file(image_tree):
    bad = image_tree / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage, not a jpeg" * 10)
    dataset = ImageFolderDataset(image_tree, image_size=32)
    index = dataset.files.index(bad)
    with pytest.raises(BadImageError, match=str(bad)):
        dataset[index]
    for workers in (0, 2):  # raised in a worker process, re-raised here with the name intact
        loader = ResumableDataLoader(dataset, batch_size=len(dataset), shuffle=False, num_workers=workers)
        with pytest.raises(BadImageError, match=str(bad)):
            next(loader)


def test_truncated_file_is_bad(image_tree):
    whole = (image_tree / "wide.jpeg").read_bytes()
    (image_tree / "wide.jpeg").write_bytes(whole[: len(whole) // 2])
    dataset = ImageFolderDataset(image_tree, image_size=32)
    with pytest.raises(BadImageError, match="wide.jpeg"):
        dataset.load_uint8(5)


def test_skip_mode_counts_and_substitutes(image_tree):
    bad = image_tree / "b" / "broken.jpg"
    bad.write_bytes(b"garbage" * 50)
    dataset = ImageFolderDataset(image_tree, image_size=32, on_bad_image="skip")
    index = dataset.files.index(bad)
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        substitute = dataset.load_uint8(index)
    assert dataset.num_skipped == 1 and dataset.bad_files == {str(bad)}
    assert torch.equal(substitute, dataset.load_uint8(index + 1))  # the next readable file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset.load_uint8(index)  # known bad: no second warning
    assert dataset.num_skipped == 1


def test_skip_mode_through_loader_from_config(image_tree):
    (image_tree / "broken.png").write_bytes(b"garbage" * 50)
    config = _config(
        "data.dataset=folder", f"data.root={image_tree}", "data.image_size=16", "data.on_bad_image=skip",
        "training.batch_size=7",
    )
    loader = create_dataloader_from_config(config, shuffle=False)
    with pytest.warns(RuntimeWarning, match="broken.png"):
        batch = next(loader)
    assert batch.shape == (7, 3, 16, 16) and loader.num_skipped == 1


def test_course_layout_reads_the_train_split(tmp_path):
    for split, color in (("train", (255, 0, 0)), ("validation", (0, 0, 255))):
        (tmp_path / split / "images").mkdir(parents=True)
        for k in range(3):
            _solid(color, (64, 64)).save(tmp_path / split / "images" / f"{k:06d}.png")
    dataset = create_dataset_from_config(_config("data.dataset=celeba", f"data.root={tmp_path}"))
    assert len(dataset) == 3 and dataset.load_uint8(0)[:, 0, 0].tolist() == [255, 0, 0]


def test_prepare_folder_round_trip(image_tree, tmp_path):
    (image_tree / "broken.png").write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="broken.png"):
        path = prepare_folder(image_tree, tmp_path / "prepared.npy", 16, on_bad_image="skip")
    array = np.load(path)
    assert array.shape == (6, 16, 16, 3) and array.dtype == np.uint8
    folder = ImageFolderDataset(image_tree, 16, on_bad_image="skip")
    prepared = create_dataset_from_config(
        _config("data.dataset=folder", f"data.root={path}", "data.image_size=16", "data.augment=false")
    )
    assert isinstance(prepared, ArrayDataset) and len(prepared) == 6
    good = [i for i, f in enumerate(folder.files) if f.name != "broken.png"]
    for k, i in enumerate(good):
        assert torch.equal(prepared.load_uint8(k), folder.load_uint8(i))
    with pytest.raises(ValueError, match="32x32x3"):
        ArrayDataset(path, image_size=32)


def test_prepare_cli_manifest_and_staleness(image_tree, tmp_path, capsys):
    from fastflow.data.prepare import check_prepared, main, manifest_path, read_manifest

    dst = tmp_path / "out" / "prepared.npy"
    assert main([str(image_tree), str(dst), "--image-size", "16"]) == 0
    assert "wrote" in capsys.readouterr().out and np.load(dst).shape == (6, 16, 16, 3)
    manifest = read_manifest(dst)
    assert manifest["shape"] == [6, 16, 16, 3] and manifest["num_source_files"] == 6 and manifest["skipped"] == []
    assert sorted(p.name for p in dst.parent.iterdir()) == ["prepared.npy", "prepared.npy.json"]  # no temp files
    assert check_prepared(dst) == [] and main(["--check", str(dst)]) == 0
    assert main([str(image_tree), str(dst), "--image-size", "16"]) == 0  # up to date: nothing done
    assert "nothing to do" in capsys.readouterr().out
    assert any("image_size=16, not 32" in r for r in check_prepared(dst, image_size=32))
    old = dict(manifest)  # prepared before the decoder version was kept (EXIF not applied)
    del old["decoder"]
    manifest_path(dst).write_text(json.dumps(old))
    assert [r for r in check_prepared(dst) if "decoder version 1" in r and "EXIF" in r]
    assert main(["--check", str(dst)]) == 1
    manifest_path(dst).write_text(json.dumps(manifest))

    _solid((1, 2, 3), (16, 16)).save(image_tree / "b" / "new.png")  # the folder grows
    reasons = check_prepared(dst)
    assert len(reasons) == 1 and "6 image files then, 7 now" in reasons[0]
    assert main(["--check", str(dst)]) == 1 and "stale" in capsys.readouterr().err
    assert main([str(image_tree), str(dst), "--image-size", "16"]) == 0  # stale: prepared again
    assert np.load(dst).shape[0] == 7 and check_prepared(dst) == []

    (image_tree / "broken.png").write_bytes(b"garbage")
    assert main([str(image_tree), str(tmp_path / "x.npy"), "--image-size", "16"]) == 2  # error mode
    assert "broken.png" in capsys.readouterr().err and not (tmp_path / "x.npy").exists()
    assert main([str(tmp_path / "missing"), str(tmp_path / "x.npy")]) == 2
    assert "missing" in capsys.readouterr().err


def test_prepared_array_errors_name_the_file(image_tree, tmp_path):
    dst = prepare_folder(image_tree, tmp_path / "p.npy", 16)
    truncated = tmp_path / "truncated.npy"
    truncated.write_bytes(dst.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated.npy.*prepare it again"):
        ArrayDataset(truncated, 16)
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="junk.npy"):
        ArrayDataset(junk, 16)
    np.save(tmp_path / "other.npy", np.zeros((2, 16, 16, 3), np.uint8))  # array and manifest mixed up
    (tmp_path / "other.npy.json").write_bytes((tmp_path / "p.npy.json").read_bytes())
    with pytest.raises(ValueError, match=r"other.npy holds \[2, 16, 16, 3\].*says \[6, 16, 16, 3\]"):
        ArrayDataset(tmp_path / "other.npy", 16)
    gray = prepare_folder(image_tree, tmp_path / "g.npy", 16, channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on tensors over read-only memory
        cache = ArrayDataset(gray, 16, channels=1).as_uint8_tensor()
    cache += 0  # writable


def test_prepare_folder_atomic_on_failure(image_tree, tmp_path, monkeypatch):
    """A failure while writing leaves the previous array and no temp file."""
    dst = prepare_folder(image_tree, tmp_path / "p.npy", 16)
    before = dst.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", fail)
    with pytest.raises(OSError, match="No space"):
        prepare_folder(image_tree, dst, 16)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "p.npy"]  # old manifest removed first


# ----------------------------------------------------------------------------------- hub
def test_hub_without_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` -> ImportError
    config = _config("data.dataset=hub", "data.repo_name=someone/faces")
    with pytest.raises(DatasetUnavailableError, match="someone/faces") as info:
        create_dataset_from_config(config)
    assert "data.dataset=folder data.root=" in str(info.value)


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    fake = types.ModuleType("datasets")

    def load_dataset(repo, split):
        raise ConnectionError("offline")

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DatasetUnavailableError, match="someone/faces.*data.dataset=folder.*offline"):
        HubDataset("someone/faces", "train", 32)


def test_hub_dataset_decodes_rows(monkeypatch):
    class Rows(list):
        column_names = ["image", "label"]

    rows = Rows({"image": _solid((0, 255, 0), (64, 64)), "label": k} for k in range(4))
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda repo, split: rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    config = _config("data.dataset=celeba", "data.from_hub=true", "data.image_size=32")
    dataset = create_dataset_from_config(config)
    assert isinstance(dataset, HubDataset) and len(dataset) == 4
    assert dataset.load_uint8(2)[:, 0, 0].tolist() == [0, 255, 0]


# ------------------------------------------------------------------------------- loaders
def _digits_config(*extra: str):
    return _config("data.dataset=digits", "data.image_size=8", "data.channels=1", "data.augment=true",
                   "training.batch_size=64", *extra)


def test_loader_yields_forever_across_epochs():
    loader = create_dataloader_from_config(_digits_config())
    assert isinstance(loader, ResumableDataLoader) and len(loader) == 1797 // 64 == 28
    batches = _take(loader, 30)
    assert all(b.shape == (64, 1, 8, 8) and b.dtype == torch.float32 for b in batches)
    assert all(b.min() >= -1 and b.max() <= 1 for b in batches)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch_in_epoch"] == 2
    assert loader.batches_seen == 30 and loader.images_seen == 30 * 64
    assert not torch.equal(batches[0], batches[28])  # a new permutation in epoch 1


@pytest.mark.parametrize("kind", ["torch", "gpu_cache"])
def test_loader_resume_is_exact(kind):
    config = _digits_config(f"data.loader={kind}")
    reference = create_dataloader_from_config(config, seed=7)
    expected = _take(reference, 40)  # crosses the epoch boundary at 28

    interrupted = create_dataloader_from_config(config, seed=7)
    _take(interrupted, 25)
    state = interrupted.state_dict()
    assert state["epoch"] == 0 and state["batch_in_epoch"] == 25
    resumed = create_dataloader_from_config(config, seed=7)
    resumed.load_state_dict(state)
    for k, batch in enumerate(_take(resumed, 15)):
        assert torch.equal(batch, expected[25 + k]), f"batch {25 + k} differs after resume"

    restarted = create_dataloader_from_config(config, seed=7)  # state loaded mid-iteration
    _take(restarted, 3)
    restarted.load_state_dict(state)
    assert torch.equal(next(restarted), expected[25])


def test_gpu_cache_matches_torch_loader_on_cpu():
    torch_loader = create_dataloader_from_config(_digits_config("data.loader=torch"))
    cached = create_dataloader_from_config(_digits_config("data.loader=gpu_cache"), device="cpu")
    assert isinstance(cached, DeviceCachedLoader) and cached.images.dtype == torch.uint8
    assert cached.nbytes == 1797 * 64
    for _ in range(30):
        a, b = next(torch_loader), next(cached)
        assert a.shape == b.shape and torch.equal(a, b)
    cached.load_state_dict(torch_loader.state_dict())  # states are interchangeable
    assert torch.equal(next(cached), next(torch_loader))


def test_gpu_cache_from_image_folder(image_tree):
    dataset = ImageFolderDataset(image_tree, 16, augment=True)
    cached = DeviceCachedLoader.from_dataset(dataset, batch_size=4, seed=3, device="cpu")
    plain = ResumableDataLoader(dataset, batch_size=4, seed=3)
    for _ in range(5):
        assert torch.equal(next(cached), next(plain))


def test_loader_state_mismatch_is_refused():
    loader = create_dataloader_from_config(_digits_config())
    next(loader)
    state = loader.state_dict()
    other = create_dataloader_from_config(_digits_config("training.batch_size=32"))
    with pytest.raises(ValueError, match="batch_size.*set back training.batch_size=64; a change of world size "
                                         "is the only change resumed approximately") as caught:
        other.load_state_dict(state)
    assert "strict" not in str(caught.value)  # no command offers strict=False
    flipped = create_dataloader_from_config(_digits_config("data.augment=false", "infrastructure.seed=7"))
    with pytest.raises(ValueError, match="set back infrastructure.seed=42, data.augment=true;"):
        flipped.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="approximately"):
        other.load_state_dict(state, strict=False)
    assert other.state_dict()["batch_in_epoch"] == 2  # 64 samples seen = 2 batches of 32


@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_shards_are_disjoint_and_cover_the_epoch(drop_last):
    n, world = 1000, 3
    shards = [
        ShardPlan(n, batch_size=16, seed=5, rank=r, world_size=world, drop_last=drop_last).epoch(2)[0]
        for r in range(world)
    ]
    assert len({len(s) for s in shards}) == 1  # equal lengths: ranks stay in lockstep
    flat = np.concatenate(shards)
    if drop_last:
        assert len(flat) == len(set(flat.tolist())) == (n // world) * world  # disjoint, 1 left out
    else:
        assert set(flat.tolist()) == set(range(n)) and len(flat) == 1002  # all, 2 padded by wrapping
    other_epoch = ShardPlan(n, batch_size=16, seed=5, rank=0, world_size=world).epoch(3)[0]
    assert not np.array_equal(shards[0][: len(other_epoch)], other_epoch)


def test_rank_loaders_serve_their_shard():
    config = _digits_config("training.batch_size=32")  # augment on: flips must follow the plan too
    dataset = create_dataset_from_config(config)
    images = dataset.as_uint8_tensor()
    ranks = [create_dataloader_from_config(config, rank=r, world_size=2, dataset=dataset, seed=11) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (1797 // 2) // 32
    served = []
    for rank, loader in enumerate(ranks):
        plan = ShardPlan(1797, batch_size=32, seed=11, rank=rank, world_size=2, augment=True)
        for k in range(len(loader)):
            indices, flips = plan.batch(0, k)
            expected = images[torch.from_numpy(indices)]
            expected = torch.where(torch.from_numpy(flips).view(-1, 1, 1, 1), expected.flip(-1), expected)
            assert torch.equal(next(loader), uint8_to_float(expected))
            served.extend(indices.tolist())
    assert len(served) == len(set(served)) == 2 * 28 * 32  # disjoint across ranks


def test_worker_processes_give_the_same_batches(image_tree):
    dataset = ImageFolderDataset(image_tree, 16, augment=True)
    inline = ResumableDataLoader(dataset, batch_size=4, seed=1, num_workers=0)
    workers = ResumableDataLoader(dataset, batch_size=4, seed=1, num_workers=2)
    for _ in range(4):
        assert torch.equal(next(inline), next(workers))
    state = workers.state_dict()
    workers.load_state_dict(state)
    assert torch.equal(next(workers), next(inline))
    workers.close()


def test_last_partial_batch_without_drop_last():
    config = _digits_config("training.batch_size=500")
    loader = create_dataloader_from_config(config, drop_last=False)
    sizes = [b.shape[0] for b in _take(loader, 5)]
    assert sizes == [500, 500, 500, 297, 500]


def test_dali_loader_missing_is_a_clear_error(monkeypatch):
    for name in ("nvidia", "nvidia.dali", "nvidia.dali.fn", "nvidia.dali.types"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportError, match="nvidia-dali"):
        create_dataloader_from_config(_digits_config("data.loader=dali"))


@pytest.fixture
def smooth_folder(tmp_path):
    """Ten smooth, distinct, partly non-square RGB images (ramps; blue = 25·i identifies each)."""
    root = tmp_path / "smooth"
    root.mkdir()
    for i in range(10):
        h, w = 32 + 4 * i, 40
        y, x = np.mgrid[0:h, 0:w]
        pixels = np.stack([x / w * 255, y / h * 255, np.full((h, w), 25.0 * i)], -1).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
    return root


def _folder_loader(root, kind, *extra):
    return create_dataloader_from_config(
        _config("data.dataset=folder", f"data.root={root}", "data.image_size=16", f"data.loader={kind}",
                "training.batch_size=4", "data.augment=true", *extra), device="cpu")


@pytest.mark.parametrize("channels", [3, 1])
def test_dali_cpu_decoder_matches_the_torch_loader(smooth_folder, channels):
    """Same ShardPlan: the same images in the same order with the same flips, across an epoch
    boundary; pixels within a few levels (DALI resamples differently from PIL). Measured: max 7,
    mean 0.5–1.7 levels of 255."""
    pytest.importorskip("nvidia.dali")
    dali = _folder_loader(smooth_folder, "dali", f"data.channels={channels}")
    reference = _folder_loader(smooth_folder, "torch", f"data.channels={channels}")
    for k in range(5):
        a, b = next(dali), next(reference)
        assert a.shape == b.shape == (4, channels, 16, 16) and a.dtype == torch.float32
        levels = (a - b).abs() * 127.5
        assert levels.max() <= 10 and levels.mean() <= 2.5, f"batch {k}: max {levels.max():.1f}, mean {levels.mean():.2f}"
    assert dali.state_dict() == reference.state_dict()


def test_dali_resume_and_bad_files(smooth_folder):
    pytest.importorskip("nvidia.dali")
    straight = _folder_loader(smooth_folder, "dali")
    expected = _take(straight, 5)
    interrupted = _folder_loader(smooth_folder, "dali")
    _take(interrupted, 3)
    resumed = _folder_loader(smooth_folder, "dali")
    resumed.load_state_dict(interrupted.state_dict())
    for k, batch in enumerate(_take(resumed, 2)):
        assert torch.equal(batch, expected[3 + k]), f"batch {3 + k} differs after resume"

    (smooth_folder / "05.png").write_bytes(b"not an image")
    broken = _folder_loader(smooth_folder, "dali", "data.augment=false", "training.batch_size=10")
    with pytest.raises(BadImageError, match=r"05\.png"):
        next(broken)
    with pytest.raises(ValueError, match="on_bad_image=skip does not work with data.loader=dali"):
        _folder_loader(smooth_folder, "dali", "data.on_bad_image=skip")
