"""Entries assembled from part files (a distributed extraction's): the real shard journals, sealed
by `distributed.seal`, finalized by `store.finalize` with virtual datasets; read back through every
reader, moved, copied without the parts, damaged, listed and removed. The torchrun path itself is
tested in tests/engine/test_distributed.py."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import assert_one_line_error, cli
from featx.engine.distributed import (
    ShardSet,
    committed_shards,
    ordered_parts,
    seal,
    seal_plan,
    shard_dir,
    shard_meta,
)
from featx.store.cache import list_entries, remove_entries
from featx.store.codes import open_codes
from featx.store.export import export_layer
from featx.store.finalize import finalize
from featx.store.journal import Journal
from featx.store.parts import parts_path
from featx.store.verify import verify

N, DIMS = 30, (5, 3)
NAME = "d--m--0123456789abcdef.h5"


def _meta() -> dict:
    return {
        "key": "k",
        "layers": [["a", DIMS[0]], ["b", DIMS[1]]],
        "dtype": "float16",
        "samples": N,
        "batch_size": 4,
        "featx": "x",
    }


def _codes(i: int, k: int) -> np.ndarray:
    return (np.arange(i * DIMS[k], (i + 1) * DIMS[k]) % 1000).astype(np.float16).reshape(1, -1)


def _shards(entry: str, bounds=((0, 11), (11, 30)), skip=(4,)) -> dict:
    """Shard journals as ranks leave them: rows in sample order, sample 4 undecodable."""
    meta = _meta()
    for a, b in bounds:
        j = Journal.open(shard_dir(entry, a), shard_meta(meta, a, b))
        for i in range(a, b):
            if i in skip:
                j.append([np.empty((0, d), np.float16) for d in DIMS], np.arange(0), i + 1, [(i, "bad")])
            else:
                j.append([_codes(i, 0), _codes(i, 1)], np.array([i]), i + 1, [])
        j.close()
    return meta


def _finish(entry: str, meta: dict, virtual: bool, world: int = 2) -> None:
    shards = ShardSet(entry, meta, committed_shards(entry, meta), N)
    parts = None
    if virtual:
        plan = seal_plan(shards.shards, [[] for _ in range(world)], world)
        parts = ordered_parts([seal(entry, meta, mine) for mine in plan], shards.shards)
    finalize(
        entry,
        shards,
        classes=["x", "y"],
        labels=np.arange(N) % 2,
        splits=np.array(["train", "test"] * (N // 2)),
        ids=[f"i{k:03d}" for k in range(N)],
        layer_attrs={"a": {"kind": "conv"}},
        attrs={"layers": ["a", "b"]},
        parts=parts,
    )


@pytest.fixture
def pair(tmp_path):
    """(virtual entry, copied entry) of the same shards."""
    out = []
    for mode in ("virtual", "copy"):
        entry = str(tmp_path / mode / NAME)
        os.makedirs(os.path.dirname(entry))
        _finish(entry, _shards(entry), mode == "virtual")
        out.append(entry)
    return out


def _read(path) -> dict:
    with open_codes(path) as f:
        return {
            "codes": [f.codes(n) for n in f.layers],
            "some": f.codes("a", np.array([0, 7, 28])),
            "paths": f.paths,
            "skipped": f.skipped,
            "attrs": f.layer_attrs("a").get("kind"),
        }


def test_a_virtual_entry_reads_as_the_copied_one(pair):
    virtual, copied = pair
    with h5py.File(virtual) as f:
        assert f["codes/a"].is_virtual and f["codes/b"].is_virtual
        assert {m.file_name for m in f["codes/a"].virtual_sources()} == {
            f"{NAME}.parts/from-000000000000.h5",
            f"{NAME}.parts/from-000000000011.h5",
        }
    assert os.path.getsize(virtual) < os.path.getsize(copied)
    assert not os.path.exists(virtual + ".shards")  # removed once the entry is in place
    a, b = _read(virtual), _read(copied)
    for k in range(2):
        assert np.array_equal(a["codes"][k], b["codes"][k])
    assert np.array_equal(a["some"], b["some"]) and a["paths"] == b["paths"] and a["skipped"] == b["skipped"]
    assert a["attrs"] == "conv" and len(a["codes"][0]) == N - 1
    assert verify(virtual, full=True) is None


def test_a_moved_cache_dir_still_reads(pair, tmp_path):
    virtual, _ = pair
    moved = tmp_path / "elsewhere"
    shutil.move(os.path.dirname(virtual), moved)
    cwd = os.getcwd()
    try:
        os.chdir("/")  # relative sources resolve against the entry's folder, not the working directory
        assert verify(str(moved / NAME), full=True) is None
        assert len(_read(str(moved / NAME))["codes"][1]) == N - 1
    finally:
        os.chdir(cwd)


def test_the_entry_file_copied_alone_is_one_line_naming_the_missing_part(pair, tmp_path):
    virtual, _ = pair
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(virtual, alone / NAME)
    for argv in (("info", alone / NAME), ("cache", "verify", "--cache-dir", alone)):
        rc, _out, err = cli(*argv)
        assert_one_line_error(rc, err, code=1, needles=(f"{NAME}.parts/from-000000000000.h5", "missing"))
    rc, _out, err = cli("fit", alone / NAME)
    assert_one_line_error(rc, err, code=1, needles=("part file", "missing"))


def test_cache_verify_finds_a_damaged_part_even_when_a_check_is_remembered(pair):
    virtual, _ = pair
    cache = os.path.dirname(virtual)
    rc, out, err = cli("cache", "verify", "--cache-dir", cache)
    assert rc == 0 and out.strip() == f"ok {virtual}", err
    part = os.path.join(parts_path(virtual), "from-000000000011.h5")
    with h5py.File(part, "r+") as f:  # one code changed in place, its sha256 kept: bit rot
        f["codes/b"][3, 1] = 999
    rc, _out, err = cli("cache", "verify", "--cache-dir", cache)
    assert_one_line_error(rc, err, code=1, needles=("from-000000000011.h5", "layer b", "checksum"))
    assert verify(virtual) is not None  # the part's new fingerprint drops the remembered pass


def test_cache_ls_counts_and_rm_removes_the_part_files(pair):
    virtual, copied = pair
    cache = os.path.dirname(virtual)
    (e,) = list_entries(cache)
    parts = sum(
        os.path.getsize(os.path.join(parts_path(virtual), n)) for n in os.listdir(parts_path(virtual))
    )
    assert e.state == "complete" and e.size == os.path.getsize(virtual) + parts and e.detail["parts"] == 2
    removed, busy = remove_entries(cache, ["0123456789ab"])
    assert removed == [virtual] and not busy
    assert os.listdir(cache) == [".verified"] or not [n for n in os.listdir(cache) if not n.startswith(".")]


def test_export_h5_of_a_virtual_entry_is_a_self_contained_codes_file(pair, tmp_path):
    virtual, copied = pair
    out = str(tmp_path / "a.h5")
    export_layer(virtual, "a", out)
    shutil.rmtree(parts_path(virtual))  # the export does not depend on them
    assert verify(out, full=True) is None
    with open_codes(out) as f, open_codes(copied) as g:
        assert np.array_equal(f.codes("a"), g.codes("a"))


def test_an_assembly_killed_before_the_rename_resumes_reusing_sealed_parts(tmp_path):
    """Parts sealed, entry not written (a kill in rank 0's last step), a temporary left behind:
    the rerun reuses a part sealed from the same shard state and reseals one that is not."""
    entry = str(tmp_path / NAME)
    meta = _shards(entry)
    shards = ShardSet(entry, meta, committed_shards(entry, meta), N)
    seal(entry, meta, [[s.start, s.stop] for s in shards.shards])
    first, second = (os.path.join(parts_path(entry), f"from-{s:012d}.h5") for s in (0, 11))
    with h5py.File(second, "r+") as f:
        f.attrs["journal_checksum"] = "another shard state"
    open(first + ".tmp-12345", "wb").close()
    before = os.stat(first).st_ino
    assert not os.path.exists(entry) and [e.state for e in list_entries(str(tmp_path))] == ["partial"]
    from featx.store.cache import remove_stale_temporaries

    remove_stale_temporaries(entry)
    _finish(entry, meta, virtual=True)
    assert os.stat(first).st_ino == before  # reused
    with h5py.File(second) as f:
        assert f.attrs["journal_checksum"] != "another shard state"  # resealed
    assert not os.path.exists(first + ".tmp-12345")
    assert verify(entry, full=True) is None and len(_read(entry)["codes"][0]) == N - 1
