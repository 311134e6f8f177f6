"""featx.store: what `verify` checks on every open, what it remembers, and the journal's checks.

Files are written by featx's own journal + finalize (conftest.write_codes) and damaged the way a
disk or a person would damage them: bytes rewritten in place with the mtime restored, a dataset
deleted, a journal file garbled. Nothing of featx is mocked.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import write_codes
from featx.errors import FeatxError
from featx.store.codes import open_codes
from featx.store.journal import Journal, journal_problem, read_progress
from featx.store.verify import mark_verified, verify

CLASSES = ["zebra", "koala", "otter"]


@pytest.fixture
def codes_file(tmp_path) -> str:
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    layers = {
        "a": rng.normal(size=(30, 8)).astype(np.float32),
        "b": rng.normal(size=(30, 4)).astype(np.float32),
    }
    return write_codes(tmp_path / "x.h5", layers, labels, ["train"] * 20 + ["test"] * 10, CLASSES)


def _rewrite_in_place(path: str, edit) -> None:
    """Change bytes of `path` in place and put its mtime back, as silent disk corruption does."""
    st = os.stat(path)
    data = bytearray(Path(path).read_bytes())
    edit(data)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.path.getsize(path) == st.st_size


def _swap_class_names(data: bytearray) -> None:
    a, b = data.index(b"zebra"), data.index(b"koala")
    data[a : a + 5], data[b : b + 5] = b"koala", b"zebra"


def _flip_codes_byte(path: str, layer: str = "a"):
    with h5py.File(path, "r") as f:
        info = f[f"codes/{layer}"].id.get_chunk_info(0)

    def edit(data: bytearray) -> None:
        data[info.byte_offset + info.size // 2] ^= 0x01

    return edit


def test_fresh_file_verifies_and_is_remembered(codes_file):
    assert verify(codes_file) is None
    assert os.path.isfile(os.path.join(os.path.dirname(codes_file), ".verified", "x.h5.json"))
    assert verify(codes_file) is None


def test_deleted_codes_dataset_is_damage_not_a_contradiction(codes_file):
    assert verify(codes_file) is None  # remembered: the deletion must still be seen
    with h5py.File(codes_file, "r+") as f:
        del f["codes/a"]
    assert verify(codes_file) == "/codes/a is missing (the file lists layers a, b)"
    with pytest.raises(FeatxError, match="/codes/a is missing") as e:
        open_codes(codes_file)
    assert "it holds" not in str(e.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda f: f.attrs.__setitem__("rows", "many"), "rows attribute"),
        (lambda f: f.attrs.__setitem__("layers", 5), "layers attribute"),
        (lambda f: f.__delitem__("classes"), "/classes is missing"),
        (lambda f: f.__delitem__("skipped"), "/skipped/paths is missing"),
        (
            lambda f: (f["codes"].__delitem__("b"), f["codes"].create_dataset("b", data=np.zeros((29, 4)))),
            "(30, D)",
        ),
    ],
)
def test_structure_problems_are_named(codes_file, edit, needle):
    with h5py.File(codes_file, "r+") as f:
        edit(f)
    reason = verify(codes_file)
    assert reason is not None and needle in reason, reason


def test_bit_rot_in_classes_is_caught_on_every_open(codes_file):
    """Item 4: class names swapped in place, mtime kept, and even the remembered check matching
    the damaged file (disk corruption leaves no trace in stat): the per-row checksum is still
    verified on every open."""
    with open_codes(codes_file) as f:
        assert f.classes == CLASSES
    _rewrite_in_place(codes_file, _swap_class_names)
    mark_verified(codes_file)  # the remembered codes check now matches the rotten file exactly
    with pytest.raises(FeatxError, match="class names do not match their checksum"):
        open_codes(codes_file)


def test_file_rewritten_with_mtime_restored_is_checked_again(codes_file):
    """The remembered check keys on ctime too, which no user-space tool can set back."""
    assert verify(codes_file) is None
    _rewrite_in_place(codes_file, _flip_codes_byte(codes_file))
    reason = verify(codes_file)
    assert reason is not None and "it is damaged: reading it failed" in reason, reason


def test_a_codes_read_that_fails_its_chunk_checksum_drops_the_remembered_check(codes_file):
    _rewrite_in_place(codes_file, _flip_codes_byte(codes_file))
    mark_verified(codes_file)  # damage invisible to stat: the remembered shortcut still holds
    assert verify(codes_file) is None
    with open_codes(codes_file) as f, pytest.raises(FeatxError, match="the file is damaged"):
        f.codes("a")
    reason = verify(codes_file)  # now read in full: the damage is found
    assert reason is not None and "filter returned failure" in reason, reason


# -- the journal ---------------------------------------------------------------------------------

META = {"key": "k1", "layers": [["a", 3], ["b", 2]], "dtype": "float32", "samples": 10, "batch_size": 2}


def _batch(start: int, n: int = 2):
    idx = np.arange(start, start + n)
    return [np.full((n, 3), idx[:, None] + 0.5, np.float32), np.full((n, 2), -idx[:, None], np.float32)], idx


def _journal(tmp_path, batches: int = 3) -> str:
    path = str(tmp_path / "e.h5.partial")
    j = Journal.open(path, META)
    for b in range(batches):
        codes, idx = _batch(2 * b)
        j.append(codes, idx, 2 * b + 2, [])
    j.close()
    return path


def test_journal_resumes_with_every_committed_row(tmp_path, caplog):
    path = _journal(tmp_path)
    with open(os.path.join(path, "rows.0.bin"), "ab") as f:
        f.write(b"torn write beyond the committed rows")
    with caplog.at_level(logging.WARNING, "featx"):
        j = Journal.open(path, META)
    assert caplog.records == []
    assert j.resumed and (j.rows_done, j.samples_done) == (6, 6)
    np.testing.assert_array_equal(j.read_index(), np.arange(6))
    np.testing.assert_array_equal(j.read_layer(0, 0, 6), _batch(0, 6)[0][0])
    codes, idx = _batch(6)
    j.append(codes, idx, 9, [(8, "bad image")])
    j.close()
    prog = read_progress(path[: -len(".partial")])
    assert (prog["rows_done"], prog["samples_done"], prog["skipped"]) == (8, 9, [[8, "bad image"]])
    assert Journal.open(path, META).rows_done == 8


def _set_index(path: str, row: int, value: int) -> None:
    with open(os.path.join(path, "index.bin"), "r+b") as f:
        f.seek(8 * row)
        f.write(np.int64(value).tobytes())


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: _set_index(p, 1, 4),  # in range and in order-ish: another image's row
        lambda p: _set_index(p, 2, -7590679900516876992),
        lambda p: Path(p, "rows.1.bin").write_bytes(b"\x00" * os.path.getsize(Path(p, "rows.1.bin"))),
        lambda p: os.truncate(Path(p, "index.bin"), 20),
        lambda p: Path(p, "meta.json").write_text("[1, 2]"),
    ],
)
def test_damaged_journal_is_set_aside_with_one_warning_and_restarted(tmp_path, caplog, damage):
    path = _journal(tmp_path)
    damage(path)
    with caplog.at_level(logging.WARNING, "featx"):
        j = Journal.open(path, META)
    assert (j.rows_done, j.samples_done, j.resumed) == (0, 0, False)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"set it aside as {path}.corrupt" in warnings[0], warnings
    assert os.path.isdir(path + ".corrupt") and os.path.isdir(path)
    j.close()


@pytest.mark.parametrize(
    "record",
    [{}, [1, 2], "abc", None, 7, {"rows_done": "x"}, {"rows_done": 4, "samples_done": 2, "checksum": "0"}],
)
def test_progress_record_of_the_wrong_shape_is_rejected_not_a_traceback(tmp_path, caplog, record):
    path = _journal(tmp_path)
    Path(path, "progress.json").write_text(json.dumps(record))
    entry = path[: -len(".partial")]
    assert read_progress(entry) is None
    assert "progress.json" in journal_problem(entry)
    with caplog.at_level(logging.WARNING, "featx"):
        assert Journal.open(path, META).rows_done == 0
    assert len(caplog.records) == 1


def test_hand_edited_progress_fails_its_own_checksum(tmp_path):
    path = _journal(tmp_path)
    prog = json.loads(Path(path, "progress.json").read_text())
    prog["skipped"] = [[5, "edited"]]
    Path(path, "progress.json").write_text(json.dumps(prog))
    assert journal_problem(path[: -len(".partial")]) == "progress.json does not match its checksum"


def test_journal_of_another_configuration_or_release_is_discarded_quietly(tmp_path, caplog):
    path = _journal(tmp_path)
    with caplog.at_level(logging.WARNING, "featx"):
        assert Journal.open(path, {**META, "batch_size": 4}).rows_done == 0
        meta = json.loads(Path(path, "meta.json").read_text())
        del meta["journal"]  # a journal written before its format was versioned
        Path(path, "meta.json").write_text(json.dumps(meta))
        assert Journal.open(path, {**META, "batch_size": 4}).rows_done == 0
    assert caplog.records == [] and not os.path.exists(path + ".corrupt")


def test_non_ascii_names_verify_on_every_open(tmp_path):
    path = write_codes(tmp_path / "u.h5", {"a": np.ones((3, 2))}, [0, 1, 1], ["train"] * 3, ["çå", "日本"])
    for _ in range(2):  # the first open reads the codes, the second only the structure and rows
        with open_codes(path) as f:
            assert f.classes == ["çå", "日本"]


def test_read_rows_equals_point_selection_dense_and_sparse(tmp_path):
    """store._read_rows (block reads for dense selections, point selection for sparse ones) gives
    exactly h5py's ds[idx], across block edges and for an empty selection."""
    import h5py

    from featx.store.codes import READ_BLOCK_ROWS, read_rows

    n = 2 * READ_BLOCK_ROWS + 37
    data = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        ds = f.create_dataset("c", data=data, chunks=(64, 3))
        rng = np.random.default_rng(0)
        for k in (0, 5, 300, n // 2, n):  # sparse (point selection) to dense (block reads)
            idx = np.sort(rng.choice(n, k, replace=False))
            got = read_rows(ds, idx)
            assert got.shape == (k, 3) and np.array_equal(got, data[idx])
