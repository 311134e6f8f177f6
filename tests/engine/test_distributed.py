"""Distributed extraction with real processes: `python -m torch.distributed.run` (torchrun) on the
CPU with gloo, and ranks started by hand with the env:// variables (what srun-style launchers do,
and the only way to crash or kill one rank without torchrun's agent stopping the rest at once).

Nothing of featx is mocked: a rank "crashes at start-up" because it is given data it cannot read,
and a rank "cannot see the others' shards" because it is given another cache directory.
FEATX_DIST_TIMEOUT is small here so a dead rank is reported within seconds.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import FAST_ARGS, REPO, assert_one_line_error, cli, make_images
from featx.engine.distributed import (
    Shard,
    ShardSet,
    assign,
    committed_shards,
    row_slice,
    shard_dir,
    shard_meta,
)
from featx.store.codes import open_codes
from featx.store.journal import Journal

TIMEOUT = "12"  # FEATX_DIST_TIMEOUT for the job's waits


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHELASTIC", "RANK", "WORLD_SIZE"))}
    for k in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["FEATX_DIST_TIMEOUT"] = TIMEOUT
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def torchrun(nproc: int, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(_free_port()),
        "-m",
        "featx",
        "extract",
        *map(str, args),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(per_rank_args: list[list], timeout: str = TIMEOUT) -> list[subprocess.Popen]:
    """World-size-len(per_rank_args) ranks of `featx extract`, started by hand (env:// rendezvous)."""
    port, size = str(_free_port()), len(per_rank_args)
    procs = []
    for rank, args in enumerate(per_rank_args):
        env = _env(
            FEATX_DIST_TIMEOUT=timeout,
            RANK=str(rank),
            WORLD_SIZE=str(size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "featx", "extract", *map(str, args)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def snapshot(path) -> dict:
    with open_codes(str(path)) as f:
        return {
            "paths": list(f.paths),
            "labels": np.array(f.labels),
            "split": np.array(f.split),
            "classes": list(f.classes),
            "skipped": list(f.skipped),
            "layers": list(f.layers),
            "codes": {n: f.codes(n) for n in f.layers},
            "rows": int(f.attrs["rows"]),
        }


# The documented tolerance of distributed codes against one process's (fp32 on the CPU): a row that falls
# into a batch of another shape (a rank's last batch, a batch of one) may differ in its last bits, as the
# CPU kernels choose their summation order by batch shape (measured: up to 1.7e-6); other rows are identical.
DIST_TOL = 1e-5


def assert_same(a: dict, b: dict, exact: bool = True) -> None:
    for k in ("paths", "classes", "skipped", "layers", "rows"):
        assert a[k] == b[k], k
    assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["split"], b["split"])
    for name in a["codes"]:
        if exact:  # same batch shapes for every row: bit-identical
            assert np.array_equal(a["codes"][name], b["codes"][name]), name
        else:
            np.testing.assert_allclose(
                a["codes"][name], b["codes"][name], rtol=DIST_TOL, atol=DIST_TOL, err_msg=name
            )


def reference(data, tmp_path, args) -> dict:
    rc, out, err = cli("extract", *args, "--data", data, "--cache-dir", tmp_path / "ref", "-q")
    assert rc == 0, err
    return snapshot(out.strip().splitlines()[-1])


def _with_bad_image(root):
    (root / "dog" / "dog_002b.jpg").write_bytes(
        b"not a jpeg"
    )  # in rank 1's slice, so /skipped comes from a shard
    return root


@pytest.fixture(scope="module")
def uneven_folder(tmp_path_factory):
    """3 classes x 5 images + one undecodable: 16 samples, 15 rows (odd: 7 + 8 over two ranks)."""
    return _with_bad_image(make_images(tmp_path_factory.mktemp("dist") / "uneven"))


# -- pure functions ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,w", [(0, 1), (1, 2), (15, 2), (16, 3), (1000, 7), (5, 8)])
def test_row_slices_are_contiguous_and_cover_each_row_once(n, w):
    slices = [row_slice(n, w, r) for r in range(w)]
    rows = [i for a, b in slices for i in range(a, b)]
    assert rows == list(range(n))  # no padding, no duplicates, in rank order
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1


def test_assign_computes_only_missing_rows_and_resumes_the_shard_that_ends_there():
    n = 20
    # world 2 was killed: rank 0 committed [0, 4) of [0, 10), rank 1 [10, 17) of [10, 20)
    shards = [Shard("a", 0, 10, 4), Shard("b", 10, 20, 17)]
    # a journal range (start, stop) names the shard to open: (0, 10) resumes shard a at row 4
    assert assign("e", shards, n, 1) == [[(0, 10), (10, 20)]]  # world 1: the gaps [4,10) [17,20), resumed
    assert assign("e", shards, n, 2) == [[(0, 10)], [(10, 20)]]  # same world: both shards resume
    three = assign("e", shards, n, 3)  # slices [0,6) [6,13) [13,20): gaps [4,6) [6,10) [17,20)
    assert three == [[(4, 6)], [(6, 10)], [(10, 20)]]
    assert assign("e", [Shard("a", 0, 20, 20)], n, 4) == [[], [], [], []]


def _write_shard(entry, meta, start, stop, upto):
    j = Journal.open(shard_dir(entry, start), shard_meta(meta, start, stop))
    for i in range(j.samples_done or start, upto, 2):
        j.append([np.full((2, 3), i, np.float32)], np.arange(i, i + 2), i + 2, [])
    j.close()


def test_shards_are_checked_like_journals_and_read_back_in_row_order(tmp_path):
    entry = str(tmp_path / "e.h5")
    meta = {
        "key": "k",
        "layers": [["l", 3]],
        "dtype": "float32",
        "samples": 12,
        "batch_size": 2,
        "featx": "x",
    }
    _write_shard(entry, meta, 0, 6, 4)
    _write_shard(entry, meta, 6, 12, 10)
    _write_shard(entry, {**meta, "key": "other"}, 2, 4, 4)  # another configuration's shard: dropped
    assert [(s.start, s.stop, s.done) for s in committed_shards(entry, meta)] == [(0, 6, 4), (6, 12, 10)]
    with open(os.path.join(shard_dir(entry, 6), "rows.0.bin"), "r+b") as f:
        f.write(b"\xff" * 8)  # garble a committed row: that shard is set aside and counts as empty
    shards = committed_shards(entry, meta)
    assert [(s.start, s.done) for s in shards] == [(0, 4), (6, 6)]
    assert os.path.isdir(shard_dir(entry, 6) + ".corrupt") and not os.path.isdir(shard_dir(entry, 2))
    assert assign(entry, shards, 12, 1) == [[(4, 12)]]  # the gap [4, 12) as one new shard
    assert assign(entry, shards, 12, 2) == [[(0, 6)], [(6, 12)]]  # world 2: each resumes its own
    _write_shard(entry, meta, 4, 12, 12)
    whole = ShardSet(entry, meta, committed_shards(entry, meta), 12)
    assert whole.rows_done == 12 and whole.read_index().tolist() == list(range(12))
    assert whole.read_layer(0, 3, 9)[:, 0].tolist() == [2, 4, 4, 6, 6, 8]  # rows 3..8 across the two shards


def test_cache_ls_and_rm_see_an_interrupted_distributed_entry(tmp_path):
    """Shards alone (a torchrun extraction killed before finalize) list as a partial entry with the
    images done over all shards, and `cache rm` removes them."""
    from featx.store.cache import list_entries, remove_entries

    entry = str(tmp_path / "d--resnet18--0123456789abcdef.h5")
    meta = {
        "key": "k",
        "layers": [["l", 3]],
        "dtype": "float32",
        "samples": 12,
        "batch_size": 2,
        "featx": "x",
    }
    _write_shard(entry, meta, 0, 6, 4)
    _write_shard(entry, meta, 6, 12, 10)
    (e,) = list_entries(str(tmp_path))
    assert (e.path, e.state, e.detail["samples_done"], e.detail["samples"], e.detail["shards"]) == (
        entry,
        "partial",
        8,
        12,
        2,
    )
    assert e.size > 0
    removed, busy = remove_entries(str(tmp_path), ["0123456789ab"])
    assert removed == [entry] and not busy and not os.path.exists(entry + ".shards")
    assert list_entries(str(tmp_path)) == []


# -- real processes ------------------------------------------------------------------------------


def test_two_ranks_write_the_file_one_process_writes(uneven_folder, tmp_path):
    """torchrun --nproc-per-node 2, 15 rows: the same file name, codes, labels, paths, splits and
    skipped list as one process; the path is the only stdout line."""
    ref = reference(uneven_folder, tmp_path, FAST_ARGS)
    r = torchrun(2, *FAST_ARGS, "--data", uneven_folder, "--cache-dir", tmp_path / "c", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # rank 1 prints nothing on stdout
    path = lines[0]
    assert os.path.basename(path) == os.path.basename(glob.glob(str(tmp_path / "ref" / "*.h5"))[0])
    got = snapshot(path)
    assert_same(got, ref)
    assert got["skipped"] and got["rows"] == 15
    assert not os.path.exists(path + ".shards")  # assembled, then removed
    # the codes stay in the ranks' part files, which the entry references (virtual datasets)
    parts = sorted(os.listdir(path + ".parts"))
    assert parts == ["from-000000000000.h5", "from-000000000008.h5"], parts
    # an ordinary entry: a one-process run of the same command is a cache hit on it
    rc, out, err = cli("extract", *FAST_ARGS, "--data", uneven_folder, "--cache-dir", tmp_path / "c", "-q")
    assert rc == 0 and out.strip().splitlines()[-1] == path, err
    rc, out, err = cli("cache", "verify", "--cache-dir", tmp_path / "c")
    assert rc == 0 and out.strip() == f"ok {path}", err
    os.remove(os.path.join(path + ".parts", parts[1]))
    rc, out, err = cli("cache", "verify", "--cache-dir", tmp_path / "c")
    assert_one_line_error(rc, err, code=1, needles=(parts[1], "missing"))
    rc, out, err = cli("cache", "rm", "--cache-dir", tmp_path / "c", "--all")
    assert rc == 0 and not os.path.exists(path) and not os.path.exists(path + ".parts"), err


def test_rows_in_a_batch_of_another_shape_are_within_the_documented_tolerance(uneven_folder, tmp_path):
    """--batch-size 6 over 15 rows: one process batches 6+6+3, rank 0 (rows 0-6) 6+1: row 6 is a batch
    of one there. Those rows may differ in the last bits (docs/distributed.md), never by more than DIST_TOL."""
    args = [a if a != "4" else "6" for a in FAST_ARGS]
    assert "--batch-size" in args and args[args.index("--batch-size") + 1] == "6"
    ref = reference(uneven_folder, tmp_path, args)
    r = torchrun(2, *args, "--data", uneven_folder, "--cache-dir", tmp_path / "c", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    got = snapshot(r.stdout.strip().splitlines()[-1])
    assert_same(got, ref, exact=False)
    for name in got["codes"]:  # rows 0-5 share their batch shape (6) in both runs: identical
        assert np.array_equal(got["codes"][name][:6], ref["codes"][name][:6]), name


def test_a_rank_failing_at_start_up_fails_the_job_within_the_timeout(uneven_folder, tmp_path):
    args = [*FAST_ARGS, "--cache-dir", tmp_path / "c", "-q"]
    t = time.monotonic()
    procs = start_ranks(
        [[*args, "--data", uneven_folder], [*args, "--data", tmp_path / "missing"]], timeout="5"
    )
    outs = [p.communicate(timeout=5 + 90) for p in procs]
    took = time.monotonic() - t
    assert procs[1].returncode == 2 and "missing" in outs[1][1]  # its own one-line usage error
    assert procs[0].returncode == 1, outs[0][1]
    err = outs[0][1].strip().splitlines()
    assert "Traceback" not in outs[0][1]
    assert len(err) == 1 and "did not all join" in err[0] and "FEATX_DIST_TIMEOUT" in err[0], err
    assert outs[0][0] == ""  # no path reported
    assert took < 5 + 60  # the timeout, plus two interpreters importing torch on a loaded machine


@pytest.mark.slow
def test_ranks_that_do_not_share_the_cache_dir_fail_with_one_line(uneven_folder, tmp_path):
    args = [*FAST_ARGS, "--data", uneven_folder, "-q"]
    procs = start_ranks([[*args, "--cache-dir", tmp_path / "a"], [*args, "--cache-dir", tmp_path / "b"]])
    outs = [p.communicate(timeout=float(TIMEOUT) + 90) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 1 and out == "", err
        lines = [ln for ln in err.strip().splitlines() if "featx: error" in ln]
        assert len(lines) == 1 and "cannot see the files rank" in lines[0] and "shared" in lines[0], err
        assert "Traceback" not in err
    assert not glob.glob(str(tmp_path / "*" / "*.h5"))


def test_distributed_flag_outside_torchrun_is_a_usage_error(uneven_folder, tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    rc, out, err = cli(
        "extract", *FAST_ARGS, "--data", uneven_folder, "--cache-dir", tmp_path, "--distributed"
    )
    assert rc == 2 and "--distributed" in err and "torchrun" in err and "Traceback" not in err


def _shard_rows(cache) -> dict[str, int]:
    """Committed rows per shard folder (progress.json is replaced atomically)."""
    out = {}
    for p in glob.glob(str(cache / "*.shards" / "from-*" / "progress.json")):
        try:
            with open(p, encoding="utf-8") as f:
                out[os.path.basename(os.path.dirname(p))] = json.load(f)["rows_done"]
        except (OSError, ValueError):
            pass
    return out


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_named_and_reruns_with_one_or_two_ranks_finish_the_same_file(tmp_path):
    data = make_images(tmp_path / "data", per_class=14, size=(64, 64))  # 42 rows
    ref = reference(data, tmp_path, [*FAST_ARGS, "--batch-size", "1", "--image-size", "64"])
    args = [*FAST_ARGS, "--batch-size", "1", "--image-size", "64", "--data", data, "-q"]
    cache = tmp_path / "c"
    procs = start_ranks([[*args, "--cache-dir", cache]] * 2)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and procs[1].poll() is None:
        rows = _shard_rows(cache)
        if len(rows) == 2 and min(rows.values()) >= 3:
            break
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)  # rank 1, mid-run: rank 0 goes on, then must name it
    t = time.monotonic()
    out, err = procs[0].communicate(timeout=240)
    procs[1].communicate()
    assert procs[0].returncode == 1 and out == "", err
    assert "rank 1 of 2 stopped" in err and "rerun the same command" in err and "Traceback" not in err
    assert time.monotonic() - t < 120
    shard = glob.glob(str(cache / "*.shards"))[0]
    rows = _shard_rows(cache)
    assert 0 < sum(rows.values()) < 42 and not glob.glob(str(cache / "*.h5"))
    for nproc in (1, 2):  # resume the same shards with another world size, and with the same one
        copy = tmp_path / f"c{nproc}"
        shutil.copytree(cache, copy)
        r = torchrun(nproc, *args, "--cache-dir", copy)
        assert r.returncode == 0, r.stderr[-3000:]
        assert_same(snapshot(r.stdout.strip().splitlines()[-1]), ref)
    assert os.path.isdir(shard)


@pytest.mark.slow
def test_ranks_killed_during_assembly_leave_no_entry_or_a_verified_one_and_the_rerun_finishes(
    uneven_folder, tmp_path
):
    """SIGKILL both ranks as soon as part files appear: the entry is absent or complete and
    verified (never half-made); a rerun finishes the same file a one-process run writes."""
    from featx.store.verify import verify

    ref = reference(uneven_folder, tmp_path, FAST_ARGS)
    args = [*FAST_ARGS, "--data", uneven_folder, "--cache-dir", tmp_path / "c", "-q"]
    procs = start_ranks([args, args])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not glob.glob(str(tmp_path / "c" / "*.h5.parts" / "*")):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.005)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert glob.glob(str(tmp_path / "c" / "*.h5.parts")), "the kill came before any part was sealed"
    for entry in glob.glob(str(tmp_path / "c" / "*.h5")):
        assert verify(entry, full=True) is None  # an entry that exists is complete
    r = torchrun(2, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    path = r.stdout.strip().splitlines()[-1]
    assert_same(snapshot(path), ref)
    assert not glob.glob(str(tmp_path / "c" / "*.tmp-*")) and not os.path.exists(path + ".shards")


@pytest.mark.slow
def test_a_job_waits_for_the_entry_lock_longer_than_the_timeout_then_finds_the_entry(uneven_folder, tmp_path):
    """Two jobs asking for one entry serialize on its lock: while another process holds it, rank 0
    waits (beating, so rank 1 does not time out) and the job then builds the entry."""
    from featx.store.cache import EntryLock

    cache = tmp_path / "c"
    rc, out, err = cli("extract", *FAST_ARGS, "--data", uneven_folder, "--cache-dir", cache, "-q")
    path = out.strip().splitlines()[-1]
    os.remove(path)  # the entry's name is known; the job must rebuild it
    lines: list[str] = []
    with EntryLock(path):
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                str(_free_port()),
                "-m",
                "featx",
                "extract",
                *FAST_ARGS,
                "--data",
                uneven_folder,
                "--cache-dir",
                cache,
            ],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 180
        while (
            not any("waiting for another featx process" in ln for ln in lines) and time.monotonic() < deadline
        ):
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.1)
        time.sleep(float(TIMEOUT) + 5)  # longer than any wait's timeout: rank 1 must not give up
        assert proc.poll() is None, "".join(lines)[-3000:]  # still waiting, not failed
    out = proc.stdout.read()
    proc.wait(timeout=240)
    reader.join(timeout=10)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert out.strip().splitlines()[-1] == path and os.path.isfile(path)


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 WORLD_SIZE=2"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ],
)
def test_a_rank_out_of_range_is_one_line_at_once(env, needle, uneven_folder, tmp_path, monkeypatch):
    import time

    for k, v in {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "FEATX_DIST_TIMEOUT": "60"}.items():
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    rc, _out, err = cli("extract", *FAST_ARGS, "--data", uneven_folder, "--cache-dir", tmp_path)
    assert time.monotonic() - t0 < 30
    assert_one_line_error(rc, err, code=2, needles=(needle, "check the launcher's settings"))
