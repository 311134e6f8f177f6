"""`--data wds:PATTERN`: WebDataset shards read in place, the same as the images in a folder."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest

from conftest import assert_one_line_error, cli, make_images, run_cli, sigkill_when
from featx.errors import UsageError
from featx.settings import DataOptions
from featx.sources.spec import open_source
from featx.sources.webdataset import expand_braces
from featx.store.codes import open_codes


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, out, per_shard=4, label="cls", classes=None):
    """The images of an ImageFolder as shards `out/shard-00000K.tar`: key CLASS/NAME (the folder's id
    without its suffix), label KEY.cls (the class index) or KEY.txt (its name), or none."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    classes = classes or sorted({p.parent.name for p in files})
    out.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(files), per_shard):
        with tarfile.open(out / f"shard-{k // per_shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for p in files[k : k + per_shard]:
                key = str(p.relative_to(folder).with_suffix(""))
                _add(tar, key + p.suffix, p.read_bytes())
                if label == "cls":
                    _add(tar, key + ".cls", str(classes.index(p.parent.name)).encode())
                elif label == "txt":
                    _add(tar, key + ".txt", p.parent.name.encode())
    return (len(files) + per_shard - 1) // per_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    data = make_images(root / "imgs", per_class=5)
    n = write_shards(data, root / "s")
    (root / "s" / "classes.txt").write_text("cat\ndog\nowl\n")  # .cls indexes these names
    return data, root / "s", f"wds:{root / 's'}/shard-{{000000..{n - 1:06d}}}.tar"


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert expand_braces("plain{x}.tar") == ["plain{x}.tar"]


def test_shards_read_like_the_folder(shards):
    data, _, spec = shards
    wds, folder = open_source(spec), open_source(str(data))
    assert wds.classes == folder.classes and np.array_equal(wds.labels, folder.labels)
    assert open_source(spec.replace("/s/", "/s/../s/")).classes == ["cat", "dog", "owl"]
    assert wds.ids == [os.path.splitext(i)[0] for i in folder.ids]
    assert np.array_equal(wds.splits, folder.splits)  # the same seeded split
    assert wds.labelled and wds.split_source == "seeded"
    for i in (0, 7, len(wds) - 1):
        assert np.array_equal(np.asarray(wds.load(i)), np.asarray(folder.load(i)))
    assert open_source(spec).fingerprint == wds.fingerprint  # deterministic
    limited = open_source(spec, DataOptions(per_class_limit=2, group_by=r"_(\d)", test_fraction=0.4))
    assert len(limited) == 6 and limited.groups is not None


def test_txt_labels_classes_file_and_unlabelled(tmp_path):
    data = make_images(tmp_path / "imgs", classes=("b", "a"), per_class=3)
    write_shards(data, tmp_path / "t", label="txt")
    ds = open_source(f"wds:{tmp_path}/t/*.tar")
    assert ds.classes == ["a", "b"] and ds.labelled
    (tmp_path / "t" / "classes.txt").write_text("b\na\n")
    assert open_source(f"wds:{tmp_path}/t/*.tar").classes == ["b", "a"]
    (tmp_path / "t" / "classes.txt").write_text("b\n")
    with pytest.raises(UsageError, match="label 'a' in .txt is not a class of classes.txt"):
        open_source(f"wds:{tmp_path}/t/*.tar")
    write_shards(data, tmp_path / "u", label=None)
    ds = open_source(f"wds:{tmp_path}/u/shard-{{000000..000001}}.tar")
    assert not ds.labelled and ds.classes == [""]


def _tar(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            _add(tar, name, data)
    return path


def test_bad_shards_are_one_line(shards, tmp_path):
    data, s, spec = shards
    jpg = next(data.rglob("*.jpg")).read_bytes()
    cases = []
    cases.append((f"wds:{tmp_path}/none-{{0..3}}.tar", "matches no shard"))
    cases.append((f"wds:{s}/shard-{{000000..000009}}.tar", "do not exist"))
    (tmp_path / "text.tar").write_text("hello, not a tar\n" * 40)
    cases.append((f"wds:{tmp_path}/text.tar", "not an uncompressed tar"))
    whole = _tar(tmp_path / "whole.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg), ("b.cls", b"1")])
    raw = whole.read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[:700])  # inside a.jpg's data
    cases.append((f"wds:{tmp_path}/cut.tar", "truncated"))
    with tarfile.open(whole) as t:
        last = t.getmembers()[-1]
    (tmp_path / "noend.tar").write_bytes(raw[: last.offset_data + (last.size + 511) // 512 * 512])
    cases.append((f"wds:{tmp_path}/noend.tar", "truncated"))
    _tar(tmp_path / "dup.tar", [("a.jpg", jpg), ("a.cls", b"0")])
    cases.append((f"wds:{tmp_path}/{{whole,dup}}.tar", "keys must be unique across shards"))
    _tar(tmp_path / "badcls.tar", [("a.jpg", jpg), ("a.cls", b"cat")])
    cases.append((f"wds:{tmp_path}/badcls.tar", "label 'cat' in .cls is not a non-negative integer"))
    _tar(tmp_path / "some.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg)])
    cases.append((f"wds:{tmp_path}/some.tar", "1 of 2 samples have no label"))
    _tar(tmp_path / "mixed.tar", [("a.jpg", jpg), ("a.cls", b"0"), ("b.jpg", jpg), ("b.txt", b"x")])
    cases.append((f"wds:{tmp_path}/mixed.tar", "use one"))
    for spec_, needle in cases:
        rc, _, err = cli(
            "extract", "--model", "pixels", "--data", spec_, "--cache-dir", tmp_path / "c", "--workers", "0"
        )
        assert_one_line_error(rc, err, 2, [needle])


def test_missing_image_noted_and_bad_image_skipped(shards, tmp_path):
    data, _, _ = shards
    jpg = next(data.rglob("*.jpg")).read_bytes()
    _tar(
        tmp_path / "x.tar",
        [
            ("a.jpg", jpg),
            ("a.cls", b"0"),
            ("b.png", b"not a png"),
            ("b.cls", b"1"),
            ("c.json", b"{}"),
            ("c.cls", b"1"),
            ("d.jpeg", jpg),
            ("d.cls", b"1"),
        ],
    )
    ds = open_source(f"wds:{tmp_path}/x.tar")
    assert ds.ids == ["a", "b", "d"]
    assert any("1 sample(s) have no image member" in n and "first: c" in n for n in ds.notes)
    rc, out, err = cli(
        "extract",
        "--model",
        "pixels",
        "--data",
        f"wds:{tmp_path}/x.tar",
        "--cache-dir",
        tmp_path / "c",
        "--test-fraction",
        "0.5",
        "--workers",
        "0",
    )
    assert rc == 0, err
    with open_codes(out.strip().splitlines()[-1]) as f:
        assert f.paths == ["a", "d"] and f.skipped[0][0] == "b" and "cannot decode" in f.skipped[0][1]


def test_extract_from_shards_equals_the_folder(shards, tmp_path):
    data, _, spec = shards
    args = ["extract", "--model", "pixels", "--cache-dir", tmp_path / "c", "-q", "--workers", "0"]
    rc, out, err = cli(*args, "--data", spec)
    assert rc == 0, err
    rc2, out2, err2 = cli(*args, "--data", data)
    assert rc2 == 0, err2
    with open_codes(out.strip().splitlines()[-1]) as a, open_codes(out2.strip().splitlines()[-1]) as b:
        assert a.paths == [os.path.splitext(p)[0] for p in b.paths]
        np.testing.assert_array_equal(a.codes("pixels"), b.codes("pixels"))
        assert a.attrs["dataset"].startswith("wds:")


def _progress(entry: str) -> int:
    try:
        with open(os.path.join(entry + ".partial", "progress.json")) as f:
            return json.load(f)["samples_done"]
    except (OSError, ValueError):
        return 0


def test_sigkill_then_resume_from_shards(tmp_path):
    data = make_images(tmp_path / "d", per_class=40, size=(64, 64))
    n = write_shards(data, tmp_path / "s", per_shard=25)
    spec = f"wds:{tmp_path}/s/shard-{{000000..{n - 1:06d}}}.tar"
    args = [
        "extract",
        "--model",
        "resnet50",
        "--data",
        spec,
        "--layers",
        "layer2,fc",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--cache-dir",
    ]
    ref = run_cli(*args, str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    ref_path = ref.stdout.strip()
    entry = str(tmp_path / "c" / os.path.basename(ref_path))
    sigkill_when([*args, tmp_path / "c"], lambda: _progress(entry) >= 16)
    assert not os.path.exists(entry), "the run finished before it could be killed"
    done = _progress(entry)
    r = run_cli(*args, str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert f"resuming {os.path.basename(entry)} at image {done}" in r.stderr
    with open_codes(ref_path) as a, open_codes(entry) as b:
        assert a.paths == b.paths and len(b) == 120
        for name in a.layers:
            np.testing.assert_array_equal(a.codes(name), b.codes(name))
