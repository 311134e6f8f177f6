#!/usr/bin/env python
"""How close is `featx extract` to the speed limit of the network's own forward pass?

Runs, each in its own subprocess (so peak RSS is that method's own, and no method inherits
another's warm caches, threads or allocator state), on the same images, model, layer, batch size,
input size and device:

  limit          bare forward of the model exactly as featx's CodeComputer runs it (eval,
                 channels_last, featx's precision/autocast for the device, inference_mode, the
                 Tapper hooks with early stop) on random uint8 images normalized once, in memory
  codecomputer   featx's CodeComputer called on in-memory uint8 batches (the limit plus the
                 on-device normalize and the copy of the codes to numpy)
  limit-5taps    the limit with the 5 layers of featx-5taps hooked
  naive-fp32     plain `model(x)` on contiguous fp32 tensors under torch.no_grad
  featx          end-to-end `featx.extract(...)` from the JPEG files to a complete HDF5 file in a
                 fresh temporary cache; images/s = images / seconds of the whole call
  featx-5taps    the same with 5 layers (resnets: layer1,layer2,layer3,layer4,avgpool)
  featx-quarter  featx on the first quarter of the images (peak RSS must not grow with N)
  hand-loop      torchvision ImageFolder + DataLoader (defaults) + create_feature_extractor +
                 numpy.save per batch, as people write it by hand
  decode         (info) one process decoding + resizing the images: featx's ImageSequence path
                 and the hand loop's torchvision-transforms path, no forward
  thingsvision   thingsvision's extractor through /work/tv-venv/bin/python, when that venv exists
  variants       (not run by default) the forward at fp32 contiguous / channels_last / bf16 / fp16

A method may take options after colons, e.g. `featx:workers=0`, `featx:workers=2:threads=1`,
`limit:threads=1` (threads = torch.set_num_threads in that subprocess, workers = featx's data
loader processes).

    python benchmarks/extract_speed.py --limit 512
    python benchmarks/extract_speed.py --limit 512 --methods limit,featx,featx:workers=0,hand-loop
    python benchmarks/extract_speed.py --device cuda --batch-size 64 --repeats 3

Absolute numbers on a shared machine are noisy: compare ratios taken in one run. With --repeats R
the methods run R times, interleaved (all methods, then all again), and the median is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULT_TAG = "@@featx-bench@@ "
DEFAULT_METHODS = (
    "limit,codecomputer,limit-5taps,naive-fp32,featx,featx-5taps,featx-quarter,hand-loop,decode,thingsvision"
)
TV_PYTHON = "/work/tv-venv/bin/python"
FIVE_TAPS = {
    "resnet18": "layer1,layer2,layer3,layer4,avgpool",
    "resnet34": "layer1,layer2,layer3,layer4,avgpool",
    "resnet50": "layer1,layer2,layer3,layer4,avgpool",
    "resnet101": "layer1,layer2,layer3,layer4,avgpool",
}
LAST_TAP = {"resnet18": "avgpool", "resnet34": "avgpool", "resnet50": "avgpool", "resnet101": "avgpool"}


# =============================================================================================
# parent: data selection, subprocesses, the table
# =============================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--data",
        default="../shared/datasets/flowers5_128",
        help="image folder (CLASS/image or SPLIT/CLASS/image); relative paths are relative to the repo root",
    )
    p.add_argument("--model", default="resnet18")
    p.add_argument(
        "--weights", default="none", help="featx weights spec (none: random init, seeded by featx)"
    )
    p.add_argument(
        "--layer", default=None, help="the last layer (default: avgpool for resnets, else depth:1.0)"
    )
    p.add_argument(
        "--layers5", default=None, help="5 layers for featx-5taps (default: resnet stages + avgpool)"
    )
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N images (round-robin over classes)"
    )
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list (default: {DEFAULT_METHODS})")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of every method, interleaved; the median is reported"
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds inside the in-memory methods (median)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in every subprocess (default: torch's)",
    )
    p.add_argument("--workers", default="auto", help="featx data-loader workers for the featx methods (auto)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per method subprocess")
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.3,
        help="rerun a method (up to --retries times) when other processes kept more than this many "
        "cores busy during it; before each method, wait up to --quiet-wait s for a quiet machine",
    )
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--quiet-wait", type=float, default=15.0)
    p.add_argument(
        "--precision", default="auto", help="featx's --precision for limit/codecomputer/featx methods (auto)"
    )
    p.add_argument("--channels-last", default="auto", help="featx's --channels-last for those methods (auto)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    p.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (codes, npy files, symlink tree)"
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def list_images(root: str) -> list[tuple[str, str]]:
    """(class, path) of the images under `root`, with featx's own listing (same files, same order)."""
    sys.path.insert(0, REPO)
    from featx.settings import DataOptions
    from featx.sources.spec import open_source

    ds = open_source(root, DataOptions())
    paths = ds.loader.paths if hasattr(ds.loader, "paths") else None
    if paths is None:
        raise SystemExit(f"--data {root}: the benchmark needs an image folder")
    return [(ds.classes[int(lab)], p) for lab, p in zip(ds.labels, paths)]


def select(images: list[tuple[str, str]], limit: int | None) -> list[tuple[str, str]]:
    """The first `limit` images, taken round-robin over classes (each class in featx's order)."""
    if not limit or limit >= len(images):
        return images
    by_class: dict[str, list] = {}
    for c, p in images:
        by_class.setdefault(c, []).append(p)
    out, k = [], 0
    while len(out) < limit:
        for c in sorted(by_class):
            if k < len(by_class[c]) and len(out) < limit:
                out.append((c, by_class[c][k]))
        k += 1
    return out


def build_tree(images: list[tuple[str, str]], dest: str) -> None:
    """A plain ImageFolder of symlinks (dest/CLASS/file) that featx, torchvision and thingsvision all read."""
    for c, p in images:
        d = os.path.join(dest, c)
        os.makedirs(d, exist_ok=True)
        name = os.path.basename(p)
        target = os.path.join(d, name)
        k = 1
        while os.path.lexists(target):
            stem, ext = os.path.splitext(name)
            target, k = os.path.join(d, f"{stem}_{k}{ext}"), k + 1
        os.symlink(os.path.abspath(p), target)


def warm_page_cache(images) -> int:
    n = 0
    for _, p in images:
        with open(p, "rb") as f:
            n += len(f.read())
    return n


def parse_method(text: str) -> tuple[str, dict]:
    name, *opts = text.strip().split(":")
    kw = {}
    for o in opts:
        k, _, v = o.partition("=")
        kw[k.strip()] = v.strip()
    return name, kw


def run_child(method: str, spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method, "--spec", json.dumps(spec)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not method.startswith(("hand-loop", "naive", "thingsvision")):
        # what the featx CLI sets before torch loads (featx/cli.py); the hand-written baselines keep the defaults
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {timeout:.0f}s"}
    found = [line[len(RESULT_TAG) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        return {"method": method, "error": f"exit {proc.returncode}: {tail}"}
    out = json.loads(found[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def wait_quiet(threshold: float, timeout: float) -> float:
    """Wait (at most `timeout` s) until the machine's busy cores over 1 s are below `threshold`."""
    end = time.monotonic() + timeout
    while True:
        b, t = _busy_jiffies(), time.monotonic()
        time.sleep(1.0)
        load = (_busy_jiffies() - b) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - t)
        if load < threshold or time.monotonic() > end:
            return load


def median_result(runs: list[dict], max_other_load: float = math.inf) -> dict:
    ok = [r for r in runs if "error" not in r and "unavailable" not in r]
    if not ok:
        return runs[-1]
    quiet = [r for r in ok if r.get("foreign_cores", 0.0) <= max_other_load]
    ok = quiet or ok  # runs disturbed by other processes count only when no quiet run exists
    ok.sort(key=lambda r: r.get("images_per_s", 0.0))
    med = dict(ok[(len(ok) - 1) // 2])
    med["all_images_per_s"] = [r.get("images_per_s") for r in ok]
    med["peak_rss_mib"] = max(r.get("peak_rss_mib", 0) for r in ok)
    med["children_rss_mib"] = max(r.get("children_rss_mib", 0) for r in ok)
    return med


def fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, json.loads(args.spec))
    data = args.data if os.path.isabs(args.data) else os.path.join(REPO, args.data)
    if not os.path.isdir(data):
        raise SystemExit(f"--data {args.data}: no such folder ({data})")
    layer = args.layer or LAST_TAP.get(args.model, "depth:1.0")
    layers5 = args.layers5 or FIVE_TAPS.get(args.model, "depth:0.2,0.4,0.6,0.8,1.0")
    methods = [m for m in (x.strip() for x in args.methods.split(",")) if m]

    tmp = tempfile.mkdtemp(prefix="featx-bench-")
    try:
        images = select(list_images(data), args.limit)
        tree = os.path.join(tmp, "data", os.path.basename(os.path.normpath(data)))
        build_tree(images, tree)
        quarter = os.path.join(tmp, "data-quarter", os.path.basename(os.path.normpath(data)))
        build_tree(select(images, max(1, len(images) // 4)), quarter)
        nbytes = warm_page_cache(images)
        n_classes = len({c for c, _ in images})
        print(
            f"featx speed benchmark: {len(images)} images ({nbytes / 2**20:.1f} MiB of files, {n_classes} classes) "
            f"from {data}; {args.model} weights={args.weights} at {args.image_size}px, batch {args.batch_size}, "
            f"device {args.device}, last layer {layer}, 5 taps {layers5}",
            flush=True,
        )
        base = {
            "data": tree,
            "quarter": quarter,
            "n": len(images),
            "model": args.model,
            "weights": args.weights,
            "layer": layer,
            "layers5": layers5,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "device": args.device,
            "rounds": args.rounds,
            "threads": args.threads,
            "workers": args.workers,
            "precision": args.precision,
            "channels_last": args.channels_last,
            "tmp": tmp,
        }
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeats):
            for m in methods:
                name, kw = parse_method(m)
                spec = dict(base, method=name, options=kw, rep=rep)
                tries = []
                for _ in range(1 + max(0, args.retries)):
                    if args.quiet_wait > 0:
                        wait_quiet(args.max_other_load, args.quiet_wait)
                    tries.append(run_child(m, spec, args.timeout))
                    if tries[-1].get("foreign_cores", 0.0) <= args.max_other_load:
                        break
                r = min(tries, key=lambda x: x.get("foreign_cores", 0.0))
                r["method"], r["rep"], r["tries"] = m, rep, len(tries)
                runs[m].append(r)
                msg = r.get("error") or r.get("unavailable") or f"{r.get('images_per_s', 0):.1f} images/s"
                load = f", other load {r['foreign_cores']:.2f}" if "foreign_cores" in r else ""
                print(
                    f"  [{rep + 1}/{args.repeats}] {m:<28} {msg}  ({r.get('wall_s', 0):.0f}s{load}, "
                    f"{len(tries)} tr{'y' if len(tries) == 1 else 'ies'})",
                    flush=True,
                )
        results = {m: median_result(rs, args.max_other_load) for m, rs in runs.items()}
        report(results, args, len(images))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"args": vars(args), "n": len(images), "results": results, "runs": runs}, f, indent=1
                )
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict, args, n: int) -> None:
    def ips(m):
        r = results.get(m)
        return r.get("images_per_s") if r and "error" not in r and "unavailable" not in r else None

    limit, hand = ips("limit"), ips("hand-loop")
    print()
    print(
        f"{'method':<24} {'images/s':>9} {'/limit':>7} {'/hand-loop':>10} {'peak RSS MiB':>12} {'+workers':>8} "
        f"{'cpu ms/img':>10} {'other load':>10}  notes"
    )
    print("-" * 120)
    for m, r in results.items():
        if "error" in r or "unavailable" in r:
            why = r.get("error") or r.get("unavailable")
            print(
                f"{m:<24} {'-':>9} {'-':>7} {'-':>10} {'-':>12} {'-':>8} {'-':>10} {'-':>10}  {why.splitlines()[-1][:100]}"
            )
            continue
        v = r.get("images_per_s")
        note = r.get("note", "")
        print(
            f"{m:<24} {fmt(v):>9} {fmt(v / limit if v and limit else None, '.2f'):>7} "
            f"{fmt(v / hand if v and hand else None, '.2f'):>10} {fmt(r.get('peak_rss_mib'), '.0f'):>12} "
            f"{fmt(r.get('children_rss_mib') or None, '.0f'):>8} {fmt(r.get('cpu_ms_per_image')):>10} "
            f"{fmt(r.get('foreign_cores'), '.2f'):>10}  {note}"
        )
    print("-" * 120)
    print(
        f"images/s: median of {args.repeats} run(s) (of the quiet ones, when any). peak RSS: ru_maxrss of the method's process; +workers: the "
        f"largest reaped child (a data-loader worker). cpu ms/img: CPU time of the method's process tree per image. "
        f"other load: cores busy with other processes meanwhile (noise: ratios are unreliable when it is high)."
    )

    lines = []
    fx, fx5 = ips("featx"), ips("featx-5taps")
    if fx and fx5:
        lines.append(
            f"multi-tap cost, end to end: featx-5taps takes {fx / fx5:.3f}x the time of featx (target <= 1.1)"
        )
    l5 = ips("limit-5taps")
    if limit and l5:
        lines.append(
            f"multi-tap cost, forward only: limit-5taps takes {limit / l5:.3f}x the time of limit (target <= 1.1)"
        )
    naive = ips("naive-fp32")
    if limit and naive:
        lines.append(
            f"featx's forward vs naive fp32: {limit / naive:.3f}x (limit {limit:.1f} vs naive {naive:.1f} img/s; target >= 1)"
        )
    cc = ips("codecomputer")
    if limit and cc:
        lines.append(
            f"CodeComputer on in-memory uint8 (normalize + forward + codes to numpy): {cc / limit:.3f}x the limit"
        )
    if fx and limit:
        lines.append(f"limit ratio: featx end to end / bare forward = {fx / limit:.3f} (target >= 0.9)")
    if fx and hand:
        lines.append(f"featx vs hand-written loop: {fx / hand:.2f}x (target >= 1.2 on CPU, >= 3 on GPU)")
    if hand and naive:
        lines.append(f"hand-written loop / naive fp32 forward: {hand / naive:.3f}")
    for m in [k for k in results if k.startswith("featx")]:
        r = results.get(m)
        if not r or "error" in r or "unavailable" in r:
            continue
        io = r.get("io", {}) if m in ("featx", "featx-5taps") else {}
        if io:
            lines.append(
                f"{m}: codes written {io['code_bytes_per_image']:.0f} B/image (dims {io['dims']} x {io['itemsize']} B = "
                f"{io['expected_bytes_per_image']} B; {'OK' if io['code_bytes_per_image'] == io['expected_bytes_per_image'] else 'MISMATCH'}); "
                f"journal index +{io['index_bytes_per_image']:.0f} B/image, progress.json {io['progress_bytes_per_image']:.1f} B/image; "
                f"all write() bytes {io['wchar_per_image']:.0f} B/image; HDF5 file {io['h5_bytes_per_image']:.0f} B/image"
            )
        for name, c in (r.get("compression", {}) if io else {}).items():
            lines.append(
                f"{m}: /codes/{name} gzip+shuffle stores {c['stored']} of {c['raw']} raw bytes: "
                f"ratio {c['ratio']:.2f}x ({c['zero_fraction']:.1%} zeros in the ReLU'd codes)"
            )
        ph = r.get("phases")
        if ph:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in ph.items() if v >= 0.005)
            lines.append(f"{m}: where the {r['seconds']:.2f}s go: {parts}")
    q, f1 = results.get("featx-quarter"), results.get("featx")
    if q and f1 and "error" not in q and "error" not in f1:
        lines.append(
            f"memory vs dataset size: featx peak RSS {f1['peak_rss_mib']:.0f} MiB for {n} images, "
            f"{q['peak_rss_mib']:.0f} MiB for {q.get('images')} (bounded if about equal)"
        )
    d = results.get("decode")
    if d and "error" not in d:
        lines.append(
            f"decode+resize in one process (torch threads 1): featx path {d['featx_path_ips']:.0f} img/s, "
            f"torchvision-transforms path {d['tv_path_ips']:.0f} img/s, PIL open+load only {d['pil_only_ips']:.0f} img/s"
        )
    v = results.get("variants")
    if v and "error" not in v:
        lines.append(
            "forward variants: " + ", ".join(f"{k} {x:.1f}" for k, x in v["variants"].items()) + " img/s"
        )
    for line in lines:
        print(line)


# =============================================================================================
# children: one method each; print one JSON line tagged RESULT_TAG
# =============================================================================================


def rss() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return me, kids


def wchar() -> int:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _busy_jiffies() -> int:
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4]  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        return 0


class Meter:
    """Wall seconds, this process tree's CPU seconds (reaped children included) and the CPU that
    other processes on the machine used meanwhile (in cores), over the timed region."""

    def __enter__(self):
        self.t, self.c, self.b = time.perf_counter(), self._cpu(), _busy_jiffies()
        return self

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.cpu = self._cpu() - self.c
        busy = (_busy_jiffies() - self.b) / os.sysconf("SC_CLK_TCK")
        self.foreign = max(0.0, (busy - self.cpu) / max(self.wall, 1e-9))

    def stats(self, images: int) -> dict:
        return {
            "cpu_ms_per_image": 1000 * self.cpu / max(1, images),
            "foreign_cores": self.foreign,
            "cores_used": self.cpu / max(self.wall, 1e-9),
        }


def child_main(method: str, spec: dict) -> int:
    sys.path.insert(0, REPO)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    t = time.perf_counter()
    import torch
    import torchvision  # noqa: F401  (imported before any timing, for every method alike)

    import_s = time.perf_counter() - t
    threads = spec["options"].get("threads") or spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    name = spec["method"]
    fn = {
        "limit": m_limit,
        "codecomputer": m_limit,
        "limit-5taps": m_limit,
        "naive-fp32": m_naive,
        "featx": m_featx,
        "featx-5taps": m_featx,
        "featx-quarter": m_featx,
        "hand-loop": m_hand,
        "thingsvision": m_thingsvision,
        "decode": m_decode,
        "variants": m_variants,
    }.get(name)
    if fn is None:
        raise SystemExit(f"unknown method {name!r}")
    out = fn(spec)
    out.setdefault("method", method)
    out["torch_threads"] = torch.get_num_threads()
    out["import_torch_torchvision_s"] = import_s
    me, kids = rss()
    out["peak_rss_mib"], out["children_rss_mib"] = me, kids
    if "tv_rss_mib" in out:  # thingsvision ran in its own venv's process: that is the method's RSS
        out["peak_rss_mib"], out["children_rss_mib"] = out["tv_rss_mib"], 0.0
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


def _fx():
    """featx's compute engine (featx/engine.py)."""
    import importlib

    return importlib.import_module("featx.engine.compute")


def _device(spec):
    return _fx().resolve_device(spec["device"])


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def featx_setup(spec, layers: str):
    """featx's own plan, device decisions and model, exactly as `featx.extract` makes them."""
    from types import SimpleNamespace

    from featx.models.plan import resolve
    from featx.settings import CodeSettings, ModelSettings

    fx = _fx()
    plan = resolve(ModelSettings(spec["model"], spec["weights"], spec["image_size"]), CodeSettings(layers))
    dev = fx.resolve_device(spec["device"])
    precision = spec["options"].get("precision", spec.get("precision", "auto"))
    precision = fx.decide_precision(precision, plan.model, dev, plan.preprocess.crop_size)
    backbone, plan = fx.load_backbone(plan)
    setup = SimpleNamespace(
        activations=plan.activations,
        pool=plan.pool,
        preprocess=plan.preprocess,
        layers=plan.layers,
        model=plan.model,
        device=dev,
        precision=precision,
    )
    return setup, backbone, plan.chosen


def time_rounds(step, n_batches: int, rounds: int, dev, warmup: int = 2) -> list[float]:
    """Seconds per round of `n_batches` calls of `step`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    _sync(dev)
    out = []
    with Meter() as meter:
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n_batches):
                step()
            _sync(dev)
            out.append(time.perf_counter() - t)
    time_rounds.meter = meter
    return out


def _n_batches(spec) -> int:
    return max(3, min(16, math.ceil(spec["n"] / spec["batch_size"])))


def _rate(spec, secs: list[float], n_batches: int) -> dict:
    per = [n_batches * spec["batch_size"] / s for s in secs]
    meter = time_rounds.meter
    return {
        "images_per_s": statistics.median(per),
        "rounds_images_per_s": per,
        **meter.stats(n_batches * spec["batch_size"] * len(secs)),
    }


def m_limit(spec) -> dict:
    import torch

    CodeComputer = _fx().CodeComputer

    name = spec["method"]
    layers = spec["layers5"] if name == "limit-5taps" else spec["layer"]
    plan, backbone, chosen = featx_setup(spec, layers)
    dev = plan.device
    cl = spec["options"].get("channels_last", spec.get("channels_last", "auto")) in ("auto", "on")
    computer = CodeComputer(
        backbone.module,
        chosen,
        plan.activations,
        plan.pool,
        plan.preprocess,
        dev,
        plan.precision,
        channels_last=cl,
    )
    bs, s = spec["batch_size"], plan.preprocess.crop_size
    g = torch.Generator().manual_seed(0)
    u8 = [torch.randint(0, 256, (bs, 3, s, s), dtype=torch.uint8, generator=g) for _ in range(2)]
    nb = _n_batches(spec)
    k = [0]
    if name == "codecomputer":  # uint8 on the host in, numpy codes out: what the loop calls per batch

        def step():
            k[0] += 1
            computer(u8[k[0] % 2])

        note = f"CodeComputer(uint8 batch), {plan.precision}: normalize + forward + codes to numpy"
    else:
        with torch.inference_mode():
            fmt_ = torch.channels_last if cl else torch.contiguous_format
            xs = [plan.preprocess.normalize(u.to(dev)).contiguous(memory_format=fmt_) for u in u8]
        amp = computer.amp

        def step():
            k[0] += 1
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                computer._tapper(xs[k[0] % 2])

        note = f"{plan.precision}, {'channels_last' if cl else 'contiguous'}, Tapper({','.join(plan.layers)})"
    rate = float(spec["options"].get("decode_rate", 0))
    paced = _PacedDecoder(spec, plan.preprocess, rate) if rate else None
    secs = time_rounds(step, nb, spec["rounds"], dev)
    computer.close()
    if paced:
        note += f", beside a process decoding {paced.stop()}"
    return {**_rate(spec, secs, nb), "note": note, "precision": plan.precision, "device": str(dev)}


class _PacedDecoder:
    """A process that decodes and resizes the dataset's images at `rate` images/s, as featx's
    data-loader worker does during extraction: `limit:decode_rate=R` measures how much the bare
    forward loses to that work alone, with nothing else of featx's loop around it."""

    def __init__(self, spec, preprocess, rate: float):
        import multiprocessing as mp

        ctx = mp.get_context("fork")  # as torch's DataLoader workers start
        self.stop_event, self.result = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=self._run, args=(spec["data"], preprocess, rate), daemon=True)
        self.proc.start()

    def _run(self, data, preprocess, rate):
        import torch

        from featx.sources.spec import open_source

        torch.set_num_threads(1)  # as in a DataLoader worker
        seq = _fx().ImageSequence(open_source(data).load, len(open_source(data)), preprocess)
        t0, n, cpu0 = time.perf_counter(), 0, time.process_time()
        while not self.stop_event.is_set():
            seq[n % len(seq)]
            n += 1
            lag = t0 + n / rate - time.perf_counter()
            if lag > 0:
                time.sleep(lag)
        wall = time.perf_counter() - t0
        self.result.put((n / wall, (time.process_time() - cpu0) / wall))

    def stop(self) -> str:
        self.stop_event.set()
        got, busy = self.result.get(timeout=60)
        self.proc.join()
        return f"{got:.0f} img/s ({busy:.2f} core)"


def _plain_model_and_batches(spec, dev, n: int):
    """The bare torchvision/timm module in eval mode on `dev`, and `n` normalized random batches."""
    import torch

    from featx.models.build import load_model

    backbone = load_model(spec["model"], spec["weights"], image_size=spec["image_size"])
    pre = backbone.preprocess
    bs, s = spec["batch_size"], pre.crop_size
    g = torch.Generator().manual_seed(0)
    xs = [
        pre.normalize(torch.randint(0, 256, (bs, 3, s, s), dtype=torch.uint8, generator=g)).to(dev)
        for _ in range(n)
    ]
    return backbone.module.to(dev).eval(), xs


def m_naive(spec) -> dict:
    import torch

    dev = _device(spec)
    model, xs = _plain_model_and_batches(spec, dev, 2)
    nb = _n_batches(spec)
    k = [0]

    def step():
        k[0] += 1
        with torch.no_grad():
            model(xs[k[0] % 2])

    secs = time_rounds(step, nb, spec["rounds"], dev)
    return {**_rate(spec, secs, nb), "note": "model(x), fp32 contiguous, no_grad, whole network"}


def _instrument(io: dict):
    """What featx's timing hook (`featx.engine.compute.Timings`, passed to `extract`) does not see: the
    bytes of each progress commit and the fsync calls per thread (a few perf_counter calls each)."""
    import featx.store.journal as fs
    from featx.engine.compute import Timings

    timings = Timings()
    orig_commit = getattr(fs.Journal, "_commit_progress", None)
    if orig_commit is not None:  # informational only: skipped if the journal changes shape

        def commit(self):
            orig_commit(self)
            with open(os.path.join(self.path, "progress.json"), "rb") as f:
                io["progress_bytes"] = io.get("progress_bytes", 0) + len(f.read())

        fs.Journal._commit_progress = commit
    orig_fsync = os.fsync

    def fsync(fd):
        t = time.perf_counter()
        try:
            return orig_fsync(fd)
        finally:
            timings.add(f"[{threading.current_thread().name}] fsync", time.perf_counter() - t)

    os.fsync = fsync
    return timings


def m_featx(spec) -> dict:
    import h5py
    import numpy as np

    import featx

    name = spec["method"]
    layers = spec["layers5"] if name == "featx-5taps" else spec["layer"]
    data = spec["quarter"] if name == "featx-quarter" else spec["data"]
    opts = spec["options"]
    workers = opts.get("workers", spec["workers"])
    workers = workers if workers == "auto" else int(workers)
    cache = tempfile.mkdtemp(prefix="cache-", dir=spec["tmp"])
    io = {}
    timings = _instrument(io)
    w0 = wchar()
    with Meter() as meter:
        res = featx.extract(
            spec["model"],
            data,
            layers,
            weights=spec["weights"],
            pool="avg",
            image_size=spec["image_size"],
            cache_dir=cache,
            device=spec["device"],
            batch_size=spec["batch_size"],
            workers=workers,
            precision=opts.get("precision", spec.get("precision", "auto")),
            channels_last=opts.get("channels_last", spec.get("channels_last", "auto")),
            timings=timings,
        )
    io.update(timings.counts)
    secs = meter.wall
    written = wchar() - w0
    n = res.samples
    out = {"images_per_s": n / secs, "seconds": secs, "images": n, "layers": res.layers, **meter.stats(n)}
    comp = {}
    with h5py.File(res.path, "r") as f:
        dims = {k: int(f["codes"][k].shape[1]) for k in res.layers}
        itemsize = f["codes"][res.layers[0]].dtype.itemsize
        for k in res.layers:
            d = f["codes"][k]
            raw = int(d.shape[0] * d.shape[1] * d.dtype.itemsize)
            stored = int(d.id.get_storage_size())
            x = d[:]
            comp[k] = {
                "raw": raw,
                "stored": stored,
                "ratio": raw / max(1, stored),
                "zero_fraction": float(np.mean(x == 0)),
                "chunks": list(d.chunks or []),
            }
        attrs = {
            k: (f.attrs[k].item() if hasattr(f.attrs[k], "item") else f.attrs[k])
            for k in ("workers", "batch_size", "precision", "device", "channels_last")
        }
    h5size = os.path.getsize(res.path)
    out["compression"] = comp
    out["io"] = {
        "dims": "+".join(str(dims[k]) for k in res.layers),
        "itemsize": itemsize,
        "expected_bytes_per_image": sum(dims.values()) * itemsize,
        "code_bytes_per_image": io.get("code_bytes", 0) / max(1, res.rows),
        "index_bytes_per_image": io.get("index_bytes", 0) / max(1, res.rows),
        "progress_bytes_per_image": io.get("progress_bytes", 0) / max(1, res.rows),
        "wchar_per_image": written / max(1, n),
        "h5_bytes_per_image": h5size / max(1, res.rows),
        "appends": io.get("appends", 0),
    }
    phases = {k: v for k, v in sorted(timings.seconds.items(), key=lambda kv: -kv[1])}
    out["phases"] = phases
    out["attrs"] = attrs
    out["note"] = (
        f"workers={attrs['workers']} {attrs['precision']} cl={attrs['channels_last']}, {len(res.layers)} tap(s)"
    )
    shutil.rmtree(cache, ignore_errors=True)
    return out


def _hand_transform(pre):
    from torchvision import transforms as T

    interp = T.InterpolationMode(pre.interpolation)
    return T.Compose(
        [
            T.Resize(pre.resize_size, interpolation=interp),
            T.CenterCrop(pre.crop_size),
            T.ToTensor(),
            T.Normalize(mean=pre.mean, std=pre.std),
        ]
    )


def m_hand(spec) -> dict:
    """What people write by hand (the timing starts at building the model, like featx's does)."""
    import numpy as np
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.models.feature_extraction import create_feature_extractor

    from featx.models.build import load_model

    # the same input sizes as featx uses (featx's Preprocess, read from the weights)
    pre = load_model(spec["model"], "none", image_size=spec["image_size"]).preprocess
    layer = spec["layer"]
    if layer.startswith("depth:"):
        return {"unavailable": "hand-loop needs a module name for --layer"}
    out_dir = tempfile.mkdtemp(prefix="hand-", dir=spec["tmp"])
    dev = torch.device(
        "cuda"
        if spec["device"] == "auto" and torch.cuda.is_available()
        else ("cpu" if spec["device"] == "auto" else spec["device"])
    )
    meter = Meter().__enter__()
    weights = None if spec["weights"].lower() == "none" else spec["weights"]
    model = torchvision.models.get_model(spec["model"], weights=weights).eval().to(dev)
    extractor = create_feature_extractor(model, return_nodes=[layer])
    dataset = ImageFolder(spec["data"], transform=_hand_transform(pre))
    loader = DataLoader(dataset, batch_size=spec["batch_size"])
    n = 0
    with torch.no_grad():
        for i, (x, _y) in enumerate(loader):
            feats = extractor(x.to(dev))[layer].flatten(1).cpu().numpy()
            np.save(os.path.join(out_dir, f"batch_{i:05d}.npy"), feats)
            n += len(x)
    meter.__exit__(None, None, None)
    secs = meter.wall
    shutil.rmtree(out_dir, ignore_errors=True)
    return {
        "images_per_s": n / secs,
        "seconds": secs,
        "images": n,
        **meter.stats(n),
        "note": "ImageFolder + DataLoader(defaults) + create_feature_extractor + np.save",
    }


def m_decode(spec) -> dict:
    """Single-process decode + resize throughput (what one data-loader worker can supply)."""
    import torch
    from PIL import Image

    from featx.models.build import load_model
    from featx.sources.spec import open_source

    ImageSequence = _fx().ImageSequence
    torch.set_num_threads(1)  # as in a DataLoader worker
    pre = load_model(spec["model"], "none", image_size=spec["image_size"]).preprocess
    ds = open_source(spec["data"])
    seq = ImageSequence(ds.load, len(ds), pre)
    n = len(ds)
    t = time.perf_counter()
    for k in range(n):
        seq[k]
    featx_s = time.perf_counter() - t
    tf = _hand_transform(pre)
    paths = ds.loader.paths
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f:
            tf(Image.open(f).convert("RGB"))
    tv_s = time.perf_counter() - t
    t = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.load()
    pil_s = time.perf_counter() - t
    return {
        "images_per_s": n / featx_s,
        "featx_path_ips": n / featx_s,
        "tv_path_ips": n / tv_s,
        "pil_only_ips": n / pil_s,
        "note": "one process, no forward: featx ImageSequence decode+resize",
    }


def m_variants(spec) -> dict:
    """The forward at several precisions / memory formats, to choose per device by measurement."""
    import torch

    dev = _device(spec)
    model, (x,) = _plain_model_and_batches(spec, dev, 1)
    nb = max(2, _n_batches(spec) // 2)
    out = {}
    cases = [("fp32", False, None), ("fp32-cl", True, None), ("bf16-cl", True, torch.bfloat16)]
    if dev.type == "cuda":
        cases += [("fp16-cl", True, torch.float16), ("bf16", False, torch.bfloat16)]
    for label, cl, amp in cases:
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()

        def step(m=m, xi=xi, amp=amp):
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                m(xi)

        secs = time_rounds(step, nb, max(1, spec["rounds"] - 1), dev, warmup=1)
        out[label] = nb * spec["batch_size"] / statistics.median(secs)
    best = max(out, key=out.get)
    return {"images_per_s": out[best], "variants": out, "note": f"best: {best}"}


def m_thingsvision(spec) -> dict:
    if not os.path.exists(TV_PYTHON):
        return {
            "unavailable": f"no {TV_PYTHON}: create it with `python3 -m venv /work/tv-venv && "
            f"/work/tv-venv/bin/pip install thingsvision` (see benchmarks/README.md)"
        }
    check = subprocess.run([TV_PYTHON, "-c", "import thingsvision"], capture_output=True, text=True)
    if check.returncode != 0:
        return {
            "unavailable": f"{TV_PYTHON} cannot import thingsvision: {check.stderr.strip().splitlines()[-1:]}"
        }
    from featx.models.build import load_model

    pre = load_model(spec["model"], "none", image_size=spec["image_size"]).preprocess
    out_dir = tempfile.mkdtemp(prefix="tv-", dir=spec["tmp"])
    job = {
        "data": spec["data"],
        "model": spec["model"],
        "weights": spec["weights"],
        "layer": spec["layer"],
        "batch_size": spec["batch_size"],
        "resize": pre.resize_size,
        "crop": pre.crop_size,
        "device": spec["device"],
        "out": out_dir,
    }
    proc = subprocess.run(
        [TV_PYTHON, os.path.join(HERE, "tv_runner.py"), json.dumps(job)], capture_output=True, text=True
    )
    found = [line[len(RESULT_TAG) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    shutil.rmtree(out_dir, ignore_errors=True)
    if proc.returncode != 0 or not found:
        return {"error": f"thingsvision run failed: {proc.stderr.strip().splitlines()[-3:]}"}
    r = json.loads(found[-1])
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    # the work ran in the tv-venv child: report its RSS as the method's
    return {
        **r,
        "note": f"thingsvision {r.get('version', '?')}, torch {r.get('torch', '?')}",
        "tv_rss_mib": kids,
    }


if __name__ == "__main__":
    sys.exit(main())
