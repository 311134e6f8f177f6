"""Ingestion without silent wrong labels, leaks or resource bombs (and a
latin-1 CSV): folder links back into the tree, files reached twice, the one CSV reader
of manifests and predict, what a source drops and says so, and the size/aspect limits checked
before an image is decoded or resized."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_ARGS, cli, make_images
from featx.classifiers.predict import collect_images
from featx.errors import UsageError
from featx.models.preprocess import Preprocess
from featx.settings import DataOptions
from featx.sources.decode import ImageError, decode_image
from featx.sources.spec import open_source
from featx.store.codes import open_codes


def one_line_error(rc, err: str, code, needles=()) -> str:
    lines = [ln for ln in err.strip().split("\n") if ln.strip()]
    assert "Traceback" not in err and rc == code and len(lines) == 1, (rc, err)
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def real_class(data, ident: str) -> str:
    """The class folder an id's file really lies in."""
    return os.path.relpath(os.path.realpath(os.path.join(data, ident)), os.path.realpath(data)).split(os.sep)[
        0
    ]


# -- item 6: folder links and files reached twice ------------------------------------------------


def test_class_folder_linked_to_the_root_is_skipped_not_a_phantom_class(tmp_path):
    """`ln -s . data/zlink` once gave a class `zlink` holding a copy of every image."""
    data = make_images(tmp_path / "d", classes=("a", "b"), per_class=3, size=(16, 16))
    (data / "zlink").symlink_to(".")
    (data / "a" / "up").symlink_to("../b")  # inside a class, a link to another class
    ds = open_source(str(data))
    assert ds.classes == ["a", "b"] and len(ds) == 6, (ds.classes, ds.ids)
    assert all(real_class(data, i) == ds.classes[k] for i, k in zip(ds.ids, ds.labels))
    [note] = [n for n in ds.notes if "link" in n]
    assert "2 folder link(s) lead back into the dataset" in note and "zlink -> ." in note


def test_folder_link_out_of_the_tree_is_followed(tmp_path):
    outside = make_images(tmp_path / "elsewhere", classes=("owl",), per_class=2, size=(16, 16))
    data = make_images(tmp_path / "d", classes=("a", "b"), per_class=2, size=(16, 16))
    (data / "owl").symlink_to(outside / "owl")
    ds = open_source(str(data))
    assert ds.classes == ["a", "b", "owl"] and ds.counts()["train"]["owl"] + ds.counts()["test"]["owl"] == 2
    assert not [n for n in ds.notes if "link" in n]


def test_the_same_image_file_reached_twice_is_taken_once(tmp_path):
    """A file linked into another class keeps the label of the folder it really lies in; a
    folder outside the tree linked from two classes gives its images once (to the first)."""
    data = make_images(tmp_path / "d", classes=("a", "b"), per_class=2, size=(16, 16))
    (data / "a" / "stray.jpg").symlink_to("../b/b_000.jpg")  # a sorts first, but b owns the file
    outside = make_images(tmp_path / "out", classes=("x",), per_class=2, size=(16, 16))
    (data / "a" / "ext").symlink_to(outside / "x")
    (data / "b" / "ext").symlink_to(outside / "x")
    ds = open_source(str(data))
    reals = [os.path.realpath(os.path.join(data, i)) for i in ds.ids]
    assert len(reals) == len(set(reals)) == 6, ds.ids
    assert "b/b_000.jpg" in ds.ids and "a/stray.jpg" not in ds.ids
    assert sorted(i for i in ds.ids if "/ext/" in i) == ["a/ext/x_000.jpg", "a/ext/x_001.jpg"]
    [note] = [n for n in ds.notes if "reached twice" in n]
    assert note.split(": ", 1)[1].startswith("3 image file(s) are reached twice")
    # predict's folder walk takes each file once too
    assert len(collect_images([str(data)])) == 6


# -- item 7: one CSV reader ----------------------------------------------------------------------


def _manifest(tmp_path, header: str | None, rows: list[str], name="m.csv", encoding="utf-8", bom=False):
    text = "\n".join(([header] if header else []) + rows) + "\n"
    (tmp_path / name).write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    return tmp_path / name


@pytest.fixture
def imgs(tmp_path):
    make_images(tmp_path / "imgs", classes=("c0", "c1"), per_class=3, size=(16, 16))
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "imgs").rglob("*.jpg"))


def test_conflicting_duplicate_rows_are_an_error_naming_the_path(tmp_path, imgs):
    rows = [f"{p},{p.split('/')[1]}" for p in imgs] + [f"./{imgs[1]},c1"]
    m = _manifest(tmp_path, "path,label", rows)
    with pytest.raises(
        UsageError, match=f"{imgs[1]} is listed twice with different labels.*row 3: c0, row 8: c1"
    ):
        open_source(str(m))
    m = _manifest(tmp_path, "path,label,split", [f"{p},c0,train" for p in imgs] + [f"{imgs[0]},c0,test"])
    rc, out, err = cli("-q", "extract", *FAST_ARGS, "--data", m, "--cache-dir", tmp_path / "c")
    one_line_error(rc, err, 2, [str(m), imgs[0], "listed twice", "c0/train", "c0/test"])


def test_identical_duplicate_rows_are_dropped_with_one_note(tmp_path, imgs):
    rows = [f"{p},{p.split('/')[1]}" for p in imgs]
    ds = open_source(str(_manifest(tmp_path, None, rows + rows[:2] + [rows[0]])))
    assert len(ds) == 6 and len(set(ds.ids)) == 6
    assert ds.notes == [
        f"--data {tmp_path / 'm.csv'}: 3 duplicate row(s) were dropped (first: {imgs[0]}, rows 1 and 7)"
    ]


@pytest.mark.parametrize(
    "header", ["filename,class", "File,Target", "image,category", "class,filename", "Image_Path,Label,Split"]
)
def test_known_header_names_place_the_columns(tmp_path, imgs, header):
    swap = header.startswith("class")
    split = header.endswith("Split")
    rows = [
        ",".join([p.split("/")[1], p] if swap else [p, p.split("/")[1]]) + (",train" if split else "")
        for p in imgs
    ]
    ds = open_source(str(_manifest(tmp_path, header, rows, bom=True)))
    assert ds.classes == ["c0", "c1"] and len(ds) == 6 and not ds.notes
    assert all(i.split("/")[1] == ds.classes[k] for i, k in zip(ds.ids, ds.labels))


def test_unrecognised_header_is_not_a_data_row(tmp_path, imgs):
    """`img_name,species` names no image: it is a header (said once), not an image of a class
    called 'species'."""
    ds = open_source(str(_manifest(tmp_path, "img_name,species", [f"{p},{p.split('/')[1]}" for p in imgs])))
    assert ds.classes == ["c0", "c1"] and len(ds) == 6
    assert len(ds.notes) == 1 and "read as a header" in ds.notes[0]
    # a first row that names an image is data, even when its label is a column word
    ds = open_source(str(_manifest(tmp_path, None, [f"{imgs[0]},class"] + [f"{p},c1" for p in imgs[1:]])))
    assert ds.classes == ["c1", "class"] and len(ds) == 6


def test_header_naming_no_label_column_is_one_line_error(tmp_path, imgs):
    m = _manifest(tmp_path, "label,path", [f"c0,{p}" for p in imgs])
    assert open_source(str(m)).classes == ["c0"]
    m = _manifest(tmp_path, "path,split,label", [f"{p},train" for p in imgs])
    with pytest.raises(UsageError, match="row 2 has 2 columns"):
        open_source(str(m))


@pytest.mark.parametrize("command", ["extract", "predict"])
def test_latin1_csv_is_one_line_error_naming_the_file_and_the_fix(tmp_path, imgs, command):
    m = _manifest(tmp_path, "path,label", [f"{p},caf\u00e9" for p in imgs], encoding="latin-1")
    if command == "extract":
        rc, out, err = cli("-q", "extract", *FAST_ARGS, "--data", m, "--cache-dir", tmp_path / "c")
    else:  # the CSV is read before the classifier is loaded
        rc, out, err = cli("-q", "predict", tmp_path / "no.joblib", m)
    one_line_error(rc, err, 2, [str(m), "not UTF-8", "byte 0xe9 on line 2", "iconv -f latin1 -t utf-8"])


def test_predict_csv_uses_the_same_reader(tmp_path, imgs):
    """A BOM before `path` once made the header an image row; a `filename` header, a second
    column and blank rows are read like extract's manifests."""
    want = [str(tmp_path / p) for p in imgs]
    assert collect_images([str(_manifest(tmp_path, "path", imgs, bom=True))]) == want
    got = collect_images([str(_manifest(tmp_path, "label,filename", [f"x,{p}" for p in imgs] + ["", ","]))])
    assert got == want
    from featx.sources.manifests import read_csv

    t = read_csv(_manifest(tmp_path, "path", imgs, bom=True), "x", need=("path",))
    assert t.header == "named" and [r["path"] for _, r in t.rows] == imgs


def test_group_column_keeps_each_group_on_one_side(tmp_path):
    """Images of one subject in both train and test leak; a group column prevents it."""
    make_images(tmp_path / "imgs", classes=("c0", "c1"), per_class=12, size=(8, 8))
    rows = [
        f"{p.relative_to(tmp_path)},{p.parent.name},s{k // 3}{p.parent.name}"
        for k, p in enumerate(sorted((tmp_path / "imgs").rglob("*.jpg")))
    ]
    m = _manifest(tmp_path, "filename,class,subject", rows)
    for seed in range(4):
        ds = open_source(str(m), DataOptions(seed=seed, test_fraction=0.25))
        group = {r.split(",")[0]: r.split(",")[2] for r in rows}
        sides = {}
        for i, s in zip(ds.ids, ds.splits):
            sides.setdefault(group[i], set()).add(s)
        assert all(len(v) == 1 for v in sides.values()), sides
        assert ds.counts()["test"] == {"c0": 3, "c1": 3}
    with_split = [f"{r},{'test' if k == 4 else 'train'}" for k, r in enumerate(rows)]
    m = _manifest(tmp_path, "path,label,group,split", with_split)
    with pytest.raises(UsageError, match="group 's1c0' is in split train \\(row 5\\) and test \\(row 6\\)"):
        open_source(str(m))


# -- item 8: what a folder drops, and why --------------------------------------------------------


def test_loose_images_beside_class_folders_are_noted_once(tmp_path):
    data = make_images(
        tmp_path / "d", classes=("a", "b"), per_class=2, size=(16, 16), splits=("train", "test")
    )
    for where in ("", "train/", "train/"):
        Image.new("RGB", (8, 8)).save(data / f"{where or 'root'}{len(os.listdir(data / (where or '.')))}.png")
    ds = open_source(str(data))
    assert len(ds) == 8
    [note] = [n for n in ds.notes if "not in a class folder" in n]
    assert "3 image(s) lie directly in the data folder or a split folder" in note and "(first: root" in note
    flat = make_images(tmp_path / "flat", classes=("a", "b"), per_class=2, size=(16, 16))
    Image.new("RGB", (8, 8)).save(flat / "stray.jpg")
    assert any(
        "1 image(s) lie directly" in n and "first: stray.jpg" in n for n in open_source(str(flat)).notes
    )
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "x.png")
    (loose / "empty_class").mkdir()
    ds = open_source(str(loose))  # images, none in a class folder: unlabelled data
    assert not ds.labelled and ds.ids == ["x.png"]


def test_class_folder_named_train_in_a_flat_layout_is_a_class(tmp_path):
    """`train/` holding images (no class folders) beside `cat/` once gave 'no images found'."""
    data = make_images(tmp_path / "d", classes=("cat", "train"), per_class=3, size=(16, 16))
    ds = open_source(str(data))
    assert ds.classes == ["cat", "train"] and len(ds) == 6 and ds.split_source == "seeded"
    assert any("train hold no class folders and are read as classes" in n for n in ds.notes)
    only = make_images(tmp_path / "only", classes=("train", "test"), per_class=2, size=(16, 16))
    assert open_source(str(only)).classes == ["test", "train"]


def test_test_class_without_training_images_is_noted(tmp_path):
    data = make_images(
        tmp_path / "d", classes=("a", "b"), per_class=2, size=(16, 16), splits=("train", "test")
    )
    make_images(data / "test", classes=("zebra",), per_class=3, size=(16, 16))
    ds = open_source(str(data))
    [note] = [n for n in ds.notes if "no training images" in n]
    assert "1 class(es) have val/test images but no training images (zebra; 3 images)" in note
    assert not [n for n in open_source(str(make_images(tmp_path / "ok", splits=("train", "test")))).notes]


def _idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(head + arr.tobytes())


@pytest.mark.parametrize(
    "folder, values, classes",
    [
        ("masks-idx", (0, 255), ["0", "255"]),
        ("my-fashion-mnist", (0, 3, 9), ["T-shirt/top", "Dress", "Ankle boot"]),
    ],
)
def test_idx_classes_are_the_labels_present(tmp_path, folder, values, classes):
    d = tmp_path / folder
    d.mkdir()
    for prefix, n in (("train", 12), ("t10k", 6)):
        _idx(d / f"{prefix}-images-idx3-ubyte.gz", np.zeros((n, 4, 4)))
        _idx(d / f"{prefix}-labels-idx1-ubyte.gz", [values[i % len(values)] for i in range(n)])
    ds = open_source(str(d))
    assert ds.classes == classes, ds.classes
    assert ds.counts()["train"] == {c: 12 // len(values) for c in classes}
    assert any("hold the values" in n for n in ds.notes)


# -- item 9: size and aspect-ratio bombs ---------------------------------------------------------


def _strip_png(path, w, h):
    Image.new("L", (w, h), 128).save(path)
    return str(path)


def test_extreme_aspect_png_is_refused_before_decoding(tmp_path):
    """2,000,000 x 1 pixels in 6 KB once ended in MemoryError: refused from the header."""
    p = _strip_png(tmp_path / "strip.png", 2_000_000, 1)
    assert os.path.getsize(p) < 20_000
    t0 = time.perf_counter()
    with pytest.raises(
        ImageError,
        match=r"too elongated \(2000000x1 pixels, aspect ratio over 100:1\).*FEATX_MAX_ASPECT_RATIO",
    ):
        decode_image(p, "strip.png")
    assert time.perf_counter() - t0 < 1.0
    decode_image(_strip_png(tmp_path / "wide.png", 1000, 10))  # 100:1 is allowed


def test_resize_is_bounded_before_it_allocates():
    """In-memory images (torchvision datasets, CNNCodes) meet the limits in to_uint8: an aspect
    bomb, and a resized size over FEATX_MAX_IMAGE_PIXELS (40960 px shorter side)."""
    with pytest.raises(ImageError, match="too elongated"):
        Preprocess(32, 32).to_uint8(Image.new("RGB", (300_000, 1)))
    with pytest.raises(ImageError, match=r"too large once resized \(50x40 -> 51200x40960 pixels"):
        Preprocess(4096, 40960).to_uint8(Image.new("RGB", (50, 40)))
    assert Preprocess(32, 36).resized_size(300, 100) == (108, 36)
    assert Preprocess(32, 36, crop_mode="squash").resized_size(300, 100) == (36, 36)
    assert tuple(Preprocess(32, 36).to_uint8(Image.new("RGB", (300, 100))).shape) == (3, 32, 32)


def test_device_decode_path_checks_the_jpeg_header(tmp_path):
    from featx.sources.dataset import FileLoader
    from featx.sources.decode import RawImages

    Image.new("RGB", (65000, 8)).save(tmp_path / "strip.jpg")
    Image.new("RGB", (64, 48)).save(tmp_path / "ok.jpg")
    paths = [str(tmp_path / "strip.jpg"), str(tmp_path / "ok.jpg")]
    raw = RawImages(FileLoader(paths, ["strip.jpg", "ok.jpg"]), 2, Preprocess(32, 32))
    assert raw[0][1] is None and raw[0][2].startswith("too elongated (65000x8")
    assert raw[1][2] is None and raw[1][1][0] == "jpeg"
    huge = RawImages(FileLoader(paths[1:], ["ok.jpg"]), 1, Preprocess(4096, 40960))
    assert huge[0][1] is None and huge[0][2].startswith("too large once resized")


def test_aspect_bomb_in_extract_is_skipped_and_listed_without_the_memory(tmp_path):
    """300,000 x 1 pixels in 953 bytes lifted extract's peak RSS from 0.87 to 2.76 GB."""
    data = make_images(tmp_path / "d", classes=("a", "b"), per_class=3, size=(16, 16))
    _strip_png(data / "a" / "bomb.png", 300_000, 1)
    argv = [
        sys.executable,
        "-m",
        "featx.cli",
        "-q",
        "extract",
        *FAST_ARGS,
        "--data",
        str(data),
        "--layers",
        "layer1",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    # a parent of its own, so that ru_maxrss is featx's alone
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=300)
    head, last = r.stdout.strip().splitlines()[:2]
    rc, rss_kb = map(int, head.split())
    assert rc == 0, r.stdout
    with open_codes(last) as f:
        assert len(f) == 6 and dict(f.skipped)["a/bomb.png"].startswith("too elongated (300000x1")
    assert rss_kb < 1_800_000, f"peak RSS {rss_kb / 1e6:.2f} GB"


def _png_header_only(path, w, h):
    """A PNG whose header says w x h and whose pixel data is not zlib data (fails at once)."""

    def chunk(tag, data):
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    idat = b"not zlib data"
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return str(path)


def test_max_image_pixels_governs_pillow_too(tmp_path):
    """Over twice Pillow's default limit (179 Mpx), FEATX_MAX_IMAGE_PIXELS was overruled by
    Pillow's own refusal; now the setting decides (this file then fails as damaged, not as big)."""
    p = _png_header_only(tmp_path / "big.png", 20_000, 10_000)  # 200 Mpx
    code = "import sys; from featx.sources.decode import decode_image\ntry: decode_image(sys.argv[1], 'big.png')\nexcept Exception as e: print(e)"

    def run(env):
        return subprocess.run(
            [sys.executable, "-c", code, p],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            timeout=60,
        ).stdout.strip()

    assert (
        run({})
        == f"big.png: too large (200000000 pixels, over {89_478_485}); raise FEATX_MAX_IMAGE_PIXELS to allow it"
    )
    allowed = run({"FEATX_MAX_IMAGE_PIXELS": "300000000"})
    assert allowed.startswith("big.png: cannot decode") and "omb" not in allowed, allowed
    assert run({"FEATX_MAX_IMAGE_PIXELS": "1000"}).startswith(
        "big.png: too large (200000000 pixels, over 1000)"
    )


def test_bad_limit_setting_is_one_line_error(tmp_path):
    data = make_images(tmp_path / "d", classes=("a", "b"), per_class=2, size=(16, 16))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "featx.cli",
            "-q",
            "extract",
            *FAST_ARGS,
            "--data",
            str(data),
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FEATX_MAX_ASPECT_RATIO": "wide"},
    )
    one_line_error(r.returncode, r.stderr, 2, ["FEATX_MAX_ASPECT_RATIO='wide'", "positive integer"])
