"""Bad images and odd datasets through `featx extract`: each is converted, or skipped and listed
(in /skipped and on stderr), or stopped with a one-line error; never a traceback, never a row
with a wrong label.

Converted images are checked against ground truth made independently of featx's decoder: the
same pixels saved as plain RGB PNGs in a second folder and extracted the same way.
"""

from __future__ import annotations

import csv
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST_ARGS, assert_one_line_error, cli, make_images
from featx.store.codes import open_codes

LAYERS = "layer1,layer3"


def extract(data, cache, *extra) -> tuple[str, str]:
    """Run extract (not quiet, so warnings and the summary are visible); (path, stderr)."""
    rc, out, err = cli(
        "extract", *FAST_ARGS, "--data", data, "--layers", LAYERS, "--cache-dir", cache, *extra
    )
    assert rc == 0 and "Traceback" not in err, (rc, err)
    return out.strip().splitlines()[-1], err


# -- hostile image files -------------------------------------------------------------------------


def png_bomb(path: Path, side: int = 12000) -> None:
    """A valid 1-bit PNG of side x side pixels (144 Mpx > featx's 89.5 Mpx limit) in ~20 KB."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    row = b"\x00" + bytes((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def gradient(w: int, h: int, seed: int) -> np.ndarray:
    """An asymmetric RGB image (rotations and frames change it a lot)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([255 * x / w, 255 * y / h, 255 * ((x + 2 * y) % 17) / 17], axis=-1)
    img[: h // 3, : w // 4] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """An image folder holding every kind of bad input the issue lists, plus a 'truth' folder with
    the expected RGB pixels of the images featx must convert."""
    root = tmp_path_factory.mktemp("hostile")
    data = make_images(root / "data", classes=("a", "b"), per_class=4, size=(40, 30))
    truth = root / "truth"
    (truth / "a").mkdir(parents=True)
    (truth / "b").mkdir(parents=True)
    a, b = data / "a", data / "b"

    good = io.BytesIO()
    Image.fromarray(gradient(64, 48, 1)).save(good, "JPEG", quality=90)
    (a / "zero.jpg").write_bytes(b"")  # zero bytes
    (a / "trunc.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])  # truncated JPEG
    (b / "html.png").write_text("<html><body>not an image</body></html>")  # not an image
    png_bomb(b / "bomb.png")  # decompression bomb
    (a / "selfloop.jpg").symlink_to("selfloop.jpg")  # a symlink to itself (ELOOP)
    (b / "dangling.jpg").symlink_to(root / "nowhere.jpg")  # a symlink to nothing
    (a / "loop").symlink_to(".")  # a directory symlink loop inside a class
    (a / ".hidden.jpg").write_bytes(b"junk")  # hidden: ignored
    (a / "notes.txt").write_text("not an image extension: ignored")
    (data / "empty_class").mkdir()  # empty class folders: ignored with a warning
    (data / "text_only").mkdir()
    (data / "text_only" / "readme.txt").write_text("no images here")

    # animated GIF: the first frame counts
    frames = [Image.fromarray(gradient(40, 40, s)).quantize(64) for s in (2, 3, 4)]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    with Image.open(a / "anim.gif") as im:
        im.convert("RGB").save(truth / "a" / "anim.png")
        im.seek(1)
        im.convert("RGB").save(truth / "a" / "anim_frame2.png")  # must NOT match

    # CMYK JPEG
    Image.fromarray(gradient(36, 36, 5)).convert("CMYK").save(a / "cmyk.jpg", quality=95)
    with Image.open(a / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        im.convert("RGB").save(truth / "a" / "cmyk.png")

    # 16-bit grayscale PNG with values v * 257: exactly v after scaling to 8 bits
    v = gradient(30, 30, 6)[..., 0]
    Image.fromarray(v.astype(np.uint16) * 257).save(b / "deep16.png")
    with Image.open(b / "deep16.png") as im:
        assert im.mode.startswith("I")
    Image.fromarray(v, "L").convert("RGB").save(truth / "b" / "deep16.png")

    # EXIF orientation 6: the stored pixels must be turned 90 degrees clockwise for display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(gradient(48, 24, 7)).save(b / "rot.jpg", quality=95, exif=exif)
    with Image.open(b / "rot.jpg") as im:
        stored = np.asarray(im.convert("RGB"))
    Image.fromarray(np.ascontiguousarray(np.rot90(stored, k=-1))).save(truth / "b" / "rot.png")
    Image.fromarray(stored).save(truth / "b" / "rot_stored.png")  # must NOT match

    # unicode and non-UTF-8 file names
    Image.fromarray(gradient(32, 32, 8)).save(b / "ñandú 🐦.png")
    with open(os.path.join(os.fsencode(a), b"caf\xe9.jpg"), "wb") as f:
        Image.fromarray(gradient(32, 32, 9)).save(f, "JPEG")

    skipped = {"a/zero.jpg", "a/trunc.jpg", "a/selfloop.jpg", "b/html.png", "b/bomb.png", "b/dangling.jpg"}
    return {"root": root, "data": data, "truth": truth, "skipped": skipped}


def _rows(f) -> dict[str, int]:
    return {p: i for i, p in enumerate(f.paths)}


def test_bad_images_are_converted_or_skipped_and_listed(hostile, tmp_path):
    path, err = extract(hostile["data"], tmp_path / "cache")
    with open_codes(path) as f:
        # skipped images: exactly the undecodable ones, each with its reason, in the file
        reasons = dict(f.skipped)
        assert set(reasons) == hostile["skipped"], f.skipped
        assert "too large" in reasons["b/bomb.png"], reasons
        assert all(r.strip() for r in reasons.values())
        # ... and on stderr, each by name, with the summary
        for p in hostile["skipped"]:
            assert f"skipped {p}" in err, err
        assert f"{len(hostile['skipped'])} image(s) could not be decoded" in err, err
        # empty class folders are ignored, with a warning naming them
        assert f.classes == ["a", "b"]
        assert "empty_class" in err and "text_only" in err, err
        # every row: a decodable image, labelled by its own class folder, once
        assert len(f.paths) == len(set(f.paths)) == 14, f.paths
        assert not any("/loop/" in p for p in f.paths), f.paths
        assert [f.classes[k] for k in f.labels] == [p.split("/")[0] for p in f.paths]
        assert "b/ñandú 🐦.png" in f.paths
        assert any(p.startswith("a/caf") and p.endswith(".jpg") for p in f.paths), f.paths
        for p in f.paths:
            p.encode("utf-8")  # ids are printable whatever the file name's bytes
        assert {"a/anim.gif", "a/cmyk.jpg", "b/deep16.png", "b/rot.jpg"} <= set(f.paths)
        rows = _rows(f)
        codes = {n: f.codes(n) for n in f.layers}
        assert all(np.isfinite(c).all() for c in codes.values())

    # converted images give the codes of their expected RGB pixels
    tpath, _ = extract(hostile["truth"], tmp_path / "cache")
    with open_codes(tpath) as t:
        trows = _rows(t)
        tcodes = {n: t.codes(n) for n in t.layers}

    def same(img, truth_img):
        return all(
            np.allclose(codes[n][rows[img]], tcodes[n][trows[truth_img]], rtol=1e-4, atol=1e-5) for n in codes
        )

    for img, expected in [
        ("a/anim.gif", "a/anim.png"),
        ("a/cmyk.jpg", "a/cmyk.png"),
        ("b/deep16.png", "b/deep16.png"),
        ("b/rot.jpg", "b/rot.png"),
    ]:
        assert same(img, expected), f"{img} is not decoded as {expected}"
    # the comparison can tell a wrong frame or a missing rotation apart
    assert not same("a/anim.gif", "a/anim_frame2.png")
    assert not same("b/rot.jpg", "b/rot_stored.png")


@pytest.mark.slow
def test_bad_images_in_worker_processes_give_the_same_file(hostile, tmp_path):
    a, _ = extract(hostile["data"], tmp_path / "c0")
    b, _ = extract(hostile["data"], tmp_path / "c2", "--workers", "2")
    with open_codes(a) as fa, open_codes(b) as fb:
        assert fa.paths == fb.paths and fa.skipped == fb.skipped
        np.testing.assert_array_equal(fa.labels, fb.labels)
        for n in fa.layers:
            np.testing.assert_allclose(fa.codes(n), fb.codes(n), rtol=1e-5, atol=1e-6)


def test_symlink_loop_through_the_dataset_root_never_mislabels(tmp_path):
    """`a/up -> ..` loops back to the dataset root: following it must not file class b's images
    under class a (each image keeps the label of the class folder it really is in)."""
    data = make_images(tmp_path / "d", classes=("a", "b"), per_class=3, size=(32, 32))
    (data / "a" / "up").symlink_to("..")
    (data / "b" / "self").symlink_to(".")
    path, err = extract(data, tmp_path / "cache")
    root = os.path.realpath(data)
    with open_codes(path) as f:
        for p, k in zip(f.paths, f.labels):
            real = os.path.relpath(os.path.realpath(os.path.join(data, p)), root)
            assert real.split(os.sep)[0] == f.classes[k], f"{p} (really {real}) is labelled {f.classes[k]}"
        reals = [os.path.realpath(os.path.join(data, p)) for p in f.paths]
        assert len(reals) == len(set(reals)), f"an image appears twice: {f.paths}"


@pytest.mark.slow
def test_fifo_with_an_image_extension_does_not_hang(tmp_path):
    """A named pipe called `x.jpg` is not an image: skipped and listed (or a clear error), never a
    run that blocks forever opening it."""
    data = make_images(tmp_path / "d", classes=("a", "b"), per_class=3, size=(32, 32))
    os.mkfifo(data / "a" / "pipe.jpg")
    try:
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
                "--layers",
                LAYERS,
                "--cache-dir",
                str(tmp_path / "cache"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("featx extract blocked for 60 s on a FIFO named a/pipe.jpg")
    assert "Traceback" not in r.stderr, r.stderr
    if r.returncode == 0:
        with open_codes(r.stdout.strip().splitlines()[-1]) as f:
            assert "a/pipe.jpg" in dict(f.skipped) and len(f.paths) == 6
    else:
        assert_one_line_error(r.returncode, r.stderr, 1, ["a/pipe.jpg"])


# -- odd datasets --------------------------------------------------------------------------------


def test_dataset_with_one_class(tmp_path):
    """One class: the codes are extracted, all with that label; `fit` then says in one line that
    a classifier needs two classes."""
    data = make_images(tmp_path / "d", classes=("solo",), per_class=6, size=(32, 32))
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--data", data, "--layers", LAYERS, "--cache-dir", tmp_path / "cache"
    )
    assert "Traceback" not in err, err
    if rc != 0:  # refusing is acceptable too, in one line
        assert_one_line_error(rc, err, rc, ["class"])
        return
    path = out.strip().splitlines()[-1]
    with open_codes(path) as f:
        assert f.classes == ["solo"] and len(f) == 6 and (f.labels == 0).all()
    rc, out, err = cli("fit", path, "--C", "1")
    assert_one_line_error(rc, err, 2, ["single class"])


def test_no_decodable_image_is_one_line_error(tmp_path):
    data = tmp_path / "d"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        (data / c / "x.jpg").write_bytes(b"")
        (data / c / "y.png").write_text("nope")
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--data", data, "--layers", LAYERS, "--cache-dir", tmp_path / "cache"
    )
    assert_one_line_error(rc, err, 1, ["none of the 4 images could be decoded"])
    assert not list((tmp_path / "cache").glob("*.h5"))


# (a folder of loose images alone is unlabelled data: tests/sources/test_unlabelled.py)
@pytest.mark.parametrize("layout", ["loose-beside-empty-splits", "only-empty-classes", "only-text-files"])
def test_folder_without_images_is_usage_error(tmp_path, layout):
    data = tmp_path / "d"
    data.mkdir()
    if layout == "loose-beside-empty-splits":
        Image.new("RGB", (8, 8)).save(data / "loose.jpg")  # an image not inside a class folder
        (data / "train" / "a").mkdir(parents=True)
    elif layout == "only-empty-classes":
        (data / "a").mkdir()
        (data / "b").mkdir()
    else:
        (data / "a").mkdir()
        (data / "a" / "x.txt").write_text("x")
    rc, out, err = cli("-q", "extract", *FAST_ARGS, "--data", data, "--cache-dir", tmp_path / "cache")
    assert_one_line_error(rc, err, 2, ["no images found"])


def test_manifest_rows_with_bad_images(tmp_path):
    """A CSV manifest naming a missing file, an empty file, a folder and good images with
    unicode labels: the bad rows are skipped and listed, every good row keeps its label."""
    imgs = make_images(tmp_path / "imgs", classes=("x", "y"), per_class=3, size=(32, 32))
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = [["path", "label", "split"]]
    want = {}
    for i, p in enumerate(sorted(imgs.rglob("*.jpg"))):
        label = "chat noir" if "x_" in p.name else "ñandú"
        rel = os.path.relpath(p, tmp_path)
        rows.append([rel, label, "test" if i % 3 == 0 else "train"])
        want[rel] = label
    rows += [
        ["missing.jpg", "ñandú", "train"],
        ["empty.jpg", "chat noir", "train"],
        ["imgs", "ñandú", "test"],
    ]
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    path, err = extract(tmp_path / "m.csv", tmp_path / "cache")
    with open_codes(path) as f:
        assert set(dict(f.skipped)) == {"missing.jpg", "empty.jpg", "imgs"}, f.skipped
        assert sorted(f.classes) == ["chat noir", "ñandú"]
        assert {p: f.classes[k] for p, k in zip(f.paths, f.labels)} == want


def test_manifest_with_byte_order_mark_header(tmp_path):
    """A CSV saved with a UTF-8 byte-order mark (as spreadsheet programs do): its header is still
    a header, not an image called 'path' of a class called 'label'."""
    imgs = make_images(tmp_path / "imgs", classes=("x", "y"), per_class=3, size=(32, 32))
    lines = ["path,label"] + [
        f"{os.path.relpath(p, tmp_path)},{p.parent.name}" for p in sorted(imgs.rglob("*.jpg"))
    ]
    (tmp_path / "m.csv").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    path, err = extract(tmp_path / "m.csv", tmp_path / "cache")
    with open_codes(path) as f:
        assert f.classes == ["x", "y"], f.classes
        assert not f.skipped, f.skipped


@pytest.mark.parametrize(
    "content",
    [
        b"path,label\nimgs/x.jpg,\xff\xfe\n",
        b"a.jpg,cat,train\nb.jpg,dog,holdout\n",
        b"a.jpg,cat\nb.jpg\n",
        b"path,label\n",
        b"\x00\x01\x02",
        b"",
    ],
)
def test_unreadable_manifest_is_usage_error(tmp_path, content):
    (tmp_path / "m.csv").write_bytes(content)
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--data", tmp_path / "m.csv", "--cache-dir", tmp_path / "c"
    )
    assert_one_line_error(rc, err, 2, [str(tmp_path / "m.csv")])
