#!/usr/bin/env python
"""Synthetic WebDataset shards for speed runs: N small generated JPEGs (random colour blocks, one
of 10 classes) in uncompressed tar shards `OUT/shard-NNNNNN.tar` (key CLASS/NAME, label KEY.cls),
a classes.txt beside them; prints the `wds:` spec.

    python benchmarks/synthetic_wds.py --images 100000 --shards 10 --size 32 --out /tmp/wds
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile

import numpy as np
from PIL import Image


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = [f"c{k}" for k in range(args.classes)]
    with open(os.path.join(args.out, "classes.txt"), "w") as fh:
        fh.write("".join(c + "\n" for c in names))
    rng = np.random.default_rng(0)
    per = -(-args.images // args.shards)
    for s in range(args.shards):
        path = os.path.join(args.out, f"shard-{s:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * per, min(args.images, (s + 1) * per)):
                c = i % args.classes
                blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) // 2 + 12 * c
                img = Image.fromarray(np.kron(blocks, np.ones((args.size // 4, args.size // 4, 1), np.uint8)))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                key = f"{names[c]}/{i:08d}"
                for name, data in ((key + ".jpg", buf.getvalue()), (key + ".cls", str(c).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    print(f"wds:{args.out}/shard-{{000000..{args.shards - 1:06d}}}.tar")


if __name__ == "__main__":
    main()
