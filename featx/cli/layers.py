"""`featx layers MODEL`: a model's tappable layers."""

from __future__ import annotations

from featx.cli.options import MODEL_HELP, add_model_args, settings_from
from featx.errors import UsageError


def add_parser(sub) -> None:
    p = sub.add_parser("layers", help="list a model's tappable layers")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    add_model_args(p)
    p.add_argument("--all", action="store_true", help="every module, not only the main path")
    p.add_argument(
        "--pool",
        default="avg",
        help="pooling used for the code-dim column (default avg; cls, mean, cls+mean for token maps)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--list-models", action="store_true", help="list the model names featx accepts")


def run(args) -> int:
    from featx.cli.tables import layers_json, layers_text
    from featx.models.plan import resolve
    from featx.models.spec import featx_models, torchvision_models
    from featx.settings import ModelSettings, parse_pool

    if args.list_models:
        print(
            "\n".join([*torchvision_models(), *featx_models(), "timm:NAME[.TAG] (any of timm.list_models())"])
        )
        return 0
    if not args.model:
        raise UsageError("featx layers: give a model name (or --list-models)")
    # DEFAULT's preprocessing needs no download; models without pretrained weights fall back to none
    plan = resolve(settings_from(ModelSettings, args, name=args.model), default_may_be_none=True)
    pool = parse_pool(args.pool)
    print(layers_json(plan, pool, args.all) if args.json else layers_text(plan, pool, args.all))
    return 0
