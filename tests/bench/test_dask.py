"""featx bench --scheduler: the cells on a real Dask cluster (a LocalCluster of 2 worker processes
on the loopback), with the same results and resume as the default joblib backend."""

import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import (
    assert_one_line_error,
    cells_written,
    cli,
    csv_without_timing,
    make_images,
    run_cli,
    sigkill_when,
)
from featx.bench.config import BenchConfig
from featx.bench.grid import Cell
from featx.bench.run import run_cell
from featx.classifiers.protocol import Protocol, parse_train_size
from featx.errors import FeatxError
from featx.files import load_done

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask")
    a = make_images(root / "alpha", per_class=8, splits=("train", "test"), size=(36, 36), seed=1)
    b = make_images(root / "beta", classes=("x", "y"), per_class=10, size=(36, 36), seed=2)
    return root, a, b


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as c:
        yield c


def _args(root, a, b, seeds="0,1"):
    return [
        "bench",
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--data",
        f"{a}:similar",
        "--data",
        f"{b}:different",
        "--layers",
        "layer1,layer3,avgpool",
        "--train-sizes",
        "2/class,all",
        "--seeds",
        seeds,
        "--image-size",
        "32",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--precision",
        "fp32",
        "--C",
        "0.1,1",
        "--cache-dir",
        str(root / "cache"),
    ]


def _cells_on(cluster) -> bool:
    """Whether the cluster's scheduler has seen joblib batches of bench cells."""
    with distributed.Client(cluster, set_as_default=False) as c:
        prefixes = c.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    return any("run_cell" in p for p in prefixes)


def test_dask_resumes_and_matches_joblib(data, cluster, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="featx")
    root, a, b = data
    rc, _, err = cli(*_args(root, a, b), "--out", tmp_path / "ref")
    assert rc == 0, err
    # an interrupted bench: only seed 0 fitted, here, by joblib
    out = tmp_path / "out"
    rc, _, err = cli(*_args(root, a, b, seeds="0"), "--out", out)
    assert rc == 0, err
    assert not _cells_on(cluster)
    caplog.clear()
    rc, _, err = cli(*_args(root, a, b), "--out", out, "--scheduler", cluster.scheduler_address)
    assert rc == 0, err
    assert "24 cells: 12 done before, 12 to fit" in caplog.text
    assert f"Dask cluster at {cluster.scheduler_address} (2 worker threads)" in caplog.text
    assert _cells_on(cluster)
    # nothing refitted: one line per cell, appended by this process
    assert sum(1 for _ in open(out / "cells.jsonl")) == len(load_done(str(out))) == 24
    assert csv_without_timing(out / "results.csv") == csv_without_timing(tmp_path / "ref" / "results.csv")


def test_scheduler_from_the_environment(data, cluster, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="featx")
    root, a, b = data
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
    rc, _, err = cli(*_args(root, a, b, seeds="3"), "--train-sizes", "all", "--out", tmp_path / "out")
    assert rc == 0, err
    assert f"Dask cluster at {cluster.scheduler_address}" in caplog.text
    # 'local' keeps the cells here despite the variable
    caplog.clear()
    rc, _, err = cli(
        *_args(root, a, b, seeds="4"),
        "--train-sizes",
        "all",
        "--out",
        tmp_path / "out",
        "--scheduler",
        "local",
    )
    assert rc == 0, err
    assert "6 cells: 0 done before, 6 to fit" in caplog.text and "Dask cluster" not in caplog.text


def test_a_one_thread_cluster_says_joblib_fits_here(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="featx")
    root, a, b = data
    with distributed.LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=":0",
    ) as one:
        rc, _, err = cli(
            *_args(root, a, b, seeds="5"),
            "--train-sizes",
            "all",
            "--out",
            tmp_path / "out",
            "--scheduler",
            one.scheduler_address,
        )
    assert rc == 0, err
    assert "the cluster has 1 worker thread, so joblib fits the cells here" in caplog.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_one_line(data, tmp_path, monkeypatch):
    import dask

    root, a, b = data
    args = [*_args(root, a, b), "--out", tmp_path / "out", "--cache-dir", tmp_path / "cache"]
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        rc, _, err = cli(*args, "--scheduler", address)
        assert_one_line_error(rc, err, 1, ("--scheduler", address, "cannot reach the Dask scheduler"))
        monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
        rc, _, err = cli(*args)
        assert_one_line_error(rc, err, 1, ("--scheduler", f"DASK_SCHEDULER_ADDRESS={address}"))
    assert time.monotonic() - t0 < 30
    # said before the extraction, not after it
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")
    rc, _, err = cli(*args, "--scheduler", "myhost")
    assert_one_line_error(rc, err, 2, ("--scheduler myhost", "tcp://HOST:8786"))


def test_a_scheduler_without_workers_is_one_line(data, tmp_path, monkeypatch):
    import featx.bench.run

    root, a, b = data
    monkeypatch.setattr(featx.bench.run, "WORKERS_TIMEOUT_S", 2)  # 60 s for a user
    with distributed.LocalCluster(
        n_workers=0, protocol="tcp", host="127.0.0.1", dashboard_address=":0"
    ) as empty:
        rc, _, err = cli(
            *_args(root, a, b), "--out", tmp_path / "out", "--scheduler", empty.scheduler_address
        )
    assert_one_line_error(rc, err, 1, (f"--scheduler {empty.scheduler_address}", "no workers after 2 s"))


def test_missing_dask_says_which_extra(data, tmp_path, monkeypatch):
    root, a, b = data
    monkeypatch.setitem(sys.modules, "distributed", None)  # what an install without the extra sees
    rc, _, err = cli(*_args(root, a, b), "--out", tmp_path / "out", "--scheduler", "tcp://127.0.0.1:8786")
    assert_one_line_error(rc, err, 2, ("--scheduler", 'pip install "featx[dask]"'))


def test_a_worker_without_the_codes_file_stops_the_bench(tmp_path):
    cell = Cell(0, str(tmp_path / "elsewhere.h5"), "k", "layer1", parse_train_size("all"), Protocol(), 0)
    # raised, not recorded as a finished cell that every resume would skip
    with pytest.raises(FeatxError, match="filesystem every Dask worker sees"):
        run_cell(cell)


def test_bench_config_keeps_the_scheduler():
    cfg = BenchConfig("resnet18", [], weights="none", scheduler="tcp://h:8786")
    assert cfg.scheduler == "tcp://h:8786" and BenchConfig("resnet18", [], weights="none").scheduler is None


def _can_hide(path) -> bool:
    """Whether a process can run with a tmpfs over `path` (a mount namespace, unprivileged or root)."""
    cmd = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs none {path}"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.slow
def test_workers_that_do_not_see_the_cache_stop_the_bench(data, tmp_path):
    """Workers of another 'machine': a mount namespace where the cache directory is an empty tmpfs."""
    root, a, b = data
    cache = root / "cache"
    rc, _, err = cli(*_args(root, a, b, seeds="0"), "--out", tmp_path / "out")  # the codes, here
    assert rc == 0, err
    if not _can_hide(cache):
        pytest.skip("needs unshare -rm (mount namespaces)")
    with distributed.LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address=":0") as cluster:
        worker = subprocess.Popen(
            [
                "unshare",
                "-rm",
                "sh",
                "-c",
                f"mount -t tmpfs none {cache} && exec {sys.executable} -m distributed.cli."
                f"dask_worker {cluster.scheduler_address} --nworkers 2 --nthreads 1 --no-dashboard",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            with distributed.Client(cluster, set_as_default=False) as c:
                c.wait_for_workers(2, timeout=60)
            rc, _, err = cli(
                *_args(root, a, b, seeds="0,1"),
                "--out",
                tmp_path / "out",
                "--scheduler",
                cluster.scheduler_address,
            )
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    line = assert_one_line_error(
        rc, err, 1, ("cannot read the codes file", "filesystem every Dask worker sees"), only_error_lines=True
    )
    assert str(cache) in line
    assert len(load_done(str(tmp_path / "out"))) == 12  # nothing recorded for the cells that could not run


@pytest.mark.slow
def test_killed_dask_bench_resumes(data, cluster, tmp_path):
    root, a, b = data
    args = [
        *_args(root, a, b, seeds="0,1,2"),
        "--layers",
        "layer1,layer2,layer3,layer4,avgpool",
        "--scheduler",
        cluster.scheduler_address,
    ]
    out = tmp_path / "killed"
    sigkill_when([*args, "--out", out], lambda: cells_written(out) >= 10)
    done = len(load_done(str(out)))
    assert 10 <= done < 60, done
    r = run_cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"60 cells: {done} done before, {60 - done} to fit" in r.stderr
    ref = run_cli(*args[:-2], "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    assert csv_without_timing(out / "results.csv") == csv_without_timing(tmp_path / "ref" / "results.csv")


class _Server:
    """A TCP server on the loopback that is not Dask: 'http' answers requests as an HTTP server does,
    'silent' accepts and never speaks, 'banner' greets with text (as SSH does)."""

    def __init__(self, kind: str):
        import threading

        self.kind, self.sock = kind, socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"tcp://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            if self.kind == "banner":
                c.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            elif self.kind == "http":
                c.settimeout(5)
                try:
                    if c.recv(1024):
                        c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" * 3)
                except OSError:
                    pass

    def close(self):
        for c in [self.sock, *self.conns]:
            c.close()


@pytest.mark.parametrize("kind", ["http", "silent", "banner"])
def test_a_port_that_is_not_dask_is_one_line_within_the_connect_timeout(kind, data, tmp_path):
    import dask

    root, a, b = data
    server = _Server(kind)
    try:
        t0 = time.monotonic()
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            rc, _, err = cli(
                *_args(root, a, b),
                "--out",
                tmp_path / "out",
                "--cache-dir",
                tmp_path / "cache",
                "--scheduler",
                server.address,
            )
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    assert_one_line_error(rc, err, 1, (f"--scheduler {server.address}", "not a Dask scheduler", "port 8786"))
    assert "EiB" not in err and elapsed < 10, elapsed
    assert not os.path.exists(tmp_path / "cache")  # said before any extraction


def _start_cluster():
    """A scheduler and 2 one-thread workers in processes of their own (so that the test can kill the scheduler)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    sched = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        ],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    workers = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distributed.cli.dask_worker",
            address,
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--no-dashboard",
        ],
        stderr=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    return address, sched, workers


@pytest.mark.slow
def test_a_scheduler_that_dies_mid_grid_is_one_line_and_the_rerun_completes(data, tmp_path):
    import signal

    root, a, b = data
    address, sched, workers = _start_cluster()
    out = tmp_path / "out"
    args = [*_args(root, a, b, seeds="0,1,2"), "--layers", "layer1,layer2,layer3,layer4,avgpool"]
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "featx.cli", *args, "--out", str(out), "--scheduler", address, "-q"],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s"},
        )
        deadline = time.monotonic() + 240
        while cells_written(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        sched.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        assert time.monotonic() - t0 < 60
    finally:
        for p in (sched, workers):
            p.kill()
            p.wait()
    assert_one_line_error(
        proc.returncode,
        err,
        1,
        (f"--scheduler {address}", "lost the Dask scheduler mid-grid", "finished cells are kept", "rerun"),
        only_error_lines=True,  # tiny generated images are near-copies to a random network: a leakage warning too
    )
    done = len(load_done(str(out)))
    assert 3 <= done < 60, done
    r = run_cli(*args, "--out", str(out), "--scheduler", "local")
    assert r.returncode == 0, r.stderr
    assert f"60 cells: {done} done before, {60 - done} to fit" in r.stderr
