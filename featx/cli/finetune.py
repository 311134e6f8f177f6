"""`featx finetune`: fine-tune from a freeze point; saves a model `predict` and `extract` can use."""

from __future__ import annotations

import json
import os

from featx.cli import options as o
from featx.errors import FeatxError, UsageError


def _add_recipe_args(p) -> None:
    from featx.finetune.settings import OPTIMIZERS
    from featx.finetune.settings import FinetuneSettings as D

    p.add_argument(
        "--train-from",
        default=D.train_from,
        help="freeze point: depth:F (0 = everything trains, 1.0 = head only) or a layer name (depth:0.5)",
    )
    p.add_argument(
        "--epochs",
        type=o.auto_or_int,
        default=D.epochs,
        help=f"N, or auto: until validation stops improving ({D.epochs})",
    )
    p.add_argument(
        "--max-epochs",
        type=o.positive_int,
        default=D.max_epochs,
        help=f"the cap of --epochs auto ({D.max_epochs})",
    )
    p.add_argument(
        "--lr",
        type=lambda t: o.floats(t, "--lr"),
        default=D.lr,
        help=f"peak learning rate of the new head; several (0.01,0.03): chosen on validation ({D.lr})",
    )
    p.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=D.backbone_lr_mult,
        help=f"pretrained layers train at lr x this ({D.backbone_lr_mult})",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=D.weight_decay,
        help=f"on weights, not biases/norms ({D.weight_decay})",
    )
    p.add_argument(
        "--optimizer", default=D.optimizer, choices=OPTIMIZERS, help=f"({D.optimizer}, momentum {D.momentum})"
    )
    p.add_argument("--momentum", type=float, default=D.momentum, help=f"sgd momentum ({D.momentum})")
    p.add_argument(
        "--warmup",
        type=int,
        default=D.warmup,
        help=f"epochs of linear warm-up before the cosine decay ({D.warmup})",
    )
    p.add_argument(
        "--batch-size", type=o.positive_int, default=D.batch_size, help=f"images per step ({D.batch_size})"
    )
    p.add_argument("--label-smoothing", type=float, default=D.label_smoothing, help="(0)")
    p.add_argument(
        "--train-size", default=D.train_size, help="all, N in total or K/class: the same subsets as fit (all)"
    )
    p.add_argument(
        "--seed", type=int, default=D.seed, help="seed of the subset, hold-out, head and data order (0)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=D.val_fraction,
        help="hold-out share of train without a val split (0.2)",
    )
    p.add_argument(
        "--max-images", type=o.positive_int, help="cap the training images (a seeded stratified subset)"
    )
    p.add_argument(
        "--augment",
        default=D.augment,
        help="none, light (small crops, no flip) or default (RandomResizedCrop + flip); several "
        f"(none,light,default): chosen on validation ({D.augment})",
    )
    p.add_argument(
        "--no-augment", dest="augment", action="store_const", const="none", help="= --augment none"
    )
    p.add_argument(
        "--method",
        default=D.method,
        help="how the part after the freeze point adapts: full, lp-ft (a linear probe first, then "
        f"full), bitfit (biases and norms), lora (low-rank adapters; needs featx[peft]) ({D.method})",
    )
    p.add_argument(
        "--lora-rank", type=o.positive_int, default=D.lora_rank, help=f"LoRA's rank ({D.lora_rank})"
    )
    p.add_argument(
        "--lora-alpha",
        type=float,
        default=D.lora_alpha,
        help=f"LoRA's alpha: its scale is alpha / rank ({D.lora_alpha:g})",
    )
    p.add_argument(
        "--threads",
        type=o.auto_or_int,
        default=D.threads,
        help="CPU threads for training: N, or auto (1 or all cores, whichever is measured faster here)",
    )


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune from a freeze point; saves a model predict and extract can use"
    )
    p.add_argument("--model", required=True, help=o.MODEL_HELP)
    o.add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        help="image folder, CSV manifest, sklearn:digits, idx folder or torchvision:NAME",
    )
    _add_recipe_args(p)
    p.add_argument(
        "--test-fraction", type=o.fraction, default=0.2, help="test share for data without splits (0.2)"
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of that split, as extract --seed (0)")
    p.add_argument("--per-class-limit", help="at most K images per class and split: K, or train=K1,test=K2")
    p.add_argument("--data-root", help="where torchvision:NAME datasets live")
    p.add_argument(
        "--group-by", metavar="REGEX", help="keep groups (patients, ...) on one side of every split"
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--workers", type=o.workers, default="auto", help="data-loading processes (auto: 0 on the CPU)"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto: bf16 autocast on CUDA, fp32 on the CPU",
    )
    p.add_argument(
        "--out", required=True, help="save the model as OUT.safetensors (checkpoints in OUT.ckpt/ meanwhile)"
    )
    p.add_argument("--results", help="write the results as JSON to FILE")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    from featx.classifiers.description import classifier_path
    from featx.files import write_json_atomic
    from featx.finetune.job import finetune
    from featx.finetune.settings import FinetuneSettings
    from featx.settings import DataOptions, ModelSettings, RunSettings

    settings = o.settings_from(FinetuneSettings, args)
    if args.results and os.path.realpath(args.results) == os.path.realpath(classifier_path(args.out)):
        raise UsageError(f"--results {args.results} is also the model --out writes; give each its own path")
    options = o.settings_from(DataOptions, args, seed=args.split_seed)
    result = finetune(
        o.settings_from(ModelSettings, args, name=args.model),
        args.data,
        settings,
        run=o.settings_from(RunSettings, args, batch_size="auto"),
        data_options=options,
        out=args.out,
        progress=not args.quiet,
    )
    if args.results:
        try:
            write_json_atomic(args.results, result.results)
        except OSError as e:
            raise FeatxError(f"--results {args.results}: cannot write ({e.strerror or e})") from None
    print(json.dumps({**result.results, "path": result.path}, indent=1) if args.json else result.summary())
    if not args.json:
        print(result.path)
    return 0
