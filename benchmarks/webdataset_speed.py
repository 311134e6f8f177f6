#!/usr/bin/env python
"""Extraction from WebDataset shards against the same images in a folder: images/s and the ratio.

Writes the folder's images into uncompressed tar shards (key CLASS/NAME, label KEY.cls, a
classes.txt beside them), then runs `featx.extract` end to end on `--data FOLDER` and on
`--data wds:SHARDS`, each run in its own subprocess with a fresh cache, interleaved
(folder, shards, folder, shards, ...), and reports the median images/s of each and their ratio.
Also the listing alone (`open_source`: walking the folder, or reading the shards' tar headers).

    python benchmarks/webdataset_speed.py --per-class 200 --repeats 3
    python benchmarks/webdataset_speed.py --data DIR --model resnet18 --image-size 128 --batch-size 64

Absolute numbers on a shared machine are noisy: compare the ratio taken in one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TAG = "@@wds-bench@@ "

CHILD = r"""
import json, os, sys, tempfile, time
import featx
from featx.settings import DataOptions
from featx.sources.spec import open_source
spec, model, size, bs, per_class = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
opts = DataOptions(per_class_limit=per_class)
t0 = time.perf_counter()
ds = open_source(spec, opts)
listing = time.perf_counter() - t0
with tempfile.TemporaryDirectory() as cache:
    t0 = time.perf_counter()
    res = featx.extract(model, spec, "depth:1.0", weights="none", image_size=size, batch_size=bs,
                        precision="fp32", data_options=opts, cache_dir=cache, progress=False)
    seconds = time.perf_counter() - t0
print("@@wds-bench@@ " + json.dumps({"rows": res.rows, "seconds": seconds, "listing": listing, "n": len(ds)}))
"""


def write_shards(folder: str, out: str, per_shard: int) -> str:
    """The folder's images (DIR/CLASS/image) as shards out/shard-NNNNNN.tar; returns the wds: spec."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = sorted(
        (c, f) for c in classes for f in os.listdir(os.path.join(folder, c)) if not f.startswith(".")
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "classes.txt"), "w") as fh:
        fh.write("".join(c + "\n" for c in classes))
    n = 0
    for k in range(0, len(files), per_shard):
        with tarfile.open(os.path.join(out, f"shard-{n:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for c, f in files[k : k + per_shard]:
                key = f"{c}/{os.path.splitext(f)[0]}"
                tar.add(os.path.join(folder, c, f), arcname=key + os.path.splitext(f)[1].lower())
                data = str(classes.index(c)).encode()
                info = tarfile.TarInfo(key + ".cls")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        n += 1
    return f"wds:{out}/shard-{{000000..{n - 1:06d}}}.tar"


def run_one(spec: str, args) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO, "FEATX_AUTOTUNE": "fp32"}
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            spec,
            args.model,
            str(args.image_size),
            str(args.batch_size),
            str(args.per_class),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith(TAG)), None)
    if line is None:
        raise SystemExit(f"run failed on {spec}:\n{r.stderr[-2000:]}")
    return json.loads(line[len(TAG) :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "datasets", "flowers5_128"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--per-class", type=int, default=200, help="images per class and split (featx --per-class-limit)"
    )
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    folder = os.path.abspath(args.data)
    with tempfile.TemporaryDirectory(prefix="wds-bench-") as tmp:
        t0 = time.perf_counter()
        spec = write_shards(folder, os.path.join(tmp, "shards"), args.per_shard)
        print(f"shards written in {time.perf_counter() - t0:.1f} s: {spec}", file=sys.stderr)
        runs: dict[str, list[dict]] = {"folder": [], "shards": []}
        for r in range(args.repeats):
            for name, s in (("folder", folder), ("shards", spec)):
                runs[name].append(run_one(s, args))
                last = runs[name][-1]
                print(f"repeat {r + 1} {name}: {last['rows'] / last['seconds']:.1f} img/s", file=sys.stderr)
    rate = {k: statistics.median(x["rows"] / x["seconds"] for x in v) for k, v in runs.items()}
    listing = {k: statistics.median(x["listing"] for x in v) for k, v in runs.items()}
    rows = runs["folder"][0]["rows"]
    print(
        f"{args.model}, random init, {args.image_size} px, batch {args.batch_size}, fp32, {rows} images of "
        f"{os.path.basename(folder)} (--per-class-limit {args.per_class}), median of {args.repeats} interleaved runs"
    )
    print()
    print("| source | images/s | / folder | listing s (all images) |")
    print("|---|---|---|---|")
    for k in ("folder", "shards"):
        print(f"| {k} | {rate[k]:.1f} | {rate[k] / rate['folder']:.3f} | {listing[k]:.3f} |")
    print()
    print(f"ratio shards / folder: {rate['shards'] / rate['folder']:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
