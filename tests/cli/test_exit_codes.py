"""The CLI's exit-code contract, over every command: 0 success, 2 the user's input (an option, a
file of the wrong kind, data that cannot support the request), 1 a runtime failure (I/O, a damaged
file featx wrote), 130 interrupted. Each failure is one line on stderr, never a traceback."""

from __future__ import annotations

import shutil

import pytest

from conftest import cli, make_images


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny image folder, its pixels-baseline codes, a classifier on them, a text file."""
    root = tmp_path_factory.mktemp("ec")
    data = make_images(root / "d", per_class=6)
    one = make_images(root / "one", classes=("a",), per_class=4)
    code, out, err = cli(
        "extract", "--model", "pixels", "--data", str(data), "--cache-dir", str(root / "c"), "-q"
    )
    assert code == 0, err
    codes = out.strip().splitlines()[-1]
    code, out, err = cli(
        "extract", "--model", "pixels", "--data", str(one), "--cache-dir", str(root / "c"), "-q"
    )
    assert code == 0, err
    one_codes = out.strip().splitlines()[-1]
    code, _, err = cli("fit", codes, "--out", str(root / "m" / "clf"), "-q")
    assert code == 0, err
    (root / "notes.txt").write_text("not a codes file\n")
    damaged = root / "damaged.h5"
    shutil.copy(codes, damaged)
    with open(damaged, "r+b") as f:  # a real HDF5 file whose content is cut: featx's own file, damaged
        f.truncate(damaged.stat().st_size // 2)
    return {
        "root": root,
        "data": data,
        "codes": codes,
        "one": one_codes,
        "clf": str(root / "m" / "clf"),
        "notes": str(root / "notes.txt"),
        "damaged": str(damaged),
    }


USER = [  # (what, argv template): each is the user's input
    ("unknown option", ["fit", "{codes}", "--no-such-option"]),
    ("unknown fit layer", ["fit", "{codes}", "--layer", "nope"]),
    ("train size larger than a class", ["fit", "{codes}", "--train-size", "100/class"]),
    ("a single class", ["fit", "{one}"]),
    ("info on a text file", ["info", "{notes}"]),
    ("info on a classifier", ["info", "{clf}.safetensors"]),
    ("fit on a classifier", ["fit", "{clf}.safetensors"]),
    ("score on a text file", ["score", "{notes}"]),
    (
        "a classifier as --weights",
        [
            "extract",
            "--model",
            "resnet18",
            "--weights",
            "{clf}.safetensors",
            "--data",
            "{data}",
            "--cache-dir",
            "{root}/c2",
        ],
    ),
    ("layers of an unknown model", ["layers", "resnet1800"]),
    ("predict with a text file", ["predict", "{notes}", "{data}"]),
    ("bench without data", ["bench", "--model", "pixels", "--out", "{root}/b"]),
    (
        "finetune with a bad freeze point",
        [
            "finetune",
            "--model",
            "resnet18",
            "--weights",
            "none",
            "--data",
            "{data}",
            "--train-from",
            "nowhere",
            "--image-size",
            "32",
            "--out",
            "{root}/ft",
        ],
    ),
    ("cache with an unknown subcommand", ["cache", "clean"]),
    ("demo with a bad option", ["demo", "--jobs", "x"]),
    ("export of an unknown layer", ["export", "{codes}", "--layer", "nope", "--out", "{root}/x.npy"]),
    ("export to an unknown format", ["export", "{codes}", "--layer", "pixels", "--out", "{root}/x.csv"]),
    ("export of a text file", ["export", "{notes}", "--layer", "pixels", "--out", "{root}/x.npy"]),
]


@pytest.mark.parametrize("what,argv", USER, ids=[w for w, _ in USER])
def test_the_users_input_exits_2_in_one_line(world, what, argv):
    code, _, err = cli(*[a.format(**world) for a in argv])
    assert code == 2, (what, code, err)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("featx: error") or "usage:" not in ln]
    assert "Traceback" not in err and len([ln for ln in lines if ln.startswith("featx: error")]) <= 1, err


def test_every_unknown_layer_is_named_at_once(world):
    code, _, err = cli("fit", world["codes"], "--layer", "nope,nada")
    assert code == 2 and "'nope'" in err and "'nada'" in err


def test_a_damaged_file_featx_wrote_is_a_runtime_failure(world):
    code, _, err = cli("info", world["damaged"])
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("export", world["damaged"], "--layer", "pixels", "--out", str(world["root"] / "d.npy"))
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
