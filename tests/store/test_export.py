"""`featx export`: one layer to .npy / .parquet / .h5, streamed in blocks, atomic, codes exact."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import assert_one_line_error, cli, write_codes
from featx.store.codes import open_codes
from featx.store.export import export_layer


@pytest.fixture
def codes_file(tmp_path):
    rng = np.random.default_rng(0)
    n = 37
    layers = {"a": rng.normal(size=(n, 5)), "b": rng.normal(size=(n, 3))}
    labels = rng.integers(0, 3, n)
    splits = np.where(np.arange(n) % 4 == 0, "test", "train")
    return write_codes(
        tmp_path / "c.h5",
        layers,
        labels,
        splits,
        ["cat", "dog", "owl"],
        groups=[f"g{i % 5}" for i in range(n)],
    )


def test_npy_equals_codes_in_small_blocks(codes_file, tmp_path):
    out = tmp_path / "x.npy"
    written = export_layer(codes_file, "a", str(out), block_rows=4)
    assert written[0] == str(out)
    with open_codes(codes_file) as f:
        assert np.array_equal(np.load(out), f.codes("a"))
        assert np.array_equal(np.load(tmp_path / "x.labels.npy"), f.labels)
        assert np.array_equal(np.load(tmp_path / "x.split.npy"), f.split)
        assert (tmp_path / "x.paths.txt").read_text().splitlines() == f.paths
        assert (tmp_path / "x.classes.txt").read_text().splitlines() == f.classes
        assert (tmp_path / "x.groups.txt").read_text().splitlines() == f.groups.tolist()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_h5_is_a_codes_file_with_that_layer(codes_file, tmp_path):
    out = tmp_path / "only_b.h5"
    export_layer(codes_file, "b", str(out), block_rows=5)
    with open_codes(codes_file) as f, open_codes(str(out)) as g:
        assert g.layers == ["b"]
        assert np.array_equal(g.codes("b"), f.codes("b"))
        assert np.array_equal(g.labels, f.labels) and g.paths == f.paths and g.classes == f.classes
        assert np.array_equal(g.groups, f.groups)


def test_parquet_rows(codes_file, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "x.parquet"
    export_layer(codes_file, "a", str(out), block_rows=8)
    t = pq.read_table(out)
    with open_codes(codes_file) as f:
        codes = t.column("code").combine_chunks().flatten().to_numpy().reshape(len(f), -1)
        assert np.array_equal(codes, f.codes("a"))
        assert t.column("id").to_pylist() == f.paths
        assert t.column("label").to_pylist() == f.labels.tolist()
        assert t.column("class").to_pylist() == [f.classes[k] for k in f.labels]
        assert t.column("split").to_pylist() == f.split.tolist()


def test_cli_export_and_bad_inputs(codes_file, tmp_path):
    rc, out, err = cli("export", codes_file, "--layer", "a", "--out", tmp_path / "y.npy", "--block-rows", "3")
    assert rc == 0, err
    assert out.splitlines()[0] == str(tmp_path / "y.npy")
    rc, _, err = cli("export", codes_file, "--layer", "zz", "--out", tmp_path / "z.npy")
    assert_one_line_error(rc, err, 2, ["zz", "it holds a, b"])
    rc, _, err = cli("export", codes_file, "--layer", "a", "--out", tmp_path / "z.csv")
    assert_one_line_error(rc, err, 2, [".csv", ".parquet"])
    rc, _, err = cli("export", codes_file, "--layer", "a", "--out", tmp_path / "nope" / "z.npy")
    assert_one_line_error(rc, err, 1, ["does not exist"])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anywhere
            rc, _, err = cli("export", codes_file, "--layer", "a", "--out", ro / "z.npy")
            assert_one_line_error(rc, err, 1, ["not writable"])
    finally:
        ro.chmod(0o700)
    rc, _, err = cli("export", tmp_path / "missing.h5", "--layer", "a", "--out", tmp_path / "z.npy")
    assert_one_line_error(rc, err, 2, ["no such codes file"])
    assert not (tmp_path / "z.npy").exists()
