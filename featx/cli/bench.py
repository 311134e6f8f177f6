"""`featx bench` and `featx demo`: the transferability grid, its report and plots."""

from __future__ import annotations

import logging
import shlex

from featx.cli import options as o
from featx.cli.fit import add_protocol_args, check_knn_options, protocol_overrides
from featx.errors import UsageError

log = logging.getLogger("featx")


def add_parser(sub) -> None:
    from featx.settings import DEFAULT_BENCH_LAYERS as DEFAULT_LAYERS

    p = sub.add_parser("bench", help="measure layer transferability: datasets x layers x train sizes x seeds")
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME[@WEIGHTS]",
        help=o.MODEL_HELP + ", optionally @WEIGHTS; repeatable: several models in one bench "
        "(--weights is the default of a model without @)",
    )
    o.add_model_args(p)
    p.add_argument(
        "--control",
        choices=["random"],
        help="add each pretrained model's random-init twin (--weights none, seeded) as a control",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="a dataset, repeatable; append :similar or :different to label it (PATH:similar)",
    )
    p.add_argument("--layers", default=DEFAULT_LAYERS, help="layers to compare (default: 7 depths)")
    p.add_argument(
        "--train-sizes", default="all", help="comma list of N (total), K/class or all (default all)"
    )
    p.add_argument(
        "--classifier", default="softmax", help="svm, softmax, sgd, knn, or a comma list (default softmax)"
    )
    add_protocol_args(p)
    p.add_argument("--seeds", default="0", help="comma list of seeds (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="parallel fits (joblib; -1 = all cores)")
    o.add_data_args(p)
    p.add_argument(
        "--baseline", choices=["pixels"], help="add the raw-pixel baseline (logistic regression on pixels)"
    )
    p.add_argument(
        "--pixel-size", type=o.positive_int, default=32, help="image size of the pixel baseline (32)"
    )
    p.add_argument(
        "--head-confidence",
        action="store_true",
        help="also report the ImageNet head's mean top-1 probability on the data (a second, one-layer "
        "cache entry; the grid's entry stays the one `featx extract` makes)",
    )
    p.add_argument(
        "--out", default="results/bench", help="results directory (default results/bench); rerun to resume"
    )
    p.add_argument("--cache-dir", help=o.CACHE_HELP)
    o.add_device_args(p)
    p.add_argument(
        "--finetune",
        metavar="POINTS",
        help="add fine-tune cells from these freeze points (depth:0,0.5,1.0 or layer names), for the first "
        "--model, per dataset x train size x seed, beside the probe cells",
    )
    p.add_argument(
        "--finetune-epochs",
        type=o.auto_or_int,
        help="fine-tune epochs: N, or auto: until validation stops improving (auto)",
    )
    p.add_argument(
        "--finetune-max-epochs", type=o.positive_int, help="the cap of --finetune-epochs auto (30)"
    )
    p.add_argument(
        "--finetune-lr",
        type=lambda t: o.floats(t, "--finetune-lr"),
        help="fine-tune head learning rate; several (0.01,0.03): chosen on validation (0.01; pretrained "
        "layers x0.1)",
    )
    p.add_argument(
        "--finetune-augment",
        help="none, light or default (RandomResizedCrop + flip); several (none,light,default): chosen on "
        "validation (default)",
    )
    p.add_argument("--finetune-batch-size", type=o.positive_int, help="fine-tune images per step (32)")
    p.add_argument(
        "--finetune-max-images",
        type=o.positive_int,
        help="cap each fine-tune's training images (a seeded stratified subset): fine-tuning on a CPU is slow",
    )
    p.add_argument(
        "--finetune-method",
        help="how the fine-tune cells adapt the network: full, lp-ft, bitfit, lora; several "
        "(full,lora): a cell per method, side by side in the report (full)",
    )
    p.add_argument("--finetune-lora-rank", type=o.positive_int, help="LoRA's rank (8)")
    p.add_argument("--finetune-lora-alpha", type=float, help="LoRA's alpha: its scale is alpha / rank (16)")
    p.add_argument(
        "--finetune-threads",
        type=o.auto_or_int,
        help="CPU threads for fine-tuning: N, or auto (1 or all cores, measured) (auto)",
    )
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="fit the cells on this Dask cluster (tcp://HOST:8786; default $DASK_SCHEDULER_ADDRESS; "
        "'local': here, with --jobs); needs featx[dask] and a cache dir the workers see",
    )


def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="a small offline bench on the data this machine has (a few minutes on 2 cores)"
    )
    p.add_argument(
        "--data", action="append", default=[], help="add an image folder (PATH[:similar|:different])"
    )
    p.add_argument("--out", default="results/demo", help="results directory (default results/demo)")
    p.add_argument("--jobs", type=int, default=2, help="parallel fits (2)")
    p.add_argument("--cache-dir", help=o.CACHE_HELP)


def _protocols(args) -> list:
    from featx.classifiers.protocol import protocol_for

    if args.preset:
        return [protocol_for(preset=args.preset, **protocol_overrides(args))]
    names = [c.strip() for c in args.classifier.split(",") if c.strip()]
    if not names:
        raise UsageError("--classifier is empty; use svm, softmax, sgd or knn")
    check_knn_options(args, names)
    given = protocol_overrides(args)
    linear = {k: v for k, v in given.items() if k not in ("ks", "temperatures")}
    plain = {k: v for k, v in linear.items() if k not in ("solver", "device")}  # softmax's options
    alone = ("scale", "pca") if set(names) == {"knn"} else ()  # knn alone: refuses them, as fit does
    knn = {k: v for k, v in given.items() if k in ("ks", "temperatures", "cv", "val_fraction", *alone)}
    chosen = {"softmax": linear, "knn": knn}
    return [protocol_for(c, **chosen.get(c, plain)) for c in dict.fromkeys(names)]


def _run(config, args) -> int:
    from featx.bench.report import write_bench_report
    from featx.bench.run import run

    result = run(config, progress=not args.quiet)
    paths = write_bench_report(result, "featx " + shlex.join(args.argv))
    log.info("bench done: %d cells; report and plots in %s", len(result.cells), config.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def run(args) -> int:
    from featx.bench.config import BenchConfig, parse_bench_data
    from featx.classifiers.protocol import parse_train_size
    from featx.settings import CodeSettings, DataOptions, RunSettings

    o.check_jobs(args.jobs)
    sizes = [s.strip() for s in args.train_sizes.split(",") if s.strip()] or ["all"]
    for s in sizes:
        parse_train_size(s)
    config = BenchConfig(
        args.model,
        [parse_bench_data(d) for d in args.data],
        CodeSettings(args.layers),
        o.settings_from(RunSettings, args),
        train_sizes=sizes,
        protocols=_protocols(args),
        seeds=o.ints(args.seeds, "--seeds") or (0,),
        data_options=o.settings_from(DataOptions, args),
        baseline_pixels=args.baseline == "pixels",
        pixel_size=args.pixel_size,
        out=args.out,
        cache_dir=args.cache_dir,
        jobs=args.jobs,
        scheduler=args.scheduler,
        control=args.control,
        finetune=args.finetune or (),
        finetune_settings=_finetune_settings(args),
        finetune_methods=args.finetune_method,
        head_confidence=args.head_confidence,
        # NAME@WEIGHTS is parsed by BenchConfig; these apply to every model (--weights: to those without @)
        weights=args.weights,
        image_size=args.image_size,
        crop_pct=args.crop_pct,
    )
    return _run(config, args)


# FinetuneSettings' fields that bench sets, and their bench flags (errors name these)
FINETUNE_FLAGS = {
    "epochs": "--finetune-epochs",
    "max_epochs": "--finetune-max-epochs",
    "lr": "--finetune-lr",
    "augment": "--finetune-augment",
    "batch_size": "--finetune-batch-size",
    "max_images": "--finetune-max-images",
    "threads": "--finetune-threads",
    "lora_rank": "--finetune-lora-rank",
    "lora_alpha": "--finetune-lora-alpha",
}


def _finetune_settings(args):
    """The fine-tune recipe from --finetune-*: the library's defaults for what is not given; an
    error names the bench's flag (--finetune-lr, not finetune's --lr)."""
    from featx.finetune.settings import FinetuneSettings
    from featx.settings import FLAGS

    given = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in FINETUNE_FLAGS.items()}
    try:
        return FinetuneSettings(**{k: v for k, v in given.items() if v is not None})
    except UsageError as e:
        for field, flag in FINETUNE_FLAGS.items():
            if str(e).startswith(FLAGS[field] + " "):
                raise UsageError(flag + str(e)[len(FLAGS[field]) :]) from None
        raise


def run_demo(args) -> int:
    """A small bench that works offline on a fresh install."""
    from featx.bench.config import demo_config

    return _run(demo_config(args.data, args.out, args.cache_dir, args.jobs), args)
