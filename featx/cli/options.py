"""Option types and the option groups several commands share, and the one mapping from parsed
options to settings objects (`settings_from`: options are named like the fields they fill)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from featx.errors import UsageError
from featx.settings import CHANNELS_LAST, DECODERS, DTYPES, MODEL_NAMES, PRECISIONS


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _integer(text: str, minimum: int, want: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def auto_or_int(text: str):
    return "auto" if text == "auto" else positive_int(text)


def workers(text: str):
    return "auto" if text == "auto" else _integer(text, 0, "auto or an integer >= 0")


def fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return v


def floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated numbers") from None


def ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated integers") from None


def check_jobs(jobs: int) -> int:
    if jobs == 0 or jobs < -1:
        raise UsageError(f"--jobs {jobs}: use a positive number, or -1 for all cores")
    return jobs


def settings_from(cls, args, **given):
    """A settings object from the parsed options named like its fields (one mapping for every
    command: a new option is one field plus one CLI line)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **given})


def subcommands(parser: argparse.ArgumentParser, **kw):
    """Subparsers that also accept -q after the command name (`featx extract ... -q`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="only warnings and errors on stderr",
    )
    sub = parser.add_subparsers(parser_class=Parser, **kw)
    add = sub.add_parser
    sub.add_parser = lambda name, **k: add(name, parents=[common], **k)
    return sub


MODEL_HELP = MODEL_NAMES
CACHE_HELP = "cache directory (default: $FEATX_CACHE_DIR or ./cache)"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """ModelSettings' options (the model name itself is each command's own argument)."""
    p.add_argument(
        "--weights",
        default="DEFAULT",
        help="DEFAULT, a torchvision weights name (IMAGENET1K_V1), a timm tag, imagenet "
        "(efficientnet_lite0), none (random init) or a checkpoint path (default: DEFAULT)",
    )
    p.add_argument("--image-size", type=positive_int, help="input size in pixels (default: the weights')")
    p.add_argument("--crop-pct", type=fraction, help="centre-crop fraction (default: the weights')")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """DataOptions' options: how a source is cut into samples; shared by extract and bench."""
    p.add_argument(
        "--test-fraction", type=fraction, default=0.2, help="test share for data without splits (0.2)"
    )
    p.add_argument("--per-class-limit", help="at most K images per class and split: K, or train=K1,test=K2")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and subsets (default 0)")
    p.add_argument("--data-root", help="where torchvision:NAME datasets live (downloaded there)")
    p.add_argument(
        "--group-by",
        metavar="REGEX|auto[:T]",
        help="group images by the first match of REGEX on their relative path (its first capture group "
        "if it has one), or with auto[:T] into near-duplicate clusters of the deepest layer's codes "
        "(cosine >= T, default 0.9): a group never sits on both sides of a split, hold-out or CV fold",
    )


def add_device_args(p: argparse.ArgumentParser) -> None:
    """RunSettings' options that every forward takes; shared by extract and bench."""
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=auto_or_int, default="auto", help="images per forward pass, or auto")
    p.add_argument("--workers", type=workers, default="auto", help="data-loading processes, or auto")
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="forward precision: auto = fp32 or bf16, whichever is measured faster on this device",
    )


def add_code_args(p: argparse.ArgumentParser, layers: str = "depth:1.0") -> None:
    """CodeSettings' options."""
    p.add_argument(
        "--layers",
        default=layers,
        help=f"module names and/or depth fractions: layer2,layer4 or depth:0.25,0.5,1.0 (default: {layers})",
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


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The rest of RunSettings: options that only change speed."""
    p.add_argument(
        "--channels-last", default="auto", choices=CHANNELS_LAST, help="memory format for the forward"
    )
    p.add_argument(
        "--decoder",
        default="auto",
        choices=DECODERS,
        help="pil: decode and resize in workers; torchvision: batched JPEG decode and resize on the device "
        "(auto: torchvision on CUDA)",
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the forward (slow first batch; off by default)"
    )
