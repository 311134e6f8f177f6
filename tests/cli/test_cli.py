"""The `featx` command as a user runs it: real processes, stdout/stderr contracts, exit codes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_images, run_cli, sigkill_when
from featx.store.codes import open_codes

TINY = ["--weights", "none", "--image-size", "32", "--workers", "0", "--batch-size", "4"]


def test_layers_table_and_json():
    r = run_cli("layers", "resnet18")
    assert r.returncode == 0, r.stderr
    assert "layer4" in r.stdout and "post-relu" in r.stdout and "layer1.0.conv1" not in r.stdout
    r = run_cli("layers", "resnet18", "--all", "--json", "--image-size", "64")
    info = json.loads(r.stdout)
    names = {t["name"]: t for t in info["layers"]}
    assert (
        "layer1.0.conv1" in names
        and names["layer3"]["shape"] == [256, 4, 4]
        and names["layer3"]["stride"] == 16
    )
    assert names["bn1"]["relu_by_default"] and not names["conv1"]["relu_by_default"]


def test_extract_prints_path_last_then_hits(image_folder, tmp_path):
    args = [
        "extract",
        "--model",
        "resnet18",
        "--data",
        str(image_folder),
        "--layers",
        "layer2,depth:1.0",
        *TINY,
    ]
    env = {"FEATX_CACHE_DIR": str(tmp_path / "c")}
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip().splitlines()[-1]
    assert path.startswith(str(tmp_path / "c")) and path.endswith(".h5") and os.path.isfile(path)
    assert "depth:1.0 -> avgpool" in r.stderr
    r2 = run_cli(*args, env=env)
    assert r2.returncode == 0 and r2.stdout.strip().splitlines()[-1] == path and "cache hit" in r2.stderr

    r = run_cli("info", path)
    assert (
        r.returncode == 0 and "layer2" in r.stdout and "avgpool" in r.stdout and "15 of 15 images" in r.stdout
    )
    info = json.loads(run_cli("info", path, "--json").stdout)
    assert info["state"] == "complete" and {ly["name"] for ly in info["layers"]} == {"layer2", "avgpool"}

    r = run_cli("cache", "ls", "--cache-dir", str(tmp_path / "c"))
    assert os.path.basename(path) in r.stdout and "complete" in r.stdout
    key = os.path.basename(path).split("--")[-1][:8]
    r = run_cli("cache", "rm", key, "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 0 and not os.path.exists(path)


def test_default_cache_is_cwd_cache(image_folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FEATX_CACHE_DIR"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "featx.cli",
            "-q",
            "extract",
            "--model",
            "resnet18",
            "--data",
            str(image_folder),
            "--layers",
            "layer1",
            *TINY,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(tmp_path / "cache"))


@pytest.mark.parametrize(
    "args,needle",
    [
        (
            ["extract", "--model", "resnet18", "--data", "DATA", "--layers", "layer9"],
            "unknown layer 'layer9'",
        ),
        (["extract", "--model", "resnt18", "--data", "DATA"], "not a torchvision classification model"),
        (["extract", "--model", "resnet18", "--data", "DATA", "--pool", "sum"], "--pool"),
        (["extract", "--model", "resnet18", "--data", "/no/such/dir"], "no such file or folder"),
        (
            ["extract", "--model", "resnet18", "--data", "DATA", "--per-class-limit", "lots"],
            "--per-class-limit",
        ),
        (["extract", "--model", "resnet18", "--data", "DATA", "--batch-size", "0"], "--batch-size"),
        (["extract", "--model", "resnet18", "--data", "DATA", "--weights", "IMAGENET9K"], "IMAGENET1K_V1"),
        (["extract", "--data", "DATA"], "--model"),
        (["layers", "timm:nope_net"], "timm has no model"),
        (["info", "/no/such.h5"], "no such file"),
        (["cache", "rm", "zzzz", "--cache-dir", "CACHE"], "matches no entry"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line_exit_2(image_folder, tmp_path, args, needle):
    args = [a.replace("DATA", str(image_folder)).replace("CACHE", str(tmp_path)) for a in args]
    r = run_cli(*args, env={"FEATX_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("featx") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def _progress(entry: str) -> int:
    try:
        with open(entry + ".partial/progress.json") as f:
            return json.load(f)["samples_done"]
    except (OSError, ValueError):
        return 0


def test_sigkill_then_resume_gives_identical_file(tmp_path):
    data = make_images(tmp_path / "d", per_class=40, size=(64, 64))
    args = [
        "extract",
        "--model",
        "resnet50",
        "--data",
        str(data),
        "--layers",
        "layer2,layer4,fc",
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
    cache = tmp_path / "c"
    entry = str(cache / os.path.basename(ref_path))
    sigkill_when([*args, cache], lambda: _progress(entry) >= 16)
    assert not os.path.exists(entry), "the run finished before it could be killed"
    done = _progress(entry)
    assert 16 <= done < 120
    r = run_cli(*args, str(cache))
    assert r.returncode == 0, r.stderr
    assert f"resuming {os.path.basename(entry)} at image {done}" in r.stderr
    with open_codes(ref_path) as a, open_codes(entry) as b:
        assert a.paths == b.paths and len(b) == 120
        for n in a.layers:
            np.testing.assert_array_equal(a.codes(n), b.codes(n))


def test_two_processes_same_entry(tmp_path):
    data = make_images(tmp_path / "d", per_class=20, size=(48, 48))
    args = [
        sys.executable,
        "-m",
        "featx.cli",
        "extract",
        "--model",
        "resnet50",
        "--data",
        str(data),
        "--layers",
        "layer3",
        "--weights",
        "none",
        "--image-size",
        "48",
        "--workers",
        "0",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert sum("cache hit" in err for _, err in outs) >= 1
    with open_codes(outs[0][0].strip()) as f:
        assert len(f) == 60 and np.isfinite(f.codes("layer3")).all()
