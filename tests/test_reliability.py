"""Fault injection on `featx extract` and its cache: SIGKILL at many moments, truncated and garbled
cache entries and journals, a full disk, an unwritable cache directory, concurrent processes.

Everything here runs the real CLI on real files (subprocesses where a fault must hit a process:
kill -9, a file-size limit, SIGSTOP; in-process `featx.cli.main` otherwise, which is the same code
path minus the interpreter start). Nothing of featx is mocked.

Invariants checked throughout, from the issue: every completed row is kept, a partial entry is
never reported or used as complete, codes after any fault equal an uninterrupted run's exactly, and
errors are one clear line (exit 1 for runtime problems) without a traceback.

A representative sample runs by default; the full sets (>= 20 kill points, every corruption, every
disk-full phase, every concurrency scenario) are marked slow:

    python -m pytest -m slow tests/test_reliability.py     # the full fault-injection set
    python -m pytest -m "" tests/test_reliability.py       # everything in this file
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import FAST_ARGS, assert_one_line_error, cli, make_images
from featx.store.codes import open_codes
from featx.store.verify import verify

# -- helpers -------------------------------------------------------------------------------------


def featx_argv(*args) -> list[str]:
    return [sys.executable, "-m", "featx.cli", *[str(a) for a in args]]


def snapshot(path) -> dict:
    """Everything a codes file says about the rows (not timestamps)."""
    with open_codes(str(path)) as f:
        snap = {
            "paths": list(f.paths),
            "labels": np.array(f.labels),
            "split": np.array(f.split),
            "classes": list(f.classes),
            "skipped": list(f.skipped),
            "layers": list(f.layers),
            "codes": {n: f.codes(n) for n in f.layers},
            "rows": int(f.attrs["rows"]),
            "cache_key": f.attrs.get("cache_key"),
        }
    with h5py.File(str(path), "r") as h:
        snap["dtypes"] = {n: h["codes"][n].dtype for n in snap["layers"]}
    return snap


def assert_same(got: dict, want: dict, what: str = "") -> None:
    assert got["paths"] == want["paths"], what
    assert got["classes"] == want["classes"], what
    assert got["skipped"] == want["skipped"], what
    assert got["layers"] == want["layers"], what
    assert got["rows"] == want["rows"] == len(want["paths"]), what
    assert got["cache_key"] == want["cache_key"], what
    np.testing.assert_array_equal(got["labels"], want["labels"], err_msg=what)
    np.testing.assert_array_equal(got["split"], want["split"], err_msg=what)
    for n in want["layers"]:
        assert got["dtypes"][n] == want["dtypes"][n], what
        assert np.array_equal(got["codes"][n], want["codes"][n]), f"{what}: codes of {n} differ"


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def progress(entry) -> dict | None:
    try:
        with open(f"{entry}.partial/progress.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def h5_files(cache) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(str(cache)), "*.h5")))


# -- the extraction the kill and concurrency tests run ------------------------------------------

# resnet50 at 64 px, unpooled maps of layer2 and layer4 plus fc: a few seconds of work per run on
# 2 cores, ~160 KiB of codes per image, so finalisation (gzip of the HDF5 file) takes a while too.
KILL_LAYERS = "layer2,layer4,fc"


def kill_args(data, cache, *extra) -> list[str]:
    return [
        "extract",
        "--model",
        "resnet50",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--layers",
        KILL_LAYERS,
        "--pool",
        "none",
        "--workers",
        "0",
        "--batch-size",
        "4",
        "--data",
        str(data),
        "--cache-dir",
        str(cache),
        *extra,
    ]


class Reference:
    """An uninterrupted subprocess run: its file's content and its wall time."""

    def __init__(self, root: Path, per_class: int):
        self.data = make_images(root / f"kd{per_class}", per_class=per_class, size=(64, 64), seed=per_class)
        self.n = 3 * per_class
        cache = root / f"kref{per_class}"
        t = time.monotonic()
        r = subprocess.run(
            featx_argv("-q", *kill_args(self.data, cache)),
            capture_output=True,
            text=True,
            cwd=root,
            timeout=600,
        )
        self.seconds = time.monotonic() - t
        assert r.returncode == 0, r.stderr
        self.path = r.stdout.strip().splitlines()[-1]
        self.name = os.path.basename(self.path)
        self.snap = snapshot(self.path)
        self.row_bytes0 = self.snap["codes"][self.snap["layers"][0]].shape[1] * 4


@pytest.fixture(scope="module")
def kill_refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("killref")
    made: dict[int, Reference] = {}

    def get(per_class: int) -> Reference:
        if per_class not in made:
            made[per_class] = Reference(root, per_class)
        return made[per_class]

    return get


# -- kill -9 at many moments ---------------------------------------------------------------------


class KillCampaign:
    """Runs `extract` again and again on one cache directory, SIGKILLing each run at a chosen
    moment, and checks after every kill that nothing partial looks complete. A run that finishes
    before its moment comes is checked against the reference and the cache is emptied.

    'time' kills take a fraction of the duration of a whole run from nothing, re-measured on
    every such run of the campaign (machines are shared and their speed varies)."""

    POLL = 0.0005

    def __init__(self, ref: Reference, workdir: Path, rng: random.Random):
        self.ref, self.workdir, self.rng = ref, workdir, rng
        self.full_run_s = ref.seconds
        self.cache = workdir / "cache"
        self.entry = str(self.cache / ref.name)
        self.log: list[dict] = []
        self.kills = 0
        self.completions = 0

    # conditions on the files, polled while the run goes
    def _journal_write_in_flight(self) -> bool:
        """Rows written to the journal's first data file but not yet committed in progress.json."""
        try:
            size = os.path.getsize(f"{self.entry}.partial/rows.0.bin")
        except OSError:
            return False
        if os.path.exists(f"{self.entry}.partial/progress.json.tmp"):
            return True
        prog = progress(self.entry)
        return prog is not None and size > prog["rows_done"] * self.ref.row_bytes0

    def _journal_state(self):
        try:
            size = os.path.getsize(f"{self.entry}.partial/rows.0.bin")
        except OSError:
            size = None
        return progress(self.entry), size

    def run_once(self, kind: str, value: float = 0.0) -> dict:
        before = progress(self.entry)
        state_before = self._journal_state()
        entry_before = os.path.exists(self.entry)
        start_done = before["samples_done"] if before else 0
        out_f, err_f = self.workdir / "out.txt", self.workdir / "err.txt"
        with open(out_f, "w") as out, open(err_f, "w") as err:
            proc = subprocess.Popen(
                featx_argv("-q", *kill_args(self.ref.data, self.cache)),
                stdout=out,
                stderr=err,
                cwd=self.workdir,
            )
        t0 = time.monotonic()
        if kind == "time":
            value = value * self.full_run_s  # a fraction of a whole run -> seconds
        tmp = f"{self.entry}.tmp-{proc.pid}"
        fired_at = None
        deadline = t0 + 600
        while proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            if kind == "time":
                hit = now - t0 >= value
            elif kind == "progress":  # after `value` more committed batches
                prog = progress(self.entry)
                hit = prog is not None and prog["samples_done"] >= min(self.ref.n, start_done + 4 * value)
            elif kind == "journal-write":  # (a torn write left by an earlier kill does not count)
                hit = self._journal_write_in_flight() and self._journal_state() != state_before
            elif kind == "finalize":  # `value` seconds after the HDF5 file was created beside the entry
                if fired_at is None and os.path.exists(tmp):
                    fired_at = now
                hit = fired_at is not None and now - fired_at >= value
            elif kind == "replaced":  # the entry is in place but the journal is not yet removed
                hit = os.path.exists(self.entry) and os.path.isdir(f"{self.entry}.partial")
            else:
                raise ValueError(kind)
            if hit:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(self.POLL)
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        stdout, stderr = out_f.read_text(), err_f.read_text()
        if not killed:
            phase = "completed"
        elif (
            self._journal_state() == state_before
            and os.path.exists(self.entry) == entry_before
            and not os.path.exists(tmp)
        ):
            phase = "startup"  # killed before it changed anything on disk
        else:
            phase = self._phase(tmp)
        rec = {
            "kind": kind,
            "value": round(value, 3),
            "killed": killed,
            "phase": phase,
            "after_s": round(time.monotonic() - t0, 2),
            "done_before": start_done,
            "tmp_bytes": os.path.getsize(tmp) if os.path.exists(tmp) else None,
        }
        self.log.append(rec)
        self._check_invariants(stdout, f"after {rec}")
        if killed:
            self.kills += 1
        else:
            if before is None and not entry_before:
                self.full_run_s = rec["after_s"]
            assert proc.returncode == 0, (rec, stderr)
            assert "Traceback" not in stderr, stderr
            assert stdout.strip().splitlines()[-1] == self.entry, stdout
            assert_same(snapshot(self.entry), self.ref.snap, f"uninterrupted run in a campaign {rec}")
            assert not glob.glob(glob.escape(self.entry) + ".tmp-*"), "a finished run left its temporary file"
            self.completions += 1
            shutil.rmtree(self.cache)  # start the next chain of kills from nothing
        return rec

    def _phase(self, tmp: str) -> str:
        """Where the kill landed, judged from what it left on disk (a run killed before it
        touched the journal is 'startup')."""
        journal = f"{self.entry}.partial"
        if os.path.exists(self.entry):
            return "after-rename" if os.path.isdir(journal) else "finished"
        if os.path.exists(tmp):  # this run's HDF5 file beside the entry
            return "finalize"
        prog = progress(self.entry)
        if prog is None:
            return "startup"
        try:
            if os.path.getsize(f"{journal}/rows.0.bin") > prog["rows_done"] * self.ref.row_bytes0:
                return "journal-write"
        except OSError:
            pass
        return "loop" if prog["samples_done"] < self.ref.n else "loop-done"

    def _check_invariants(self, stdout: str, what: str) -> None:
        # 1. every *.h5 in the cache is complete and exactly the reference
        for p in h5_files(self.cache):
            assert os.path.basename(p) == self.ref.name, (p, what)
            assert verify(p) is None, (p, verify(p), what)
            assert_same(snapshot(p), self.ref.snap, what)
        # 2. a killed run printed no path, or the path of a complete file
        for line in stdout.strip().splitlines():
            assert line == self.entry and os.path.exists(self.entry), (stdout, what)
        # 3. `featx info` / `featx cache ls` never call a missing or partial file complete
        if not os.path.exists(self.entry):
            rc, out, err = cli("info", self.entry)
            assert rc in (0, 2) and "Traceback" not in err, (rc, err, what)
            assert "complete" not in out.replace("partial entry", ""), (out, what)
            rc, out, err = cli("cache", "ls", "--cache-dir", self.cache)
            assert rc == 0 and "Traceback" not in err, (err, what)
            for line in out.splitlines():
                if self.ref.name in line:
                    assert " complete " not in f" {line} ", (line, what)

    def finish(self) -> None:
        """Run to completion (no kill) and compare with the uninterrupted reference."""
        prog = progress(self.entry)
        existed = os.path.exists(self.entry)
        r = subprocess.run(
            featx_argv(*kill_args(self.ref.data, self.cache)),
            capture_output=True,
            text=True,
            cwd=self.workdir,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        assert r.stdout.strip().splitlines()[-1] == self.entry
        if prog is not None and prog["samples_done"] > 0 and not existed:
            assert f"resuming {self.ref.name} at image {prog['samples_done']} of {self.ref.n}" in r.stderr, (
                r.stderr
            )
        assert_same(snapshot(self.entry), self.ref.snap, f"final file after the kills {self.log}")
        assert not glob.glob(glob.escape(self.entry) + ".tmp-*"), (
            "stale temporary file left next to the entry"
        )
        self._check_invariants("", "after the final run")


def _kill_plan(rng: random.Random, n_time: int, extra: list[tuple[str, float]]) -> list:
    """Random moments spread over a whole run (one per stratum of [0, 1] of its duration),
    shuffled in with the targeted ones."""
    strata = [(k + rng.random()) / n_time for k in range(n_time)]
    plan = [("time", t) for t in strata] + list(extra)
    rng.shuffle(plan)
    # targeted kills at the end of the loop and in finalisation are cheapest once the journal is full
    return sorted(plan, key=lambda p: p[0] in ("finalize", "replaced"))


def _killed_phases(camp: KillCampaign) -> set[str]:
    return {r["phase"] for r in camp.log if r["killed"]}


def _in_hdf5_write(camp: KillCampaign) -> bool:
    """A kill inside the HDF5 write: the temporary file already held data."""
    return any(r["phase"] == "finalize" and (r["tmp_bytes"] or 0) > 4096 for r in camp.log if r["killed"])


def _run_campaign(ref: Reference, workdir: Path, seed: int, plan, min_kills: int, need_hdf5_write: bool):
    rng = random.Random(seed)
    camp = KillCampaign(ref, workdir, rng)
    for kind, value in plan:
        camp.run_once(kind, value)
    for _ in range(3):  # a targeted kill can miss its window on a loaded machine: try again
        if "finalize" in _killed_phases(camp) and (_in_hdf5_write(camp) or not need_hdf5_write):
            break
        camp.run_once("finalize", rng.uniform(0.02, 0.2))
    extra = 0
    while camp.kills < min_kills and extra < 3 * min_kills:  # runs that finished first do not count
        camp.run_once("time", rng.random())
        extra += 1
    camp.finish()
    print(
        f"\n{camp.kills} kills, {camp.completions} uninterrupted completions, phases: "
        f"{sorted({r['phase'] for r in camp.log if r['killed']})}"
    )
    for rec in camp.log:
        print("  ", rec)
    assert camp.kills >= min_kills, camp.log
    return camp


def test_sigkill_sample_then_resume_is_identical(kill_refs, tmp_path):
    """Five kills: at a random moment, after a commit, during a journal write, in finalisation
    (right after the HDF5 file appears) and just after the rename; then the file is identical."""
    ref = kill_refs(16)
    rng = random.Random(1)
    plan = [
        ("progress", 2),
        ("journal-write", 0),
        ("time", rng.uniform(0.2, 0.8)),
        ("finalize", 0.0),
        ("replaced", 0),
    ]
    camp = _run_campaign(ref, tmp_path, 1, plan, 4, need_hdf5_write=False)
    assert "finalize" in _killed_phases(camp), camp.log


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", [11, 12])
def test_sigkill_at_many_random_moments(kill_refs, tmp_path, seed):
    """>= 20 kills per campaign: random moments over the whole run (start-up, loading weights,
    the batch loop, finalisation) plus targeted ones (during a journal write, inside the HDF5
    write at several delays, between the rename and the journal's removal)."""
    ref = kill_refs(40)
    rng = random.Random(seed)
    targeted = [
        ("progress", 1),
        ("progress", 3),
        ("journal-write", 0),
        ("journal-write", 0),
        ("journal-write", 0),
        ("finalize", 0.0),
        ("finalize", 0.05),
        ("finalize", 0.15),
        ("finalize", 0.3),
        ("replaced", 0),
    ]
    plan = _kill_plan(rng, 12, targeted)
    camp = _run_campaign(ref, tmp_path, seed, plan, 20, need_hdf5_write=True)
    assert {"startup", "loop", "finalize"} <= _killed_phases(camp), camp.log
    assert _in_hdf5_write(camp), camp.log


# -- corrupt cache entries -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_entry(tmp_path_factory):
    """A complete entry made by an uninterrupted run, and the arguments that made it."""
    root = tmp_path_factory.mktemp("good")
    data = make_images(root / "data", per_class=6, size=(40, 40), splits=("train", "test"))
    cache = root / "cache"
    args = ["extract", *FAST_ARGS, "--data", data, "--layers", "layer2,layer4", "--cache-dir"]
    rc, out, err = cli("-q", *args, cache)
    assert rc == 0, err
    path = out.strip().splitlines()[-1]
    return {"root": root, "data": data, "cache": cache, "args": args, "path": path, "snap": snapshot(path)}


def _garble(path: str, offset: int, n: int = 64) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        old = fh.read(n)
        fh.seek(offset)
        fh.write(bytes(b ^ 0x5A for b in old))


def _corrupt(path: str, how: str) -> None:
    size = os.path.getsize(path)
    if how == "empty":
        os.truncate(path, 0)
    elif how == "truncated-half":
        os.truncate(path, size // 2)
    elif how == "truncated-tail":
        os.truncate(path, size - 100)
    elif how == "superblock":
        _garble(path, 0, 64)
    elif how == "random-bytes":
        Path(path).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    elif how == "state-attr":  # a file whose completion mark was never written
        with h5py.File(path, "r+") as f:
            del f.attrs["featx_state"]
    elif how == "rows-attr":
        with h5py.File(path, "r+") as f:
            f.attrs["rows"] = int(f.attrs["rows"]) + 1
    elif how == "codes-chunk":  # bytes inside a compressed chunk of codes
        with h5py.File(path, "r") as f:
            info = f["codes/layer4"].id.get_chunk_info(0)
        _garble(path, info.byte_offset + info.size // 2, 64)
    elif how == "labels":  # bytes of the (uncompressed) labels
        with h5py.File(path, "r") as f:
            ds = f["labels"]
            off = ds.id.get_offset() if ds.chunks is None else ds.id.get_chunk_info(0).byte_offset
            n = len(ds)
        with open(path, "r+b") as fh:
            fh.seek(off)
            fh.write(((np.arange(n) + 1) % 3).astype(np.int64).tobytes())
    else:
        raise ValueError(how)


CORRUPTIONS_DEFAULT = ["truncated-half", "superblock", "codes-chunk", "labels"]
CORRUPTIONS_SLOW = ["empty", "truncated-tail", "random-bytes", "state-attr", "rows-attr"]


def _check_corrupt_entry_handling(good_entry, tmp_path, how):
    cache = tmp_path / "cache"
    shutil.copytree(good_entry["cache"], cache)
    entry = str(cache / os.path.basename(good_entry["path"]))
    _corrupt(entry, how)
    other = tmp_path / "copy"
    shutil.copytree(cache, other)

    # the same extract command reports the file with its path and rebuilds it
    rc, out, err = cli(*good_entry["args"], cache)
    assert rc == 0 and "Traceback" not in err, err
    assert out.strip().splitlines()[-1] == entry
    assert entry in err and ("not usable" in err or "rebuild" in err), err
    assert "cache hit" not in err, err
    try:
        got = snapshot(entry)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"extract handed out a corrupt file after '{how}': {e}")
    assert_same(got, good_entry["snap"], f"rebuilt after {how}")

    # detected, not trusted, by the reading commands too: they name the file in one line
    entry = str(other / os.path.basename(entry))
    rc, out, err = cli("info", entry)
    assert_one_line_error(rc, err, 1, [entry])
    rc, out, err = cli("fit", entry, "--C", "1")
    assert_one_line_error(rc, err, 1, [entry])
    rc, out, err = cli("cache", "ls", "--cache-dir", other)
    assert rc == 0 and "Traceback" not in err, err
    line = next(ln for ln in out.splitlines() if os.path.basename(entry) in ln)
    assert "corrupt" in line, out


@pytest.mark.parametrize("how", CORRUPTIONS_DEFAULT)
def test_corrupt_entry_is_detected_reported_and_rebuilt(good_entry, tmp_path, how):
    _check_corrupt_entry_handling(good_entry, tmp_path, how)


@pytest.mark.slow
@pytest.mark.parametrize("how", CORRUPTIONS_SLOW)
def test_corrupt_entry_is_detected_reported_and_rebuilt_more(good_entry, tmp_path, how):
    _check_corrupt_entry_handling(good_entry, tmp_path, how)


@pytest.mark.parametrize(
    "memo",
    ["not json", '{"entry": 5}', '{"entry": "../escape.h5"}', '{"entry": "/etc/passwd"}', "OTHER", '["a"]'],
)
def test_garbled_request_memo_never_hands_out_another_entry(good_entry, tmp_path, memo):
    """The request memo is only a shortcut: a garbled one, or one naming another complete entry,
    must not make `extract` return a file that does not hold the requested codes."""
    cache = tmp_path / "cache"
    shutil.copytree(good_entry["cache"], cache)
    data = good_entry["data"]
    other_args = ["extract", *FAST_ARGS, "--data", data, "--layers", "layer1", "--cache-dir", cache]
    rc, out, err = cli("-q", *other_args)
    assert rc == 0, err
    other = out.strip().splitlines()[-1]
    mine = str(cache / os.path.basename(good_entry["path"]))
    memos = {}
    for p in glob.glob(str(cache / ".requests" / "*.json")):
        memos[json.loads(Path(p).read_text())["entry"]] = p
    target = memos[os.path.basename(mine)]
    Path(target).write_text(json.dumps({"entry": os.path.basename(other)}) if memo == "OTHER" else memo)
    rc, out, err = cli(*good_entry["args"], cache)
    assert rc == 0 and "Traceback" not in err, err
    assert out.strip().splitlines()[-1] == mine, (out, err)
    assert_same(snapshot(mine), good_entry["snap"], f"memo {memo}")


# -- corrupt journals ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def journal_case(tmp_path_factory):
    """Data whose ninth image is undecodable: `--strict` stops there and leaves a journal of 8
    committed rows, which the same command without --strict resumes."""
    root = tmp_path_factory.mktemp("journal")
    data = make_images(root / "data", per_class=8, size=(40, 40))
    (data / "cat" / "cat_005x.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["extract", *FAST_ARGS, "--data", data, "--layers", "layer1,layer3"]
    rc, out, err = cli("-q", *args, "--cache-dir", root / "ref")
    assert rc == 0, err
    ref = out.strip().splitlines()[-1]
    return {"root": root, "args": args, "name": os.path.basename(ref), "snap": snapshot(ref)}


def _make_journal(journal_case, cache) -> str:
    rc, out, err = cli("-q", *journal_case["args"], "--strict", "--cache-dir", cache)
    assert_one_line_error(rc, err, 1, ["cat/cat_005x.jpg", "--strict"])
    entry = str(cache / journal_case["name"])
    prog = progress(entry)
    assert (
        prog is not None and prog["rows_done"] == 4 * (prog["rows_done"] // 4) and prog["rows_done"] >= 4
    ), prog
    assert not os.path.exists(entry)
    return entry


JOURNAL_CORRUPTIONS = [
    "progress-garbage",
    "progress-missing",
    "meta-garbage",
    "rows-truncated",
    "index-truncated",
    "progress-ahead",
    "journal-empty-dir",
]


@pytest.mark.parametrize("how", JOURNAL_CORRUPTIONS)
def test_corrupt_journal_is_rebuilt_or_resumed_to_identical_codes(journal_case, tmp_path, how):
    cache = tmp_path / "cache"
    entry = _make_journal(journal_case, cache)
    j = Path(f"{entry}.partial")
    prog = json.loads((j / "progress.json").read_text())
    if how == "progress-garbage":
        (j / "progress.json").write_text('{"rows_done": 8, "samp')
    elif how == "progress-missing":
        (j / "progress.json").unlink()
    elif how == "meta-garbage":
        (j / "meta.json").write_bytes(b"\x00\xff garbage")
    elif how == "rows-truncated":
        os.truncate(j / "rows.0.bin", os.path.getsize(j / "rows.0.bin") // 3)
    elif how == "index-truncated":
        os.truncate(j / "index.bin", 8)
    elif how == "progress-ahead":  # a progress record that claims more than the data files hold
        prog["rows_done"] += 4
        prog["samples_done"] += 4
        (j / "progress.json").write_text(json.dumps(prog))
    elif how == "journal-empty-dir":
        shutil.rmtree(j)
        j.mkdir()
    rc, out, err = cli(*journal_case["args"], "--cache-dir", cache)
    assert rc == 0 and "Traceback" not in err, err
    assert out.strip().splitlines()[-1] == entry
    assert_same(snapshot(entry), journal_case["snap"], f"journal {how}")


def test_interrupted_journal_resumes_where_it_stopped(journal_case, tmp_path):
    cache = tmp_path / "cache"
    entry = _make_journal(journal_case, cache)
    done = progress(entry)["samples_done"]
    rc, out, err = cli(*journal_case["args"], "--cache-dir", cache)
    assert rc == 0, err
    assert f"resuming {journal_case['name']} at image {done}" in err, err
    assert_same(snapshot(entry), journal_case["snap"], "resumed")


# -- a full disk ---------------------------------------------------------------------------------

DISK_LAYERS = "layer1,layer2,layer3,layer4"


@pytest.fixture(scope="module")
def disk_case(tmp_path_factory):
    """Sizes of the journal's largest data file and of the final HDF5 file, from a reference run,
    so that file-size limits can be placed in each phase of a run."""
    root = tmp_path_factory.mktemp("disk")
    data = make_images(root / "data", per_class=30, size=(40, 40))
    args = ["extract", *FAST_ARGS, "--data", data, "--layers", DISK_LAYERS]
    rc, out, err = cli("-q", *args, "--cache-dir", root / "ref")
    assert rc == 0, err
    ref = out.strip().splitlines()[-1]
    snap = snapshot(ref)
    largest_journal_file = max(c.shape[1] for c in snap["codes"].values()) * 4 * snap["rows"]
    h5_size = os.path.getsize(ref)
    assert h5_size > 1.2 * largest_journal_file, (h5_size, largest_journal_file)
    return {
        "root": root,
        "data": data,
        "args": args,
        "name": os.path.basename(ref),
        "snap": snap,
        "journal_max": largest_journal_file,
        "h5_size": h5_size,
    }


def _with_fsize_limit(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


def _prior_entry(disk_case, cache) -> tuple[str, str]:
    """An earlier complete entry in the same cache directory, and its sha256."""
    rc, out, err = cli(
        "-q", "extract", *FAST_ARGS, "--data", disk_case["data"], "--layers", "layer1", "--cache-dir", cache
    )
    assert rc == 0, err
    prior = out.strip().splitlines()[-1]
    return prior, sha256(prior)


def _check_after_failed_write(disk_case, cache, prior, prior_sha, r) -> None:
    """Data first (nothing lost, nothing half-written looks complete, the next run succeeds),
    then the message: one line, exit 1, no traceback."""
    entry = str(cache / disk_case["name"])
    assert r.returncode != 0, "the run succeeded despite the limit"
    assert not os.path.exists(entry) or verify(entry) is None, "a half-written entry looks complete"
    assert sha256(prior) == prior_sha, "the earlier entry changed"
    # the next run with space resumes (or restarts) and gives exactly the reference codes
    rc, out, err = cli("-q", *disk_case["args"], "--cache-dir", cache)
    assert rc == 0 and "Traceback" not in err, err
    assert out.strip().splitlines()[-1] == entry
    assert_same(snapshot(entry), disk_case["snap"], "after the disk had space again")
    assert sha256(prior) == prior_sha, "the earlier entry changed"
    rc, out, err = cli(
        "extract", *FAST_ARGS, "--data", disk_case["data"], "--layers", "layer1", "--cache-dir", cache
    )
    assert rc == 0 and "cache hit" in err and out.strip().splitlines()[-1] == prior, err
    assert r.returncode == 1, f"exit {r.returncode}, stderr: {r.stderr[-3000:]}"
    assert_one_line_error(r.returncode, r.stderr, 1)


@pytest.mark.parametrize("phase", ["journal-start", "mid-journal", "finalize"])
def test_file_size_limit_gives_clear_error_and_next_run_succeeds(disk_case, tmp_path, phase):
    """RLIMIT_FSIZE makes writes past the limit fail with EFBIG, as a full disk fails them with
    ENOSPC: at the journal's creation, in the middle of the journal, and while the HDF5 file is
    written at the end."""
    cache = tmp_path / "cache"
    prior, prior_sha = _prior_entry(disk_case, cache)
    limit = {
        "journal-start": 100,
        "mid-journal": disk_case["journal_max"] // 3,
        "finalize": (disk_case["journal_max"] + disk_case["h5_size"]) // 2,
    }[phase]
    r = subprocess.run(
        featx_argv("-q", *disk_case["args"], "--cache-dir", cache),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        preexec_fn=_with_fsize_limit(limit),
        timeout=600,
    )
    _check_after_failed_write(disk_case, cache, prior, prior_sha, r)


@contextlib.contextmanager
def _tmpfs(path: Path, size: int, read_only: bool = False):
    """A small filesystem made for the test (needs root and mount(2)); skips where unavailable."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _remount(path: Path, opts: str) -> None:
    r = subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("phase", ["finalize", pytest.param("mid-journal", marks=pytest.mark.slow)])
def test_small_filesystem_fills_up_then_grows(disk_case, tmp_path, phase):
    """A real ENOSPC: a tmpfs just large enough for the earlier entry and part of the new work."""
    page = 4096
    journal_total = sum(
        c.shape[1] * 4 * disk_case["snap"]["rows"] for c in disk_case["snap"]["codes"].values()
    )
    with _tmpfs(tmp_path / "fs", 64 << 20) as fs:
        cache = fs / "cache"
        prior, prior_sha = _prior_entry(disk_case, cache)
        used = sum(
            os.path.getsize(p) for p in glob.glob(str(cache / "**"), recursive=True) if os.path.isfile(p)
        )
        room = journal_total + 64 * 1024 if phase == "finalize" else journal_total // 3
        _remount(fs, f"size={((used + room) // page + 4) * page}")
        r = subprocess.run(
            featx_argv("-q", *disk_case["args"], "--cache-dir", cache),
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
        )
        entry = str(cache / disk_case["name"])
        assert r.returncode != 0, "the run succeeded on a full filesystem"
        assert not os.path.exists(entry) or verify(entry) is None
        assert sha256(prior) == prior_sha
        _remount(fs, "size=64m")
        rc, out, err = cli("-q", *disk_case["args"], "--cache-dir", cache)
        assert rc == 0 and "Traceback" not in err, err
        assert_same(snapshot(entry), disk_case["snap"], "after the filesystem grew")
        assert sha256(prior) == prior_sha
        # and the failed run said so clearly
        assert r.returncode == 1, f"exit {r.returncode}, stderr: {r.stderr[-3000:]}"
        line = assert_one_line_error(r.returncode, r.stderr, 1)
        assert "space" in line.lower(), line


# -- an unwritable cache directory ---------------------------------------------------------------


def test_cache_dir_that_cannot_be_created(good_entry, tmp_path):
    for bad in ["/proc/featx-cache-test/cache", str(Path(good_entry["path"]))]:  # under /proc; a regular file
        rc, out, err = cli("-q", *good_entry["args"], bad)
        assert_one_line_error(rc, err, 1, [bad])
        assert out == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_cache_dir_without_write_permission(good_entry, tmp_path):
    cache = tmp_path / "ro"
    shutil.copytree(good_entry["cache"], cache)
    before = sha256(cache / os.path.basename(good_entry["path"]))
    os.chmod(cache, 0o555)
    try:
        rc, out, err = cli(
            "-q",
            "extract",
            *FAST_ARGS,
            "--data",
            good_entry["data"],
            "--layers",
            "layer1",
            "--cache-dir",
            cache,
        )
        assert_one_line_error(rc, err, 1, [str(cache)])
    finally:
        os.chmod(cache, 0o755)
    assert sha256(cache / os.path.basename(good_entry["path"])) == before


def test_read_only_cache_dir_gives_clear_error_and_keeps_entries(good_entry, tmp_path):
    with _tmpfs(tmp_path / "fs", 16 << 20) as fs:
        cache = fs / "cache"
        shutil.copytree(good_entry["cache"], cache)
        entry = str(cache / os.path.basename(good_entry["path"]))
        before = sha256(entry)
        _remount(fs, "ro")
        try:
            rc, out, err = cli("-q", *good_entry["args"], cache)  # served as a hit, or refused clearly
            if rc == 0:
                assert out.strip().splitlines()[-1] == entry and "Traceback" not in err, err
            else:
                assert_one_line_error(rc, err, 1, [str(cache)])
            new = [
                "extract",
                *FAST_ARGS,
                "--data",
                good_entry["data"],
                "--layers",
                "layer1",
                "--cache-dir",
                cache,
            ]
            rc, out, err = cli("-q", *new)
            assert_one_line_error(rc, err, 1, [str(cache)])
        finally:
            _remount(fs, "rw")
        assert sha256(entry) == before
        rc, out, err = cli("-q", *new)
        assert rc == 0, err


# -- concurrency ---------------------------------------------------------------------------------


def _wait_for(cond, timeout=300.0, proc=None, what=""):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _spawn(args, workdir, name):
    out, err = open(workdir / f"{name}.out", "w"), open(workdir / f"{name}.err", "w")
    proc = subprocess.Popen(featx_argv(*args), stdout=out, stderr=err, cwd=workdir)
    out.close()
    err.close()
    return proc


def _read(workdir, name) -> tuple[str, str]:
    return (workdir / f"{name}.out").read_text(), (workdir / f"{name}.err").read_text()


def test_second_process_on_a_busy_entry_exits_clearly_with_no_wait(kill_refs, tmp_path):
    """Process A holds the entry (stopped with SIGSTOP mid-run, so timing cannot matter); B with
    --no-wait exits 1 with one line naming the entry, `cache rm` refuses to remove it, and A
    then finishes a correct file."""
    ref = kill_refs(16)
    cache = tmp_path / "cache"
    entry = str(cache / ref.name)
    a = _spawn(["-q", *kill_args(ref.data, cache)], tmp_path, "a")
    try:
        _wait_for(lambda: (progress(entry) or {}).get("samples_done", 0) >= 4, proc=a, what="A's first batch")
        a.send_signal(signal.SIGSTOP)
        assert not os.path.exists(entry)
        b = subprocess.run(
            featx_argv("-q", *kill_args(ref.data, cache, "--no-wait")),
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        assert_one_line_error(b.returncode, b.stderr, 1, [entry, "another featx process", f"pid {a.pid}"])
        assert b.stdout == ""
        rc, out, err = cli("cache", "rm", ref.name, "--cache-dir", cache)
        assert_one_line_error(rc, err, 1, ["another featx process"])
        assert os.path.isdir(f"{entry}.partial")
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=600) == 0, _read(tmp_path, "a")
    assert _read(tmp_path, "a")[0].strip() == entry
    assert_same(snapshot(entry), ref.snap, "A after B was refused")


@pytest.mark.slow
def test_waiting_process_takes_over_when_the_writer_is_killed(kill_refs, tmp_path):
    """B waits on A's lock (saying so); A is killed with SIGKILL; B takes the lock, resumes A's
    journal and writes exactly the reference file."""
    ref = kill_refs(16)
    cache = tmp_path / "cache"
    entry = str(cache / ref.name)
    a = _spawn(["-q", *kill_args(ref.data, cache)], tmp_path, "a")
    _wait_for(lambda: (progress(entry) or {}).get("samples_done", 0) >= 8, proc=a, what="A's second batch")
    a.send_signal(signal.SIGSTOP)
    b = _spawn(kill_args(ref.data, cache), tmp_path, "b")
    try:
        _wait_for(
            lambda: "waiting for another featx process" in _read(tmp_path, "b")[1], proc=b, what="B waiting"
        )
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert b.wait(timeout=600) == 0, _read(tmp_path, "b")
    out, err = _read(tmp_path, "b")
    assert out.strip().splitlines()[-1] == entry
    assert f"resuming {ref.name} at image" in err, err
    assert_same(snapshot(entry), ref.snap, "B after A was killed")


@pytest.mark.slow
def test_two_processes_on_the_same_entry_both_get_the_right_file(kill_refs, tmp_path):
    ref = kill_refs(16)
    cache = tmp_path / "cache"
    procs = [_spawn(["-q", *kill_args(ref.data, cache)], tmp_path, f"p{i}") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, _read(tmp_path, f"p{i}")
        assert _read(tmp_path, f"p{i}")[0].strip() == str(cache / ref.name)
    assert_same(snapshot(cache / ref.name), ref.snap, "two writers")
    assert h5_files(cache) == [str(cache / ref.name)]


def _two_entries_at_once(a_args, b_args, want, tmp_path):
    cache = tmp_path / "cache"
    a = _spawn(["-q", *a_args, cache], tmp_path, "a")
    b = _spawn(["-q", *b_args, cache, "--dtype", "float16"], tmp_path, "b")
    assert a.wait(timeout=600) == 0, _read(tmp_path, "a")
    assert b.wait(timeout=600) == 0, _read(tmp_path, "b")
    pa, pb = _read(tmp_path, "a")[0].strip(), _read(tmp_path, "b")[0].strip()
    assert pa != pb and os.path.dirname(pa) == os.path.dirname(pb) == str(cache)
    assert_same(snapshot(pa), want, "entry A")
    half = snapshot(pb)
    assert half["paths"] == want["paths"]
    np.testing.assert_array_equal(half["labels"], want["labels"])
    for n in want["layers"]:
        assert half["dtypes"][n] == np.float16
        assert np.array_equal(half["codes"][n], want["codes"][n].astype(np.float16).astype(np.float32)), n
    assert sorted(h5_files(cache)) == sorted([pa, pb])


def test_two_different_entries_in_one_cache_at_once(good_entry, tmp_path):
    """Two processes writing different entries of one cache directory at the same time both
    succeed; float16 codes are the float32 codes rounded, exactly."""
    _two_entries_at_once(good_entry["args"], good_entry["args"], good_entry["snap"], tmp_path)


@pytest.mark.slow
def test_two_different_entries_in_one_cache_at_once_long_runs(kill_refs, tmp_path):
    ref = kill_refs(16)
    args = kill_args(ref.data, "CACHE")[:-1]  # the cache directory goes last
    _two_entries_at_once(args, args, ref.snap, tmp_path)
