"""featx.store.cache: the entry protocol (find, lock, verify, set aside, remember), listing and removing
entries, and what `extract`, `info`, `cache ls` and `cache rm` do with damaged entries and journals.

Real extraction (random-init resnet18 at 32 px) on tiny generated folders; damage is done to the
files on disk the way a disk or a person does it. The journal property test garbles a real
partial entry with random bytes, random JSON values and truncations, then reruns `extract`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FAST_ARGS, cli, make_images, write_codes
from featx.store.cache import CacheEntry, EntryLock, list_entries, remove_entries
from featx.store.codes import open_codes
from featx.store.verify import mark_verified

LAYERS = "layer3,avgpool"


def one_line_error(rc, err: str, code: int, needles=()) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().split("\n") if ln.strip()]
    assert rc == code and len(lines) == 1 and lines[0].startswith("featx"), (rc, err)
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def rows_of(path) -> dict:
    with open_codes(str(path)) as f:
        return {
            "paths": list(f.paths),
            "labels": f.labels.copy(),
            "classes": list(f.classes),
            "split": f.split.copy(),
            "codes": {n: f.codes(n) for n in f.layers},
        }


def assert_rows_equal(got: dict, want: dict) -> None:
    assert got["paths"] == want["paths"] and got["classes"] == want["classes"]
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_array_equal(got["split"], want["split"])
    assert got["codes"].keys() == want["codes"].keys()
    for n in want["codes"]:
        assert np.array_equal(got["codes"][n], want["codes"][n]), n


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """13 images, the 11th undecodable; a reference entry, and a partial entry of 8 committed rows
    (`--strict` stops at the bad image) that the same command without --strict resumes."""
    root = tmp_path_factory.mktemp("cache")
    data = make_images(root / "data", per_class=4, size=(36, 36))
    (data / "owl" / "owl_001x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    args = ["extract", *FAST_ARGS, "--data", data, "--layers", LAYERS]
    rc, out, err = cli("-q", *args, "--cache-dir", root / "ref")
    assert rc == 0, err
    ref = out.strip().splitlines()[-1]
    rc, out, err = cli("-q", *args, "--strict", "--cache-dir", root / "partial")
    assert rc == 1 and "--strict" in err, err
    name = os.path.basename(ref)
    assert json.loads((root / "partial" / f"{name}.partial" / "progress.json").read_text())["rows_done"] == 8
    return {"root": root, "args": args, "ref": ref, "name": name, "rows": rows_of(ref)}


def fresh_cache(world, which: str = "ref") -> Path:
    cache = Path(tempfile.mkdtemp(dir=world["root"], prefix="c-"))
    shutil.copytree(world["root"] / which, cache, dirs_exist_ok=True)
    return cache


def test_entry_protocol_finds_remembers_and_sets_aside(tmp_path, caplog):
    path = write_codes(
        tmp_path / "d--m--0123456789abcdef.h5",
        {"a": np.ones((4, 2))},
        [0, 1, 0, 1],
        ["train"] * 4,
        ["x", "y"],
    )
    key = "0123456789abcdef" * 4
    with h5py.File(path, "r+") as f:
        f.attrs["cache_key"] = key
    entry = CacheEntry(str(tmp_path), "req1")
    assert not entry.remembered()
    assert entry.find("d", "m", key) and entry.path == path
    again = CacheEntry(str(tmp_path), "req1")
    assert again.remembered() and again.path == path
    with h5py.File(path, "r+") as f:
        del f["codes/a"]
    assert not CacheEntry(str(tmp_path), "req1").remembered()
    entry = CacheEntry(str(tmp_path), "req1")
    assert not entry.find("d", "m", key)
    with caplog.at_level(logging.WARNING, "featx"), entry.locked():
        assert not entry.ready()
        assert not entry.ready()  # nothing left to set aside: no second warning
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "d--m--0123456789abcdef.h5.corrupt" in warnings[0], warnings
    assert not os.path.exists(path) and os.path.isfile(path + ".corrupt")


@pytest.mark.parametrize("how", ["delete-layer", "codes-byte-mtime-kept"])
def test_damaged_entry_is_listed_corrupt_then_set_aside_and_rebuilt(world, how):
    cache = fresh_cache(world)
    entry = str(cache / world["name"])
    assert cli("-q", *world["args"], "--cache-dir", cache)[0] == 0  # remembered as verified, memo written
    if how == "delete-layer":
        with h5py.File(entry, "r+") as f:
            del f["codes/layer3"]
    else:
        st = os.stat(entry)
        with h5py.File(entry, "r") as f:
            info = f["codes/layer3"].id.get_chunk_info(0)
        with open(entry, "r+b") as fh:
            fh.seek(info.byte_offset + info.size // 2)
            b = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([b[0] ^ 0x10]))
        os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
    rc, out, err = cli("cache", "ls", "--cache-dir", cache)
    assert rc == 0 and "Traceback" not in err
    line = next(ln for ln in out.splitlines() if ln.startswith(world["name"] + " "))
    assert " corrupt " in line, out
    one_line_error(*cli("info", entry)[::2], 1, [entry])

    rc, out, err = cli(*world["args"], "--cache-dir", cache)
    assert rc == 0 and out.strip().splitlines()[-1] == entry, err
    assert "cache hit" not in err and err.count("set it aside as") == 1, err
    assert f"{world['name']}.corrupt" in err and "not usable" in err, err
    assert_rows_equal(rows_of(entry), world["rows"])
    rc, out, err = cli("cache", "ls", "--cache-dir", cache)
    assert any(ln.startswith(world["name"] + " ") and " complete " in ln for ln in out.splitlines()), out
    assert any(ln.startswith(world["name"] + ".corrupt") and "set aside" in ln for ln in out.splitlines()), (
        out
    )
    rc, out, err = cli(*world["args"], "--cache-dir", cache)
    assert rc == 0 and "cache hit" in err, err


def test_a_failed_codes_read_heals_the_entry_on_the_next_extract(world):
    """Damage invisible to stat (the remembered check matches): `fit` reports it, and the next
    `extract` no longer trusts the remembered check, so the entry is set aside and rebuilt."""
    cache = fresh_cache(world)
    entry = str(cache / world["name"])
    with h5py.File(entry, "r") as f:
        info = f["codes/avgpool"].id.get_chunk_info(0)
    with open(entry, "r+b") as fh:
        fh.seek(info.byte_offset + 3)
        fh.write(b"\x00\x01\x02\x03")
    mark_verified(entry)
    rc, out, err = cli(*world["args"], "--cache-dir", cache)
    assert rc == 0 and "cache hit" in err  # nothing on disk says it is damaged yet
    one_line_error(*cli("fit", entry, "--layers", "avgpool", "--C", "1")[::2], 1, ["damaged"])
    rc, out, err = cli(*world["args"], "--cache-dir", cache)
    assert rc == 0 and "cache hit" not in err and "set it aside" in err, err
    assert_rows_equal(rows_of(entry), world["rows"])


def test_entry_whose_memo_and_marker_are_gone_is_still_a_hit(world):
    cache = fresh_cache(world)
    shutil.rmtree(cache / ".verified", ignore_errors=True)
    shutil.rmtree(cache / ".requests", ignore_errors=True)
    rc, out, err = cli(*world["args"], "--cache-dir", cache)
    assert rc == 0 and "cache hit" in err, err


def test_info_on_a_partial_entry_and_its_journal(world):
    cache = fresh_cache(world, "partial")
    entry = str(cache / world["name"])
    for name in (entry, entry + ".partial", entry + ".partial/"):
        rc, out, err = cli("info", name)
        assert rc == 0 and "partial entry: 8 of 13 images done (8 rows)" in out, (name, out, err)
    Path(entry + ".partial", "progress.json").write_text("[1, 2]")
    line = one_line_error(*cli("info", entry + ".partial")[::2], 2, [entry])
    assert "cannot be resumed" in line and "progress.json" in line, line


def test_cache_rm_all_removes_what_it_can_and_names_the_busy_entry(world, tmp_path):
    cache = fresh_cache(world, "partial")
    shutil.copy(world["ref"], cache)
    other = write_codes(
        cache / "x--y--00000000aaaaaaaa.h5", {"a": np.ones((2, 2))}, [0, 1], ["train"] * 2, ["p", "q"]
    )
    Path(cache / "z--y--00000000bbbbbbbb.h5").write_bytes(b"garbage")
    busy = str(cache / world["name"])
    with EntryLock(busy):
        rc, out, err = cli("cache", "rm", "--all", "--cache-dir", cache)
        one_line_error(
            rc, err, 1, ["removed 2 entries", "x--y--00000000aaaaaaaa.h5", "z--y--", "kept 1", busy]
        )
        assert not os.path.exists(other) and os.path.exists(busy) and os.path.isdir(busy + ".partial")
        assert f"removed {other}" in out, out
    rc, out, err = cli("cache", "rm", "--all", "--cache-dir", cache)
    assert rc == 0 and f"removed {busy}" in out, err
    assert list_entries(str(cache)) == []


@pytest.mark.parametrize("record", ["{}", "[1, 2]", '"abc"', "null", '{"rows_done": [], "samples_done": {}}'])
def test_progress_record_of_the_wrong_shape_breaks_no_cache_command(world, record):
    cache = fresh_cache(world, "partial")
    shutil.copy(world["ref"], cache / "other--x--0000000000000000.h5")
    entry = str(cache / world["name"])
    Path(entry + ".partial", "progress.json").write_text(record)
    rc, out, err = cli("cache", "ls", "--cache-dir", cache)
    assert rc == 0 and "Traceback" not in err, err
    line = next(ln for ln in out.splitlines() if ln.startswith(world["name"]))
    assert "corrupt" in line and "progress.json" in line, line
    one_line_error(*cli("info", entry)[::2], 2, [entry])
    rc, out, err = cli(*world["args"], "--cache-dir", cache)
    assert rc == 0 and err.count("set it aside") == 1 and "Traceback" not in err, err
    assert_rows_equal(rows_of(entry), world["rows"])
    removed, busy = remove_entries(str(cache), [], remove_all=True)
    assert busy == [] and len(removed) == 3 and list_entries(str(cache)) == []  # + the set-aside journal


# -- the journal property test ---------------------------------------------------------------------

JOURNAL_FILES = ["meta.json", "progress.json", "index.bin", "rows.0.bin", "rows.1.bin"]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = [
    "rows_done",
    "samples_done",
    "skipped",
    "crc32",
    "checksum",
    "meta",
    "key",
    "layers",
    "dtype",
    "samples",
    "batch_size",
    "journal",
]
GARBLE = st.tuples(
    st.sampled_from(JOURNAL_FILES),
    st.one_of(
        st.tuples(st.just("bytes"), st.floats(0, 1), st.binary(min_size=1, max_size=24)),
        st.tuples(st.just("json"), JSON),
        st.tuples(st.just("field"), st.sampled_from(FIELDS), JSON),
        st.tuples(st.just("int64"), st.floats(0, 1), st.integers(-(2**63), 2**63 - 1)),
        st.tuples(st.just("truncate"), st.floats(0, 1)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=24)),
    ),
)


def _garble(journal: Path, name: str, action: tuple) -> None:
    p = journal / name
    data = bytearray(p.read_bytes()) if p.exists() else bytearray()
    kind = action[0]
    if kind == "bytes" and data:
        at = min(int(action[1] * len(data)), len(data) - 1)
        data[at : at + len(action[2])] = action[2]
    elif kind == "json":
        data = bytearray(json.dumps(action[1]).encode())
    elif kind == "field":
        try:
            obj = json.loads(data)
        except ValueError:
            obj = {}
        if isinstance(obj, dict):
            obj[action[1]] = action[2]
        data = bytearray(json.dumps(obj).encode())
    elif kind == "int64" and len(data) >= 8:  # one whole value, e.g. an in-range sample index
        at = min(int(action[1] * (len(data) // 8)), len(data) // 8 - 1) * 8
        data[at : at + 8] = np.int64(action[2]).tobytes()
    elif kind == "truncate":
        data = data[: int(action[1] * len(data))]
    elif kind == "append":
        data += action[1]
    p.write_bytes(bytes(data))


def _check_garbled_journal(world, garbles) -> None:
    cache = fresh_cache(world, "partial")
    entry = str(cache / world["name"])
    journal = Path(entry + ".partial")
    for name, action in garbles:
        _garble(journal, name, action)
    for argv in (["cache", "ls", "--cache-dir", cache], ["info", entry], ["info", str(journal)]):
        rc, out, err = cli(*argv)
        assert rc in (0, 2) and "Traceback" not in err, (argv, rc, err)
    copy = Path(str(cache) + "-rm")
    shutil.copytree(cache, copy)
    rc, out, err = cli("cache", "rm", "--all", "--cache-dir", copy)
    assert rc == 0 and list_entries(str(copy)) == [], (rc, err)
    rc, out, err = cli(*world["args"], "--cache-dir", cache)
    if rc == 0:
        assert out.strip().splitlines()[-1] == entry and "Traceback" not in err, err
        assert err.count("set it aside") <= 1, err
        assert_rows_equal(rows_of(entry), world["rows"])
    else:
        one_line_error(rc, err, 1)
    shutil.rmtree(cache)
    shutil.rmtree(copy)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(garbles=st.lists(GARBLE, min_size=1, max_size=3))
def test_garbled_journal_gives_the_reference_codes_or_one_line(world, garbles):
    _check_garbled_journal(world, garbles)


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbles=st.lists(GARBLE, min_size=1, max_size=4))
def test_garbled_journal_gives_the_reference_codes_or_one_line_long(world, garbles):
    _check_garbled_journal(world, garbles)
