"""`featx extract`: codes into the cache; the file's path is the last stdout line."""

from __future__ import annotations

import logging

from featx.cli import options as o
from featx.engine.distributed import in_launcher

log = logging.getLogger("featx")


def add_parser(sub) -> None:
    p = sub.add_parser("extract", help="extract codes into the cache; prints the file's path last")
    p.add_argument("--model", required=True, help=o.MODEL_HELP)
    o.add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        help="image folder, CSV manifest, sklearn:digits, idx folder or torchvision:NAME",
    )
    o.add_code_args(p)
    o.add_data_args(p)
    p.add_argument(
        "--strict", action="store_true", help="stop at the first undecodable image instead of skipping it"
    )
    p.add_argument("--cache-dir", help=o.CACHE_HELP)
    o.add_device_args(p)
    o.add_run_args(p)
    p.add_argument(
        "--distributed",
        action="store_true",
        default=in_launcher(),
        help="be one rank of a torchrun job (the default under torchrun: RANK/WORLD_SIZE set)",
    )
    p.add_argument(
        "--no-wait", action="store_true", help="fail instead of waiting when another process writes the entry"
    )


def run(args) -> int:
    from featx.engine.extract import extract
    from featx.settings import CodeSettings, DataOptions, ModelSettings, RunSettings

    result = extract(
        o.settings_from(ModelSettings, args, name=args.model),
        args.data,
        o.settings_from(CodeSettings, args),
        run=o.settings_from(RunSettings, args),
        data_options=o.settings_from(DataOptions, args),
        cache_dir=args.cache_dir,
        strict=args.strict,
        wait=not args.no_wait,
        progress=not args.quiet,
    )
    if result.resolved:
        log.info("layers: %s", ", ".join(f"{k} -> {v}" for k, v in result.resolved.items()))
    if result.skipped:
        log.warning(
            "%d image(s) could not be decoded and were skipped (listed in /skipped of the file)",
            len(result.skipped),
        )
    if result.rank == 0:  # a distributed job's other ranks print nothing on stdout
        print(result.path)
    return 0
