"""benchmarks/gpu_check.py: the dry run (every step on the CPU at toy sizes) is ok and writes its
report, and the step runner reports a failing step and a hung one instead of stopping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_dry_run_every_step_ok(tmp_path):
    out = tmp_path / "gc"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=500,
    )
    print(p.stdout)
    results = json.loads((out / "gpu_check.json").read_text())
    steps = {s["name"]: s for s in results["steps"]}
    assert list(steps) == [name for name, _, _ in gpu_check.STEPS]
    bad = {n: f"{s['status']}: {s.get('reason')}" for n, s in steps.items() if s["status"] != "ok"}
    assert not bad, f"{bad}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    assert p.returncode == 0
    for name, s in steps.items():  # correctness steps judged something; speed steps measured
        if s["kind"] == "correctness":
            assert s["checks"] and all(c["ok"] for c in s["checks"]), name
    for key in ("resnet50", "efficientnet_lite0", "vit_small"):
        d = steps[f"speed_{key}"]["data"]
        assert d["bare_forward"]["images_per_s"] > 0 and d["hand_loop"]["images_per_s"] > 0
        assert set(d["ratios"]) == {
            "limit_ratio_loop",
            "limit_ratio_e2e",
            "vs_hand_loop",
            "gpu_over_cpu_decode",
        }
    assert steps["solver_speed"]["targets"] and steps["torchrun"]["data"]["torchrun"]["rows"] > 0
    md = (out / "gpu_check.md").read_text()
    for heading in ("## Steps", "## Checks", "## Targets", "## Extraction speed", "## Solver"):
        assert heading in md
    for name in steps:
        assert f"| {name} |" in md
    assert (out / "logs" / "torchrun.log").is_file()


def _cfg(tmp_path) -> dict:
    cfg = {"out": str(tmp_path), "work": str(tmp_path / "work"), "sizes": {"threads": None}}
    (tmp_path / "work" / "steps").mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    return cfg


def _hang(rec, cfg):
    rec.set("before", 1)
    time.sleep(120)


def _boom(rec, cfg):
    rec.check("a bound", 2.0, 1.0)
    raise ValueError("broken\nsecond line")


def _miss(rec, cfg):
    rec.check("first", 0.5, 1.0)
    rec.check("second", 3.0, 1.0)


@pytest.mark.parametrize(
    "step, status, reason",
    [
        (_hang, "timed out", "no result within 3 s"),
        (_boom, "failed", "ValueError: broken"),
        (_miss, "failed", "second: 3.0 (bound <= 1.0)"),
    ],
)
def test_runner_reports_failures_and_timeouts(tmp_path, monkeypatch, step, status, reason):
    monkeypatch.setattr(gpu_check, "step_probe", step, raising=False)
    t = time.perf_counter()
    res = gpu_check.run_step("probe", "correctness", 3, _cfg(tmp_path))
    assert time.perf_counter() - t < 30
    assert res["status"] == status
    assert res["reason"].startswith(reason)
    if step is _hang:
        assert res["data"] == {"before": 1}  # what it measured before the timeout is kept
