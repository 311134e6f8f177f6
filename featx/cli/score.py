"""`featx score FILE...`: transferability scores of every layer; several files rank models."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
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
        help="logme, hscore, transrate, gbc, comma-separated, or all (default)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args) -> int:
    from featx.classifiers.scores import parse_metrics, rank_models, score_file
    from featx.cli.tables import score_text

    metrics = parse_metrics(args.metric)
    results = [score_file(path, args.layer, metrics) for path in args.files]
    ranking = rank_models(results, metrics) if len(results) > 1 else None
    if args.json:
        print(json.dumps({"metrics": metrics, "files": results, "ranking": ranking}, indent=1))
    else:
        print(score_text(results, ranking, metrics))
    return 0
