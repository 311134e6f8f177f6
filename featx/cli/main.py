"""The top-level parser and the dispatch: one line per command."""

from __future__ import annotations

import logging
import os
import sys

from featx import __version__
from featx.cli import bench, export, extract, finetune, fit, info, layers, predict, score
from featx.cli.options import Parser, subcommands
from featx.errors import FeatxError

log = logging.getLogger("featx")

# command -> (its parser, what runs it); the order is `featx --help`'s
COMMANDS = {
    "layers": (layers.add_parser, layers.run),
    "extract": (extract.add_parser, extract.run),
    "fit": (fit.add_parser, fit.run),
    "predict": (predict.add_parser, predict.run),
    "bench": (bench.add_parser, bench.run),
    "demo": (bench.add_demo_parser, bench.run_demo),
    "info": (info.add_parser, info.run),
    "cache": (info.add_cache_parser, info.run_cache),
    "score": (score.add_parser, score.run),
    "export": (export.add_parser, export.run),
    "finetune": (finetune.add_parser, finetune.run),
}


def build_parser() -> Parser:
    parser = Parser(
        prog="featx", description="Tap layers of pretrained CNNs into an HDF5 cache and measure them."
    )
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = subcommands(parser, dest="command", metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


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
        return COMMANDS[args.command][1](args)
    except FeatxError as e:
        print(f"featx: error: {str(e).replace(chr(10), ' ')}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("featx: interrupted", file=sys.stderr)
        return 130
    except MemoryError:  # the machine's (or a ulimit's) memory ran out: a failure of the run, not a bug
        print("featx: error: out of memory; for fit: --classifier sgd (streams the codes), --pca K or a smaller "
              "--train-size; elsewhere a smaller --batch-size or --workers 0", file=sys.stderr)  # fmt: skip
        return 1
    except BrokenPipeError:  # e.g. `featx layers resnet50 | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
