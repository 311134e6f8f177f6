"""`featx predict NAME IMAGES...`: classify new images with a saved classifier."""

from __future__ import annotations

import json
import logging
from collections import Counter

from featx.cli import options as o

log = logging.getLogger("featx")


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify new images with a saved classifier")
    p.add_argument("classifier", help="NAME (or NAME.safetensors) from featx fit --out")
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders, a CSV whose first column holds paths, or a .txt list of paths",
    )
    p.add_argument("--top-k", type=o.positive_int, default=3, help="classes to show per image (3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--weights", help="where the classifier's weights file is now, if it moved")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=o.positive_int, default=32)
    p.add_argument("--workers", type=o.workers, default=0)
    p.add_argument(
        "--force",
        action="store_true",
        help="use a classifier whose hash, featx version or weights do not match",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a joblib pickle (featx 0.1.0's format, or --export-joblib): unpickling runs "
        "code, so only for files you trust",
    )


def run(args) -> int:
    from featx.classifiers.predict import Predictor, collect_images
    from featx.cli.tables import predictions_text

    paths = collect_images(args.inputs)
    predictor = Predictor(
        args.classifier,
        weights=args.weights,
        device=args.device,
        force=args.force,
        trust_pickle=args.trust_pickle,
    )
    try:
        preds = predictor.predict(
            paths,
            top_k=args.top_k,
            batch_size=args.batch_size,
            workers=0 if args.workers == "auto" else args.workers,
            progress=not args.quiet,
        )
    finally:
        predictor.close()
    print(
        json.dumps([p.to_dict() for p in preds], indent=1)
        if args.json
        else predictions_text(preds, args.top_k)
    )
    failed = sum(p.error is not None for p in preds)
    counts = Counter(p.label for p in preds if p.error is None)
    log.info(
        "%d image%s: %s%s",
        len(preds),
        "" if len(preds) == 1 else "s",
        ", ".join(f"{n} x {c}" for c, n in sorted(counts.items())) or "none classified",
        f"; {failed} could not be decoded" if failed else "",
    )
    if failed:
        log.warning("%d of %d images could not be decoded", failed, len(preds))
    return 1 if failed == len(preds) else 0
