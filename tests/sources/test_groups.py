"""Leakage-safe splits: `--group-by REGEX` keeps every group (a patient, a subject, a
source photo) on one side of featx's split, hold-out and cross-validation folds."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAST, cli, make_images, write_codes
from featx.classifiers.fit import fit_cell
from featx.classifiers.protocol import parse_train_size, protocol_for
from featx.classifiers.rows import select_rows
from featx.engine.extract import extract
from featx.settings import DataOptions
from featx.sources.cutting import group_holdout, seeded_split
from featx.sources.spec import open_source
from featx.store.codes import CodesFile, open_codes


def _subjects(root, n_subjects=6, per_subject=3, classes=("cat", "dog")):
    """A folder whose file names carry a subject id (`personNN_k.jpg`), like a chest X-ray set."""
    for ci, c in enumerate(classes):
        d = make_images(root / f"tmp_{c}", classes=(c,), per_class=n_subjects * per_subject, seed=ci)
        for k, p in enumerate(sorted((d / c).iterdir())):
            dest = root / c / f"person{ci * 100 + k // per_subject:03d}_{k % per_subject}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            p.rename(dest)
    return root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(0, 11), st.integers(0, 2)), min_size=6, max_size=80),
    st.integers(0, 9),
    st.floats(0.1, 0.5),
)
def test_no_group_is_ever_on_both_sides(pairs, seed, fraction):
    groups = np.array([f"g{g}" for g, _ in pairs])
    labels = np.array([c for _, c in pairs])
    for held in (
        group_holdout(labels, groups, fraction, np.random.default_rng(seed)),
        seeded_split(labels, fraction, np.random.default_rng(seed), groups) == "test",
    ):
        assert not set(groups[held]) & set(groups[~held])


def test_grouped_folds_and_hold_outs_keep_groups_whole(tmp_path):
    """Each group's codes are a one-hot of the group and its label is the group's: an ungrouped
    split lets the classifier recognise the group (validation ~1.0); grouped folds and hold-outs
    cannot (validation near chance), which is what a new patient would get."""
    rng = np.random.default_rng(0)
    n_groups, per = 40, 6
    g = np.repeat(np.arange(n_groups), per)
    y = rng.permutation(np.repeat([0, 1], n_groups // 2))[g]
    X = np.eye(n_groups)[g] * 5 + rng.normal(size=(len(g), n_groups)) * 0.1
    splits = np.where(np.isin(g, np.arange(0, n_groups, 5)), "test", "train")
    plain = write_codes(tmp_path / "p.h5", {"L": X}, y, splits, ["a", "b"])
    grouped = write_codes(tmp_path / "g.h5", {"L": X}, y, splits, ["a", "b"], groups=[f"s{i}" for i in g])
    for proto, size in (
        (protocol_for("softmax", Cs=(1.0, 10.0)), "all"),
        (protocol_for("softmax", Cs=(1.0,), min_val_per_class=0), "all"),
    ):
        leak, safe = fit_cell(plain, ["L"], proto, size, 0), fit_cell(grouped, ["L"], proto, size, 0)
        assert safe["val_source"].startswith(("5-fold grouped cv", "grouped hold-out")), safe["val_source"]
        assert leak["val_score"] > 0.95 and safe["val_score"] < 0.8, (leak["val_score"], safe["val_score"])
    with CodesFile(grouped) as f:
        rows = select_rows(f, protocol_for("softmax", min_val_per_class=0), parse_train_size("all"), 0)
        assert not set(f.groups[rows.train]) & set(f.groups[rows.val])
        assert rows.groups is not None and list(rows.groups) == list(f.groups[rows.train])


def test_group_by_on_a_folder(tmp_path, cache_dir):
    root = _subjects(tmp_path / "xray")
    opts = DataOptions(group_by=r"person\d+", test_fraction=0.3)
    ds = open_source(str(root), opts)
    assert len(set(ds.groups)) == 12
    test = ds.splits == "test"
    assert test.any() and not set(ds.groups[test]) & set(ds.groups[~test])
    plain = extract("resnet18", str(root), "avgpool", cache_dir=str(cache_dir), **FAST)
    res = extract("resnet18", str(root), "avgpool", cache_dir=str(cache_dir), data_options=opts, **FAST)
    assert res.path != plain.path  # the groups are part of the entry
    with open_codes(res.path) as f, open_codes(plain.path) as p:
        assert p.groups is None and len(f.groups) == len(f)
        assert not set(f.groups[f.split == "test"]) & set(f.groups[f.split == "train"])
        assert f.attrs["data_options"] and "group_by" in f.attrs["data_options"]


def test_unmatched_paths_are_one_line_naming_the_first(tmp_path):
    root = _subjects(tmp_path / "x")
    (root / "cat" / "scan_77.jpg").write_bytes((root / "cat" / "person000_0.jpg").read_bytes())
    rc, out, err = cli(
        "extract",
        "--model",
        "resnet18",
        "--data",
        root,
        "--weights",
        "none",
        "--image-size",
        "32",
        "--workers",
        "0",
        "--group-by",
        r"person\d+",
        "--cache-dir",
        tmp_path / "c",
    )
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "1 of 37 image paths" in err and "cat/scan_77.jpg" in err
    rc, out, err = cli(
        "extract",
        "--model",
        "resnet18",
        "--data",
        root,
        "--weights",
        "none",
        "--group-by",
        "(",
        "--cache-dir",
        tmp_path / "c",
    )
    assert rc == 2 and "not a regular expression" in err


def test_split_folders_are_kept_and_groups_across_them_noted(tmp_path):
    root = make_images(tmp_path / "s", per_class=4, splits=("train", "test"))
    ds = open_source(str(root), DataOptions(group_by=r"_(\d+)\."))  # cat_000.jpg -> '000', in both splits
    assert list(ds.splits) == list(open_source(str(root)).splits)
    assert any("groups have images in more than one of the data's own splits" in n for n in ds.notes)
    assert any("hold images of more than one class" in n for n in ds.notes)


@pytest.mark.parametrize("pattern,group", [(r"person\d+", "person000"), (r"(person\d+)_", "person000")])
def test_the_first_capture_group_is_the_group(tmp_path, pattern, group):
    root = _subjects(tmp_path / "x", n_subjects=2, per_subject=2)
    ds = open_source(str(root), DataOptions(group_by=pattern))
    assert ds.groups[list(ds.ids).index("cat/person000_0.jpg")] == group
