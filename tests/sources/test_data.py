import gzip
import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from conftest import make_images
from featx.errors import UsageError
from featx.settings import DataOptions, parse_per_class_limit
from featx.sources.decode import ImageError, decode_image
from featx.sources.spec import open_source


def test_folder_without_splits_gets_a_seeded_stratified_split(image_folder):
    a = open_source(str(image_folder))
    b = open_source(str(image_folder))
    c = open_source(str(image_folder), DataOptions(seed=1))
    assert a.classes == ["cat", "dog", "owl"] and len(a) == 15 and a.split_source == "seeded"
    assert a.counts()["test"] == {"cat": 1, "dog": 1, "owl": 1}
    assert a.splits.tolist() == b.splits.tolist() and a.fingerprint == b.fingerprint
    assert a.splits.tolist() != c.splits.tolist() and a.fingerprint != c.fingerprint
    assert a.ids[0] == "cat/cat_000.jpg"


def test_split_folders_and_aliases(tmp_path):
    make_images(tmp_path / "d", per_class=2, splits=("Training", "validation", "test"))
    (tmp_path / "d" / "notes").mkdir()
    ds = open_source(str(tmp_path / "d"))
    assert ds.split_source == "folders"
    assert set(ds.counts()) == {"train", "val", "test"}
    assert any("notes" in n for n in ds.notes)


def test_per_class_limit(split_folder, image_folder):
    ds = open_source(str(split_folder), DataOptions(per_class_limit={"train": 2, "test": 1}))
    assert ds.counts() == {
        "train": {c: 2 for c in ("cat", "dog", "owl")},
        "test": {c: 1 for c in ("cat", "dog", "owl")},
    }
    ds = open_source(str(image_folder), DataOptions(per_class_limit=2))
    assert len(ds) == 6
    assert parse_per_class_limit("train=200,test=100") == {"train": 200, "test": 100}
    for bad in ("0", "x", "train=0", "foo=3"):
        with pytest.raises(UsageError, match="--per-class-limit"):
            parse_per_class_limit(bad)


def test_csv_manifest(tmp_path, image_folder):
    rows = ["path,label,split"] + [f"{image_folder}/cat/cat_00{i}.jpg,cat,train" for i in range(3)]
    rows += [f"{image_folder}/dog/dog_00{i}.jpg,dog,{'test' if i else 'train'}" for i in range(3)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = open_source(str(tmp_path / "m.csv"))
    assert ds.classes == ["cat", "dog"] and ds.split_source == "manifest" and ds.counts()["test"]["dog"] == 2
    # relative paths, no header, no split column
    (tmp_path / "imgs").symlink_to(image_folder)
    (tmp_path / "rel.csv").write_text(
        "imgs/cat/cat_000.jpg,cat\nimgs/owl/owl_001.jpg,owl\nimgs/owl/owl_002.jpg,owl\n"
    )
    ds = open_source(str(tmp_path / "rel.csv"))
    assert len(ds) == 3 and ds.split_source == "seeded" and ds.load(0).mode == "RGB"
    (tmp_path / "bad.csv").write_text("a.jpg,cat,train\nb.jpg,dog,holdout\n")
    with pytest.raises(UsageError, match="row 2: split 'holdout'"):
        open_source(str(tmp_path / "bad.csv"))
    (tmp_path / "cols.csv").write_text("a.jpg,cat\nb.jpg\n")
    with pytest.raises(UsageError, match="row 2 has 1 columns"):
        open_source(str(tmp_path / "cols.csv"))


def test_sklearn_digits():
    ds = open_source("sklearn:digits")
    assert len(ds) == 1797 and ds.classes == [str(i) for i in range(10)]
    im = ds.load(0)
    assert im.size == (8, 8) and im.mode == "RGB" and np.asarray(im).max() > 200


def _idx(path, arr):
    dims = arr.shape
    head = struct.pack(">HBB", 0, 8, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.astype(np.uint8).tobytes())


def _write_idx_dir(d, n_train=20, n_test=10):
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(d / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_idx_files(tmp_path):
    _write_idx_dir(tmp_path / "my-fashion-mnist")
    ds = open_source(str(tmp_path / "my-fashion-mnist"))
    assert ds.name == "fashion-mnist" and ds.classes[0] == "T-shirt/top" and ds.split_source == "files"
    assert ds.counts()["train"]["Trouser"] == 2 and ds.counts()["test"]["Bag"] == 1
    assert ds.load(25).size == (28, 28) and ds.ids[25] == "test/00005"
    _write_idx_dir(tmp_path / "digits-idx")
    assert open_source(str(tmp_path / "digits-idx")).classes[:2] == ["0", "1"]


def test_torchvision_dataset_class(tmp_path):
    """torchvision's own FashionMNIST reader on raw idx files (what it downloads when online)."""
    raw = tmp_path / "FashionMNIST" / "raw"
    _write_idx_dir(raw)
    for f in raw.iterdir():
        (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    ds = open_source("torchvision:FashionMNIST", DataOptions(data_root=str(tmp_path)))
    assert len(ds) == 30 and ds.classes[0] == "T-shirt/top" and ds.load(3).mode == "RGB"
    with pytest.raises(UsageError, match="--data-root"):
        open_source("torchvision:FashionMNIST")
    with pytest.raises(UsageError, match="closest"):
        open_source("torchvision:FashonMNIST", DataOptions(data_root=str(tmp_path)))


def test_bad_specs(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        open_source(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UsageError, match="no images found"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UsageError, match="CSV manifest"):
        open_source(str(tmp_path / "x.txt"))
    with pytest.raises(UsageError, match="sklearn:digits"):
        open_source("sklearn:iris")
    with pytest.raises(UsageError, match="--test-fraction"):
        open_source("sklearn:digits", DataOptions(test_fraction=1.0))


# -- decoding --------------------------------------------------------------------------------


def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_modes_convert_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    cases = {
        "gray.png": rgb.convert("L"),
        "palette.png": rgb.convert("P"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "la.png": rgb.convert("LA"),
    }
    for name, im in cases.items():
        out = decode_image(_save(im, tmp_path / name))
        assert out.mode == "RGB" and out.size == (16, 12), name
    pal = Image.new("P", (4, 4))
    pal.info["transparency"] = 0
    assert decode_image(_save(pal, tmp_path / "t.png", transparency=0)).mode == "RGB"


def test_16bit_png_scales_to_8bit(tmp_path):
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    p = _save(Image.fromarray(arr), tmp_path / "deep.png")
    out = np.asarray(decode_image(p))[..., 0]
    assert out.tolist() == [[0, 255], [128, 4]]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    p = _save(im, tmp_path / "rot.jpg", exif=exif)
    assert decode_image(p).size == (20, 40)


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, g, b = decode_image(str(p)).getpixel((2, 2))
    assert r > 200 and b < 50


def test_undecodable_files_raise_image_error(tmp_path, monkeypatch):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, "JPEG")
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "trunc.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "text.png").write_text("<html>not an image</html>")
    for name in ("zero.jpg", "trunc.jpg", "text.png"):
        with pytest.raises(ImageError) as err:
            decode_image(str(tmp_path / name), name)
        assert str(err.value).startswith(f"{name}: cannot decode")
    import featx.sources.decode

    monkeypatch.setattr(featx.sources.decode, "MAX_IMAGE_PIXELS", 1000)
    # decode_image sets Pillow's limit to featx's: restore it after the test
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="too large.*FEATX_MAX_IMAGE_PIXELS"):
        decode_image(str(tmp_path / "big.png"))


def test_odd_folders(tmp_path):
    root = make_images(tmp_path / "odd", classes=("a", "b"), per_class=2)
    (root / "empty_class").mkdir()
    (root / "a" / ".hidden.jpg").write_bytes(b"x")
    (root / "a" / "readme.txt").write_text("not an image")
    (root / "a" / "loop").symlink_to(root / "a")  # a symlink loop
    uni = root / "b" / "ñandú 🐦.jpg"
    Image.new("RGB", (8, 8)).save(uni)
    raw = os.path.join(os.fsencode(root / "b"), b"caf\xe9.jpg")  # not UTF-8
    with open(raw, "wb") as f:
        Image.new("RGB", (8, 8)).save(f, "JPEG")
    ds = open_source(str(root))
    assert ds.classes == ["a", "b"] and len(ds) == 6
    assert any("empty_class" in n for n in ds.notes)
    assert "b/ñandú 🐦.jpg" in ds.ids and "b/caf\\xe9.jpg" in ds.ids
    for i in range(len(ds)):
        assert ds.load(i).mode == "RGB"
    for ident in ds.ids:
        ident.encode("utf-8")


def test_a_limit_for_a_split_the_data_lacks_says_so(tmp_path):
    """--per-class-limit val=K on data without a val split did nothing silently."""

    root = make_images(tmp_path / "s", per_class=10, splits=("train", "test"))
    ds = open_source(str(root), DataOptions(per_class_limit={"val": 3, "train": 4}))
    assert ds.notes == [
        "--per-class-limit val=3: the data has no val split (its splits: train, test), so that limit does nothing"
    ]
    assert ds.uncapped_train == 30 and ds.counts()["train"] == {"cat": 4, "dog": 4, "owl": 4}
    assert open_source(str(root), DataOptions(per_class_limit={"test": 3})).uncapped_train is None
