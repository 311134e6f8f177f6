"""featx's fine-tuning step against a hand-written timm training loop, in img/s, per image size and
thread count, in one run (interleaved, so both see the same machine load).

Both sides train the whole network (`depth:0`) of `tf_efficientnet_lite0` (featx's
`efficientnet_lite0`; random init: speed does not depend on the weight values) with SGD
(momentum 0.9), batch `--batch-size`, cross-entropy, on the same JPEG files, decoded and augmented
(RandomResizedCrop + horizontal flip) in the process (no loader workers), fp32 on the CPU:

- featx: `featx.finetune.train.train_epoch` on the `TrainJob` that `featx finetune` builds
  (per-image seeded crops, uint8 batches normalised as one tensor, the lr schedule per step);
- hand: `torchvision.datasets.ImageFolder` + `transforms.Compose([RandomResizedCrop, RandomHorizontalFlip,
  ToTensor, Normalize])` + `DataLoader` + `timm.create_model(..., num_classes=K)` + the four-line loop.

Each (size, threads) runs `--repeats` timed epochs per side after one untimed warm-up epoch,
alternating featx / hand; the median epoch gives img/s. The ratio is featx / hand (1.0 = as fast).

    python benchmarks/finetune_speed.py                       # 32, 64, 128, 224 px x 1, 2 threads
    python benchmarks/finetune_speed.py --sizes 32,64 --threads 1 --images 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def make_folder(root: Path, classes: int, per_class: int, size: int = 160) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr = np.clip(rng.normal(60 + 60 * c, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{k:03d}.jpg", quality=90)
    return root


def featx_epoch_fn(folder: Path, size: int, batch: int):
    """A function that trains one featx epoch (epoch index given) over every image of `folder`."""
    import numpy as np
    import torch

    from featx.finetune.job import build_network
    from featx.finetune.settings import FinetuneSettings
    from featx.finetune.train import TrainJob, make_optimizer, train_epoch
    from featx.models.plan import resolve
    from featx.settings import ModelSettings
    from featx.sources.spec import open_source

    ds = open_source(str(folder))
    s = FinetuneSettings(train_from="depth:0", epochs=1000, warmup=0, batch_size=batch, augment="default")
    plan = resolve(ModelSettings("efficientnet_lite0", "none", image_size=size))
    backbone, _, point, _, trained, head = build_network(plan, ds, s, torch.device("cpu"))
    rows = type("Rows", (), {"train": np.arange(len(ds.labels))})()
    job = TrainJob(
        backbone.module,
        make_optimizer(s, trained, head),
        point,
        ds,
        rows,
        backbone.preprocess,
        s,
        torch.device("cpu"),
        None,
        0,
    )
    return lambda epoch: train_epoch(job, epoch), len(ds.labels)


def hand_epoch_fn(folder: Path, size: int, batch: int):
    """The loop people write: ImageFolder, torchvision transforms, DataLoader, timm model, SGD."""
    import timm
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ]
    )
    data = datasets.ImageFolder(str(folder), tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=0)
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=len(data.classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def epoch(_):
        model.train()
        for x, y in loader:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch, len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,64,128,224")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--images", type=int, default=64, help="training images per epoch (3 classes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed epochs per side (median)")
    args = p.parse_args()
    import torch

    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "imgs", 3, max(1, args.images // 3))
        print(
            f"efficientnet_lite0, depth:0, batch {args.batch_size}, {args.images // 3 * 3} images per epoch, "
            f"{args.repeats} timed epochs per side (median), torch {torch.__version__}"
        )
        print(f"{'size':>5} {'threads':>7} {'featx img/s':>12} {'hand img/s':>11} {'featx/hand':>10}")
        for size in sizes:
            featx, n = featx_epoch_fn(folder, size, args.batch_size)
            hand, _ = hand_epoch_fn(folder, size, args.batch_size)
            for t in threads:
                torch.set_num_threads(t)
                times: dict[str, list[float]] = {"featx": [], "hand": []}
                featx(0), hand(0)  # warm-up
                for r in range(args.repeats):
                    for name, fn in (("featx", featx), ("hand", hand)):
                        t0 = time.perf_counter()
                        fn(r + 1)
                        times[name].append(time.perf_counter() - t0)
                f, h = (n / statistics.median(times[k]) for k in ("featx", "hand"))
                print(f"{size:>5} {t:>7} {f:>12.1f} {h:>11.1f} {f / h:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
