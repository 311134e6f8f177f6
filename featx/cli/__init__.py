"""The `featx` command: argparse -> the Python API -> printed results.

One module per command (`featx/cli/extract.py`, `fit.py`, ...), each with `add_parser(sub)` (its
options) and `run(args)` (parse values into settings, call the library, print); `options.py`
holds the option types and groups that several commands share, `main.py` the dispatch. Adding a
command is one module plus one line in `main.COMMANDS`.

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

from featx.cli.main import build_parser, main  # noqa: E402

__all__ = ["build_parser", "main"]
