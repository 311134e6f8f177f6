"""`featx fit FILE`: linear classifiers on cached codes; `--out` saves what `featx predict` loads."""

from __future__ import annotations

import json
import logging
import os

from featx.cli import options as o
from featx.errors import FeatxError, UsageError

log = logging.getLogger("featx")


def add_protocol_args(p, classifier_choices: bool = True) -> None:
    """The protocol options fit and bench share (featx.classifiers.protocol.Protocol's fields)."""
    from featx.settings import PRESET_NAMES, SCALES

    p.add_argument(
        "--preset", choices=PRESET_NAMES, help="a published protocol (overrides classifier and grid)"
    )
    p.add_argument("--C", dest="Cs", help="comma-separated C grid (default: logspace(-4, 3, 8))")
    p.add_argument("--scale", choices=SCALES, help="feature scaling (default standardize)")
    p.add_argument(
        "--cv", type=o.positive_int, help="choose C by K-fold cross-validation instead of a hold-out"
    )
    p.add_argument("--solver", default="auto", help=SOLVER_HELP)
    p.add_argument(
        "--knn-k",
        dest="ks",
        help="knn: comma-separated k grid (default 10,20,100,200; capped at the training rows)",
    )
    p.add_argument(
        "--knn-t",
        dest="temperatures",
        help="knn: comma-separated vote temperatures T (default 0.02,0.07,0.2)",
    )


SOLVER_HELP = (
    "softmax's solver: sklearn (lbfgs, float64), torch (L-BFGS in float32, same objective; fast on a GPU; "
    "runs on --device) or auto (default: torch when --device is or finds CUDA, else sklearn)"
)


def protocol_overrides(args) -> dict:
    """The Protocol fields the command line gave (options named like the fields; --C as a list)."""
    from dataclasses import fields

    from featx.classifiers.protocol import Protocol

    given = {
        f.name: getattr(args, f.name, None)
        for f in fields(Protocol)
        if f.name not in ("classifier", "preset")
    }
    given["Cs"] = o.floats(args.Cs, "--C") if args.Cs else None
    given["ks"] = o.ints(args.ks, "--knn-k") if args.ks else None
    given["temperatures"] = o.floats(args.temperatures, "--knn-t") if args.temperatures else None
    return {k: v for k, v in given.items() if v is not None}


def check_knn_options(args, classifiers: list[str]) -> None:
    """--knn-k/--knn-t only with knn; --C, --scale and --pca never for knn alone (it has no C and takes
    the codes as extracted): one line naming the option rather than a silently ignored value."""
    knn = "knn" in classifiers
    if not knn and (args.ks or args.temperatures):
        raise UsageError(
            f"{'--knn-k' if args.ks else '--knn-t'} sets the k-NN probe's grid; add --classifier knn"
        )
    if knn and set(classifiers) == {"knn"} and args.Cs:
        raise UsageError("--C: the k-NN probe has no C; its grid is --knn-k (k) and --knn-t (T)")


def add_parser(sub) -> None:
    from featx.settings import CLASSIFIERS

    p = sub.add_parser("fit", help="train and evaluate linear classifiers on cached codes")
    p.add_argument("file", help="a codes file from featx extract")
    p.add_argument(
        "--layer",
        "--layers",
        dest="layer",
        default="all",
        help="layers to fit, comma-separated, or all (default)",
    )
    p.add_argument(
        "--classifier",
        default="softmax",
        choices=CLASSIFIERS,
        help="svm: LinearSVC; softmax: multinomial logistic regression; sgd: out-of-core SGD; knn: "
        "weighted k-NN on cosine similarity (DINOv2's); default softmax",
    )
    add_protocol_args(p)
    p.add_argument("--pca", type=o.positive_int, help="reduce codes to K dimensions with PCA first")
    p.add_argument(
        "--val-fraction", type=o.fraction, help="hold-out share of train when the file has no val split (0.2)"
    )
    p.add_argument(
        "--train-size", default="all", help="training images: all, N in total, or K/class (default all)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed for subsets, hold-outs and solvers (default 0)")
    p.add_argument("--seeds", help="repeat with these seeds (e.g. 0,1,2) and report mean and std")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="parallel fits: layers and seeds, and a single layer's C grid (joblib; -1 = all cores)",
    )
    p.add_argument("--concat", action="store_true", help="also fit on the concatenation of the layers")
    p.add_argument("--epochs", type=o.positive_int, help="sgd: passes over the data (5)")
    p.add_argument("--chunk-rows", type=o.positive_int, help="sgd: rows read per chunk (4096)")
    p.add_argument("--max-iter", type=o.positive_int, help="solver iterations (2000; kornblith 1000)")
    p.add_argument(
        "--device", default="auto", help="where --solver torch runs: auto (cuda if available), cpu, cuda:N"
    )
    p.add_argument(
        "--out",
        metavar="NAME",
        help="save the best layer's classifier as NAME.safetensors: arrays and a JSON description in one "
        "pickle-free file that featx predict loads (NAME.joblib is accepted as the same name)",
    )
    p.add_argument(
        "--export-joblib",
        metavar="PATH.joblib",
        help="also write the fitted scikit-learn Pipeline as a joblib pickle (+ PATH.json); featx predict "
        "reads it only with --trust-pickle",
    )
    p.add_argument(
        "--knn-codes",
        choices=("float32", "float16"),
        default="float32",
        help="knn --out: store the training codes as float32 (exact, default) or float16 (half the size)",
    )
    p.add_argument(
        "--no-timing",
        dest="timing",
        action="store_false",
        help="count each layer's parameters but do not time the forward pass to it (inference ms stays empty)",
    )
    p.add_argument("--results", help="write the full results as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the full results as JSON instead of tables")


def _check_outputs(args) -> None:
    """Every file a fit writes must be its own: one output overwriting another (or the codes file)
    would destroy what the run just saved."""
    from featx.classifiers.description import classifier_path, export_paths

    seen = {os.path.realpath(args.file): f"the codes file {args.file}"}
    outs = [("--out", classifier_path(args.out))] if args.out else []
    outs += [("--export-joblib", p) for p in export_paths(args.export_joblib)] if args.export_joblib else []
    outs += [("--results", os.path.abspath(args.results))] if args.results else []
    for option, path in outs:
        key = os.path.realpath(path)
        if key in seen:
            raise UsageError(
                f"{option} {path} is also {seen[key]}; give each output of featx fit its own path"
            )
        seen[key] = f"the file {option} writes"


def _save(args, report, data: dict) -> None:
    from featx.classifiers.io import export_joblib, save_classifier
    from featx.files import write_json_atomic

    if args.out:
        path = save_classifier(args.out, report, knn_codes=args.knn_codes)
        log.info("saved %s (%s) with its description and results", path, report.best)
    if args.export_joblib:
        log.info(
            "exported the pipeline to %s and %s (a pickle: predict needs --trust-pickle)",
            *export_joblib(args.export_joblib, report),
        )
    if args.results:
        try:
            write_json_atomic(args.results, data)
        except OSError as e:
            raise FeatxError(f"--results {args.results}: cannot write ({e.strerror or e})") from None


def run(args) -> int:
    from featx.classifiers.fit import fit, layer_names
    from featx.classifiers.neardup import leak_check, leak_warning
    from featx.classifiers.protocol import parse_train_size, protocol_for
    from featx.cli.tables import fit_text

    check_knn_options(args, [] if args.preset else [args.classifier])
    protocol = protocol_for(args.classifier, args.preset, **protocol_overrides(args))
    seeds = o.ints(args.seeds, "--seeds") if args.seeds else (args.seed,)
    o.check_jobs(args.jobs)
    _check_outputs(args)
    layer_names(args.file, args.layer)  # the user's mistakes first, then the near-duplicate check's warning
    leak = leak_check(args.file, protocol.validate(), parse_train_size(args.train_size), seeds[0])
    if leak and leak["leaky"]:
        log.warning(leak_warning(leak, args.file))
    report = fit(
        args.file,
        args.layer,
        protocol,
        parse_train_size(args.train_size),
        seeds,
        args.jobs,
        args.concat,
        return_models=bool(args.out or args.export_joblib),
        timing=args.timing,
    )
    data = report.to_dict()
    data["leakage"] = leak  # the near-duplicate check of the first seed's rows (featx.classifiers.neardup)
    _save(args, report, data)
    print(json.dumps(data, indent=1) if args.json else fit_text(report, args.file, seeds))
    return 0
