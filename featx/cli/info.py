"""`featx info FILE` and `featx cache ls|rm`: what a codes file or the cache holds."""

from __future__ import annotations

import json
import os
import sys

from featx.cli import options as o
from featx.errors import FeatxError, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="what a codes file (or a partial entry) holds")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or remove cache entries")
    csub = o.subcommands(p, dest="cache_command", metavar="ls|rm|verify")
    q = csub.add_parser("ls", help="list entries")
    q.add_argument("--cache-dir")
    q = csub.add_parser("rm", help="remove entries by file name, path or key prefix")
    q.add_argument("entries", nargs="*")
    q.add_argument("--all", action="store_true", help="remove every entry")
    q.add_argument("--cache-dir")
    q = csub.add_parser(
        "verify", help="check entries in full (every codes checksum, part files); default all"
    )
    q.add_argument("entries", nargs="*")
    q.add_argument("--cache-dir")


def _partial(path: str, as_json: bool) -> int:
    from featx.store.journal import journal_path, journal_problem, read_progress

    entry = path.rstrip("/").removesuffix(".partial")
    prog = read_progress(entry)
    if prog is None and os.path.isdir(journal_path(entry)):
        raise UsageError(
            f"featx info: {path}: a partial entry whose journal cannot be resumed "
            f"({journal_problem(entry)}); rerun its extract command to start it over"
        )
    if prog is None:
        raise UsageError(f"featx info: {path}: no such file or partial entry")
    done = {k: prog[k] for k in ("samples_done", "samples", "rows_done", "layers")}
    done["skipped"] = len(prog.get("skipped", []))
    if as_json:
        print(json.dumps({"state": "partial", **done}, indent=1))
    else:
        print(
            f"{path}: partial entry: {done['samples_done']} of {done['samples']} images done "
            f"({done['rows_done']} rows), layers {', '.join(done['layers'])}; rerun its extract command to finish"
        )
    return 0


def run(args) -> int:
    from featx.cli.tables import info_text
    from featx.store.codes import CodesFile

    if not os.path.isfile(args.file):  # a partial entry, named by its file or by its journal folder
        return _partial(args.file, args.json)
    with CodesFile(args.file) as f:
        layers = [{"name": n, "dim": f.dim(n), **f.layer_attrs(n)} for n in f.layers]
        splits = {s: int((f.split == s).sum()) for s in ("train", "val", "test") if (f.split == s).any()}
        groups = _groups(f)
        if args.json:
            print(
                json.dumps(
                    {
                        "state": "complete",
                        "attrs": f.attrs,
                        "layers": layers,
                        "splits": splits,
                        "labelled": f.labelled,
                        "classes": f.classes,
                        "skipped": f.skipped,
                        "groups": groups,
                    },
                    indent=1,
                    default=str,
                )
            )
        else:
            text = info_text(args.file, f, layers, splits)
            if groups:  # after the header lines, before the layer table
                head, sep, rest = text.partition("\n\n")
                text = f"{head}\n  groups        {groups['text']}{sep}{rest}"
            print(text)
    return 0


def _groups(f) -> dict | None:
    """The entry's groups (`--group-by REGEX|auto`, a CSV group column): how many, their sizes."""
    if f.groups is None:
        return None
    import numpy as np

    from featx.sources.autogroups import describe

    sizes = np.unique(f.groups, return_counts=True)[1]
    by_size = dict(zip(*(v.tolist() for v in np.unique(sizes, return_counts=True))))
    mode = (f.meta.data_options or {}).get("group_by") if isinstance(f.meta.data_options, dict) else None
    return {
        "count": int(len(sizes)),
        "sizes": {int(k): int(v) for k, v in by_size.items()},
        "group_by": mode,
        "text": f"{describe(f.groups)}{f' (--group-by {mode})' if mode else ''}",
    }


def run_cache(args) -> int:
    from featx.cli.tables import cache_text
    from featx.store.cache import default_cache_dir, list_entries, remove_entries, verify_entries

    if args.cache_command not in ("ls", "rm", "verify"):
        raise UsageError(
            "featx cache: use `featx cache ls`, `featx cache rm ENTRY...` or `featx cache verify`"
        )
    cache_dir = args.cache_dir or default_cache_dir()
    if args.cache_command == "verify":
        results = verify_entries(cache_dir, args.entries)
        bad = [(p, why) for p, why in results if why is not None]
        for path, why in results:
            if why is None:
                print(f"ok {path}")
        if bad:
            more = f" ({len(bad) - 1} more failed)" if len(bad) > 1 else ""
            raise FeatxError(f"{bad[0][0]}: {bad[0][1]}{more}; rerun its featx extract to rebuild it")
        if not results:
            print(f"no complete entries in {os.path.abspath(cache_dir)}", file=sys.stderr)
        return 0
    if args.cache_command == "ls":
        entries = list_entries(cache_dir)
        if entries:
            print(cache_text(entries))
        else:
            print(f"no entries in {os.path.abspath(cache_dir)}", file=sys.stderr)
        return 0
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
