"""`featx export FILE --layer L --out PATH`: one layer's codes and the row metadata as .npy, .parquet or .h5."""

from __future__ import annotations

from featx.cli import options as o


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write one layer's codes as .npy, .parquet or .h5, with labels, ids and splits"
    )
    p.add_argument("file", help="a codes file from featx extract")
    p.add_argument("--layer", required=True, help="the layer to export (featx info FILE lists them)")
    p.add_argument(
        "--out", required=True, help="PATH.npy (metadata in files beside it), PATH.parquet or PATH.h5"
    )
    p.add_argument(
        "--block-rows",
        type=o.positive_int,
        default=None,
        help="rows read and written at a time (65536): memory is one block",
    )


def run(args) -> int:
    from featx.store.export import BLOCK_ROWS, export_layer

    written = export_layer(args.file, args.layer, args.out, args.block_rows or BLOCK_ROWS)
    for path in written:
        print(path)
    return 0
