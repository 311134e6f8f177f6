"""The `featx` command: argparse -> the Python API -> printed results.

Errors a user can cause print one line on stderr (exit 2 for usage, 1 otherwise); anything else
is a bug and keeps its traceback. Progress and messages go to stderr; what scripts consume
(the codes file's path, tables, JSON) goes to stdout.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting steal the cores data-loader workers and other processes
# need: on a busy 2-core machine the forward ran 2x slower with the default (benchmarks/). Set
# before torch loads; an explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import logging
import shlex
import sys

from featx import __version__
from featx.errors import FeatxError, UsageError
from featx.settings import CHANNELS_LAST, DECODERS, DTYPES, PRECISIONS

log = logging.getLogger("featx")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _auto_or_int(text: str):
    return "auto" if text == "auto" else _positive_int(text)


def _workers(text: str):
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected auto or an integer >= 0, got {text!r}")
    return v


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v < 1.0 and v != 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT, a torchvision weights name (IMAGENET1K_V1), a timm tag, imagenet "
                        "(efficientnet_lite0), none (random init) or a checkpoint path (default: DEFAULT)")  # fmt: skip
    p.add_argument("--image-size", type=_positive_int, help="input size in pixels (default: the weights')")
    p.add_argument("--crop-pct", type=_fraction, help="centre-crop fraction (default: the weights')")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """How a source is cut into samples (featx.data.DataOptions): shared by extract and bench."""
    p.add_argument(
        "--test-fraction", type=_fraction, default=0.2, help="test share for data without splits (0.2)"
    )
    p.add_argument("--per-class-limit", help="at most K images per class and split: K, or train=K1,test=K2")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and subsets (default 0)")
    p.add_argument("--data-root", help="where torchvision:NAME datasets live (downloaded there)")
    p.add_argument("--group-by", metavar="REGEX",
                   help="group images by the first match of REGEX on their relative path (its first capture group "
                        "if it has one): a group never sits on both sides of a split, hold-out or CV fold")  # fmt: skip


SOLVER_HELP = (
    "softmax's solver: sklearn (lbfgs, float64), torch (L-BFGS in float32, same objective; fast on a "
    "GPU) or auto (default: torch when --device is or finds CUDA, else sklearn)"
)


def _solver_overrides(args) -> dict:
    """--solver and the --device it runs on (auto with svm or sgd: sklearn; torch with them: an error)."""
    return {"solver": args.solver, "device": args.device}


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """How the forward runs: shared by extract and bench."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=_auto_or_int, default="auto", help="images per forward pass, or auto")
    p.add_argument("--workers", type=_workers, default="auto", help="data-loading processes, or auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="forward precision: auto = fp32 or bf16, whichever is measured faster on this device")  # fmt: skip


def _add_extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="torchvision name (resnet50), timm:NAME, or efficientnet_lite0"
    )
    _add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        help="image folder, CSV manifest, sklearn:digits, idx folder or torchvision:NAME",
    )
    p.add_argument(
        "--layers",
        default="depth:1.0",
        help="module names and/or depth fractions: layer2,layer4 or depth:0.25,0.5,1.0 (default: depth:1.0)",
    )
    p.add_argument(
        "--pool",
        default="avg",
        help="avg (default), max, avgNxN (e.g. avg2x2) or none; token maps (ViT): cls (class token), mean "
        "(= avg: mean of the patch tokens, prefix tokens excluded) or cls+mean (both, 2 x dim)",
    )
    relu = p.add_mutually_exclusive_group()
    relu.add_argument(
        "--relu",
        dest="relu",
        action="store_const",
        const="on",
        help="ReLU every tapped output (default: where the network has its own ReLU)",
    )
    relu.add_argument("--no-relu", dest="relu", action="store_const", const="off", help="keep raw outputs")
    p.set_defaults(relu="auto")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored code type")
    _add_data_args(p)
    p.add_argument(
        "--strict", action="store_true", help="stop at the first undecodable image instead of skipping it"
    )
    p.add_argument("--cache-dir", help="cache directory (default: $FEATX_CACHE_DIR or ./cache)")
    _add_device_args(p)
    p.add_argument(
        "--channels-last", default="auto", choices=CHANNELS_LAST, help="memory format for the forward"
    )
    p.add_argument("--decoder", default="auto", choices=DECODERS,
                   help="pil: decode and resize in workers; torchvision: batched JPEG decode and resize on the device "
                        "(auto: torchvision on CUDA)")  # fmt: skip
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the forward (slow first batch; off by default)"
    )
    p.add_argument(
        "--no-wait", action="store_true", help="fail instead of waiting when another process writes the entry"
    )


def _subcommands(parser: argparse.ArgumentParser, **kw):
    """Subparsers that also accept -q after the command name (`featx extract ... -q`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only warnings and errors on stderr",
    )
    sub = parser.add_subparsers(parser_class=_Parser, **kw)
    add = sub.add_parser
    sub.add_parser = lambda name, **k: add(name, parents=[common], **k)
    return sub


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layers",
        default="depth:0.1,0.25,0.4,0.55,0.7,0.85,1.0",
        help="layers to compare (default: 7 depths)",
    )
    p.add_argument(
        "--train-sizes", default="all", help="comma list of N (total), K/class or all (default all)"
    )
    p.add_argument(
        "--classifier", default="softmax", help="svm, softmax, sgd, or a comma list (default softmax)"
    )
    p.add_argument(
        "--preset", choices=["kornblith", "vissl-svm"], help="a published protocol instead of --classifier"
    )
    p.add_argument("--C", dest="Cs", help="comma-separated C grid")
    p.add_argument("--scale", choices=["standardize", "l2", "none"], help="feature scaling (standardize)")
    p.add_argument("--cv", type=_positive_int, help="choose C by K-fold CV")
    p.add_argument("--seeds", default="0", help="comma list of seeds (default 0)")
    p.add_argument("--jobs", type=int, default=1, help="parallel fits (joblib; -1 = all cores)")
    p.add_argument("--image-size", type=_positive_int, help="input size (default: the weights')")
    _add_data_args(p)
    p.add_argument(
        "--baseline", choices=["pixels"], help="add the raw-pixel baseline (logistic regression on pixels)"
    )
    p.add_argument(
        "--pixel-size", type=_positive_int, default=32, help="image size of the pixel baseline (32)"
    )
    p.add_argument("--solver", default="auto", help=SOLVER_HELP + "; runs on --device")
    p.add_argument("--cache-dir", help="cache directory (default: $FEATX_CACHE_DIR or ./cache)")
    _add_device_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featx", description="Tap layers of pretrained CNNs into an HDF5 cache and measure them."
    )
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = _subcommands(parser, dest="command", metavar="COMMAND")

    p = sub.add_parser("layers", help="list a model's tappable layers")
    p.add_argument("model", nargs="?", help="torchvision name, timm:NAME or efficientnet_lite0")
    _add_model_args(p)
    p.add_argument("--all", action="store_true", help="every module, not only the main path")
    p.add_argument(
        "--pool",
        default="avg",
        help="pooling used for the code-dim column (default avg; cls, mean, cls+mean for token maps)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--list-models", action="store_true", help="list the torchvision model names featx accepts"
    )

    p = sub.add_parser("extract", help="extract codes into the cache; prints the file's path last")
    _add_extract_args(p)

    p = sub.add_parser("fit", help="train and evaluate linear classifiers on cached codes")
    p.add_argument("file", help="a codes file from featx extract")
    p.add_argument(
        "--layer",
        "--layers",
        dest="layer",
        default="all",
        help="layers to fit, comma-separated, or all (default)",
    )
    p.add_argument("--classifier", default="softmax", choices=["svm", "softmax", "sgd"],
                   help="svm: LinearSVC; softmax: multinomial logistic regression; sgd: out-of-core SGD (default softmax)")  # fmt: skip
    p.add_argument(
        "--preset",
        choices=["kornblith", "vissl-svm"],
        help="a published protocol (overrides classifier and grid)",
    )
    p.add_argument("--C", dest="Cs", help="comma-separated C grid (default: logspace(-4, 3, 8))")
    p.add_argument(
        "--scale", choices=["standardize", "l2", "none"], help="feature scaling (default standardize)"
    )
    p.add_argument("--pca", type=_positive_int, help="reduce codes to K dimensions with PCA first")
    p.add_argument(
        "--cv", type=_positive_int, help="choose C by K-fold cross-validation instead of a hold-out"
    )
    p.add_argument(
        "--val-fraction", type=_fraction, help="hold-out share of train when the file has no val split (0.2)"
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
    p.add_argument("--epochs", type=_positive_int, help="sgd: passes over the data (5)")
    p.add_argument("--chunk-rows", type=_positive_int, help="sgd: rows read per chunk (4096)")
    p.add_argument("--max-iter", type=_positive_int, help="solver iterations (2000; kornblith 1000)")
    p.add_argument("--solver", default="auto", help=SOLVER_HELP)
    p.add_argument(
        "--device", default="auto", help="where --solver torch runs: auto (cuda if available), cpu, cuda:N"
    )
    p.add_argument("--out", metavar="NAME",
                   help="save the best layer's classifier as NAME.safetensors: arrays and a JSON description in one "
                        "pickle-free file that featx predict loads (NAME.joblib is accepted as the same name)")  # fmt: skip
    p.add_argument("--export-joblib", metavar="PATH.joblib",
                   help="also write the fitted scikit-learn Pipeline as a joblib pickle (+ PATH.json); featx predict "
                        "reads it only with --trust-pickle")  # fmt: skip
    p.add_argument("--results", help="write the full results as JSON to this file")
    p.add_argument("--json", action="store_true", help="print the full results as JSON instead of tables")

    p = sub.add_parser("predict", help="classify new images with a saved classifier")
    p.add_argument("classifier", help="NAME (or NAME.safetensors) from featx fit --out")
    p.add_argument("inputs", nargs="+", help="image files, folders, or a CSV whose first column holds paths")
    p.add_argument("--top-k", type=_positive_int, default=3, help="classes to show per image (3)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--weights", help="where the classifier's weights file is now, if it moved")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--workers", type=_workers, default=0)
    p.add_argument(
        "--force",
        action="store_true",
        help="use a classifier whose hash, featx version or weights do not match",
    )
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a joblib pickle (featx 0.1.0's format, or --export-joblib): unpickling runs "
                        "code, so only for files you trust")  # fmt: skip

    p = sub.add_parser("bench", help="measure layer transferability: datasets x layers x train sizes x seeds")
    _add_bench_args(p)
    p.add_argument("--model", required=True, help="torchvision name, timm:NAME or efficientnet_lite0")
    p.add_argument("--weights", default="DEFAULT", help="as for extract (default DEFAULT)")
    p.add_argument("--data", action="append", required=True,
                   help="a dataset, repeatable; append :similar or :different to label it (PATH:similar)")  # fmt: skip
    p.add_argument(
        "--out", default="results/bench", help="results directory (default results/bench); rerun to resume"
    )
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="fit the cells on this Dask cluster (tcp://HOST:8786; default $DASK_SCHEDULER_ADDRESS; "
                        "'local': here, with --jobs); needs featx[dask] and a cache dir the workers see")  # fmt: skip

    p = sub.add_parser(
        "demo", help="a small offline bench on the data this machine has (a few minutes on 2 cores)"
    )
    p.add_argument(
        "--data", action="append", default=[], help="add an image folder (PATH[:similar|:different])"
    )
    p.add_argument("--out", default="results/demo", help="results directory (default results/demo)")
    p.add_argument("--jobs", type=int, default=2, help="parallel fits (2)")
    p.add_argument("--cache-dir", help="cache directory (default: $FEATX_CACHE_DIR or ./cache)")

    p = sub.add_parser("info", help="what a codes file (or a partial entry) holds")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("cache", help="list or remove cache entries")
    csub = _subcommands(p, dest="cache_command", metavar="ls|rm")
    q = csub.add_parser("ls", help="list entries")
    q.add_argument("--cache-dir")
    q = csub.add_parser("rm", help="remove entries by file name, path or key prefix")
    q.add_argument("entries", nargs="*")
    q.add_argument("--all", action="store_true", help="remove every entry")
    q.add_argument("--cache-dir")
    _add_score_parser(sub)
    return parser


# -- commands ------------------------------------------------------------------------------------


def cmd_layers(args) -> int:
    from featx.models import torchvision_models
    from featx.plan import resolve
    from featx.report import layers_json, layers_text
    from featx.settings import ModelSettings
    from featx.taps import parse_pool

    if args.list_models:
        print(
            "\n".join([*torchvision_models(), "efficientnet_lite0", "timm:NAME (any of timm.list_models())"])
        )
        return 0
    if not args.model:
        raise UsageError("featx layers: give a model name (or --list-models)")
    # DEFAULT's preprocessing needs no download; models without pretrained weights fall back to none
    plan = resolve(_settings(ModelSettings, args, name=args.model), default_may_be_none=True)
    pool = parse_pool(args.pool)
    print(layers_json(plan, pool, args.all) if args.json else layers_text(plan, pool, args.all))
    return 0


def _data_options(args):
    from featx.data import DataOptions, parse_per_class_limit

    return DataOptions(test_fraction=args.test_fraction, per_class_limit=parse_per_class_limit(args.per_class_limit),
                       seed=args.seed, data_root=args.data_root, group_by=args.group_by or None)  # fmt: skip


def _settings(cls, args, **given):
    """A settings object from the parsed options named like its fields (one mapping for every
    command: a new option is one field plus one CLI line)."""
    from dataclasses import fields

    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})


def cmd_extract(args) -> int:
    from featx.extraction import extract
    from featx.settings import CodeSettings, ModelSettings, RunSettings

    result = extract(
        _settings(ModelSettings, args, name=args.model), args.data, _settings(CodeSettings, args),
        run=_settings(RunSettings, args), data_options=_data_options(args), cache_dir=args.cache_dir,
        strict=args.strict, wait=not args.no_wait, progress=not args.quiet,
    )  # fmt: skip
    if result.resolved:
        log.info("layers: %s", ", ".join(f"{k} -> {v}" for k, v in result.resolved.items()))
    if result.skipped:
        log.warning(
            "%d image(s) could not be decoded and were skipped (listed in /skipped of the file)",
            len(result.skipped),
        )
    print(result.path)
    return 0


def cmd_info(args) -> int:
    from featx.report import info_text
    from featx.store import CodesFile, journal_path, journal_problem, read_progress

    path = args.file
    if not os.path.isfile(path):  # a partial entry, named by its file or by its journal folder
        entry = path.rstrip("/").removesuffix(".partial")
        prog = read_progress(entry)
        if prog is None and os.path.isdir(journal_path(entry)):
            raise UsageError(f"featx info: {path}: a partial entry whose journal cannot be resumed "
                             f"({journal_problem(entry)}); rerun its extract command to start it over")  # fmt: skip
        if prog is None:
            raise UsageError(f"featx info: {path}: no such file or partial entry")
        done = {k: prog[k] for k in ("samples_done", "samples", "rows_done")}
        done["layers"] = prog["layers"]
        done["skipped"] = len(prog.get("skipped", []))
        if args.json:
            print(json.dumps({"state": "partial", **done}, indent=1))
        else:
            print(f"{path}: partial entry: {done['samples_done']} of {done['samples']} images done "
                  f"({done['rows_done']} rows), layers {', '.join(done['layers'])}; rerun its extract command to finish")  # fmt: skip
        return 0
    with CodesFile(path) as f:
        layers = [{"name": n, "dim": f.dim(n), **f.layer_attrs(n)} for n in f.layers]
        splits = {s: int((f.split == s).sum()) for s in ("train", "val", "test") if (f.split == s).any()}
        if args.json:
            print(json.dumps({"state": "complete", "attrs": f.attrs, "layers": layers, "splits": splits,
                              "classes": f.classes, "skipped": f.skipped}, indent=1, default=str))  # fmt: skip
            return 0
        print(info_text(path, f, layers, splits))
    return 0


def cmd_cache(args) -> int:
    from featx.cache import default_cache_dir, list_entries, remove_entries
    from featx.report import format_table

    if args.cache_command not in ("ls", "rm"):
        raise UsageError("featx cache: use `featx cache ls` or `featx cache rm ENTRY...`")
    cache_dir = args.cache_dir or default_cache_dir()
    if args.cache_command == "ls":
        entries = list_entries(cache_dir)
        if not entries:
            print(f"no entries in {os.path.abspath(cache_dir)}", file=sys.stderr)
            return 0
        rows = []
        for e in entries:
            d = e.detail
            if e.state == "complete":
                what = f"{d.get('model')} {d.get('weights')} | {len(d.get('layers', []))} layers | {d.get('dataset')}"
                rows.append(
                    [os.path.basename(e.path), "complete", d.get("rows"), round(e.size / 2**20, 1), what]
                )
            elif e.state == "partial":
                rows.append([os.path.basename(e.path), f"partial {d['samples_done']}/{d['samples']}", d.get("rows"),
                             round(e.size / 2**20, 1), ", ".join(d.get("layers", []))])  # fmt: skip
            else:
                rows.append(
                    [os.path.basename(e.path), e.state, None, round(e.size / 2**20, 1), d.get("reason")]
                )
        print(format_table(rows, ["entry", "state", "rows", "MiB", "contents"], align="llrrl"))
        return 0
    if args.cache_command == "rm":
        removed, busy = remove_entries(cache_dir, args.entries, args.all)
        for path in removed:
            print(f"removed {path}")
        if busy:
            names = ", ".join(os.path.basename(p) for p in removed)
            done = (
                f"removed {len(removed)} entries ({names}); kept {len(busy)}: "
                if removed
                else "nothing removed: "
            )
            held = f"{', '.join(busy)} {'is' if len(busy) == 1 else 'are'} being written by another featx process"
            raise FeatxError(f"{done}{held}; stop it (or wait for it), then rerun")
        return 0
    raise UsageError("featx cache: use `featx cache ls` or `featx cache rm ENTRY...`")


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated numbers") from None


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated integers") from None


def _fit_outputs(args) -> None:
    """Every file a fit writes must be its own: one output overwriting another (or the codes file)
    would destroy what the run just saved."""
    from featx.classifier_io import classifier_path, export_paths

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


def cmd_fit(args) -> int:
    from featx.classifier_io import export_joblib, save_classifier
    from featx.classify import fit, parse_train_size, protocol_for
    from featx.report import fit_text

    overrides = {k: v for k, v in {
        "Cs": _floats(args.Cs, "--C") if args.Cs else None, "scale": args.scale, "pca": args.pca, "cv": args.cv,
        "val_fraction": args.val_fraction, "epochs": args.epochs, "chunk_rows": args.chunk_rows, "max_iter": args.max_iter,
        **_solver_overrides(args),
    }.items() if v is not None}  # fmt: skip
    protocol = protocol_for(args.classifier, args.preset, **overrides)
    seeds = _ints(args.seeds, "--seeds") if args.seeds else (args.seed,)
    if args.jobs == 0 or args.jobs < -1:
        raise UsageError(f"--jobs {args.jobs}: use a positive number, or -1 for all cores")
    _fit_outputs(args)
    report = fit(args.file, args.layer, protocol, parse_train_size(args.train_size), seeds, args.jobs, args.concat,
                 return_models=bool(args.out or args.export_joblib))  # fmt: skip
    data = report.to_dict()
    if args.out:
        log.info(
            "saved %s (%s) with its description and results", save_classifier(args.out, report), report.best
        )
    if args.export_joblib:
        log.info("exported the pipeline to %s and %s (a pickle: predict needs --trust-pickle)",
                 *export_joblib(args.export_joblib, report))  # fmt: skip
    if args.results:
        from featx.store import write_json_atomic

        try:
            write_json_atomic(args.results, data)
        except OSError as e:
            raise FeatxError(f"--results {args.results}: cannot write ({e.strerror or e})") from None
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(fit_text(report, args.file, seeds))
    return 0


def cmd_predict(args) -> int:
    from featx.predict import Predictor, collect_images
    from featx.report import format_table

    paths = collect_images(args.inputs)
    predictor = Predictor(args.classifier, weights=args.weights, device=args.device, force=args.force,
                          trust_pickle=args.trust_pickle)  # fmt: skip
    try:
        preds = predictor.predict(paths, top_k=args.top_k, batch_size=args.batch_size,
                                  workers=0 if args.workers == "auto" else args.workers)  # fmt: skip
    finally:
        predictor.close()
    if args.json:
        print(json.dumps([p.to_dict() for p in preds], indent=1))
    else:
        rows = [[p.path, p.label, f"{p.score:.4f}" if p.score is not None else None,
                 ", ".join(f"{c} {s:.3f}" for c, s in p.top) if not p.error else f"error: {p.error}"] for p in preds]  # fmt: skip
        print(format_table(rows, ["image", "class", "score", f"top {args.top_k}"], align="llrl"))
    failed = sum(p.error is not None for p in preds)
    if failed:
        log.warning("%d of %d images could not be decoded", failed, len(preds))
    return 1 if failed == len(preds) else 0


def _bench_protocols(args) -> list:
    from featx.classify import protocol_for

    overrides = {k: v for k, v in {"Cs": _floats(args.Cs, "--C") if args.Cs else None, "scale": args.scale,
                                   "cv": args.cv, **_solver_overrides(args)}.items() if v is not None}  # fmt: skip
    if args.preset:
        return [protocol_for(preset=args.preset, **overrides)]
    names = [c.strip() for c in args.classifier.split(",") if c.strip()]
    if not names:
        raise UsageError("--classifier is empty; use svm, softmax or sgd")
    plain = {k: v for k, v in overrides.items() if k not in ("solver", "device")}  # --solver is softmax's
    return [protocol_for(c, **(overrides if c == "softmax" else plain)) for c in dict.fromkeys(names)]


def _run_bench(config, command: str, progress: bool) -> int:
    from featx.bench import run
    from featx.report import write_bench_report

    result = run(config, progress=progress)
    paths = write_bench_report(result, command)
    log.info("bench done: %d cells; report and plots in %s", len(result.cells), config.out)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_bench(args) -> int:
    from featx.bench import BenchConfig, parse_bench_data
    from featx.settings import CodeSettings, ModelSettings, RunSettings

    if args.jobs == 0 or args.jobs < -1:
        raise UsageError(f"--jobs {args.jobs}: use a positive number, or -1 for all cores")
    config = BenchConfig(
        _settings(ModelSettings, args, name=args.model), [parse_bench_data(d) for d in args.data],
        CodeSettings(args.layers), _settings(RunSettings, args),
        train_sizes=[s.strip() for s in args.train_sizes.split(",") if s.strip()] or ["all"],
        protocols=_bench_protocols(args), seeds=_ints(args.seeds, "--seeds") or (0,), data_options=_data_options(args),
        baseline_pixels=args.baseline == "pixels", pixel_size=args.pixel_size, out=args.out, cache_dir=args.cache_dir,
        jobs=args.jobs, scheduler=args.scheduler,
    )  # fmt: skip
    from featx.classify import parse_train_size

    for s in config.train_sizes:
        parse_train_size(s)
    return _run_bench(config, "featx " + shlex.join(args.argv), not args.quiet)


def cmd_demo(args) -> int:
    """A small bench that works offline on a fresh install."""
    from featx.bench import demo_config

    config = demo_config(args.data, args.out, args.cache_dir, args.jobs)
    return _run_bench(config, "featx " + shlex.join(args.argv), not args.quiet)


COMMANDS = {"layers": cmd_layers, "extract": cmd_extract, "fit": cmd_fit, "predict": cmd_predict, "bench": cmd_bench, "demo": cmd_demo, "info": cmd_info,
            "cache": cmd_cache}  # fmt: skip


# -- featx score ---------------------------------------------------------------------------------


def _add_score_parser(sub) -> None:
    p = sub.add_parser(
        "score", help="transferability scores of every layer on the training split; ranks models"
    )
    p.add_argument(
        "files", nargs="+", metavar="FILE", help="codes files from featx extract (several: one per model)"
    )
    p.add_argument(
        "--layer", "--layers", dest="layer", default="all", help="layers, comma-separated, or all (default)"
    )
    p.add_argument(
        "--metric",
        "--metrics",
        dest="metric",
        default="all",
        help="logme, hscore, transrate, comma-separated, or all (default)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")  # fmt: skip


def cmd_score(args) -> int:
    from featx.report import score_text
    from featx.scores import parse_metrics, rank_models, score_file

    metrics = parse_metrics(args.metric)
    results = [score_file(path, args.layer, metrics) for path in args.files]
    ranking = rank_models(results, metrics) if len(results) > 1 else None
    if args.json:
        print(json.dumps({"metrics": metrics, "files": results, "ranking": ranking}, indent=1))
    else:
        print(score_text(results, ranking, metrics))
    return 0


COMMANDS["score"] = cmd_score


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("featx: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        args.argv = argv
        _setup_logging(args.quiet)
        if not args.command:
            parser.print_help(sys.stderr)
            return 2
        return COMMANDS[args.command](args)
    except FeatxError as e:
        msg = str(e).replace("\n", " ")
        print(f"featx: error: {msg}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("featx: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `featx layers resnet50 | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
