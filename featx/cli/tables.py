"""What the CLI prints: layers, info, cache, predictions, scores and fit tables."""

from __future__ import annotations

import os
from collections.abc import Sequence

from featx.bench.report import fixed, format_cell, is_number


def format_table(rows: Sequence[Sequence], headers: Sequence[str], align: str | None = None) -> str:
    """A fixed-width text table; `align` has one 'l' or 'r' per column (numbers right by default)."""
    cells = [[format_cell(v) for v in row] for row in rows]
    if align is None:
        align = "".join(
            "r" if rows and all(is_number(r[j]) for r in rows) else "l" for j in range(len(headers))
        )
    widths = [max([len(h)] + [len(r[j]) for r in cells]) for j, h in enumerate(headers)]

    def line(vals):
        return "  ".join(
            v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *[line(r) for r in cells]])


def layers_json(plan, pool, show_all: bool) -> str:
    """`featx layers --json`: the model's taps (main path, or all) with their code dims under `pool`
    (null where `pool` cannot apply); token maps also give their patch-token count."""
    import json

    from featx.models.taps import activation_for

    pre = plan.preprocess
    taps = [t for t in plan.taps if show_all or t.trunk]
    return json.dumps(
        {
            "model": str(plan.model),
            "input_size": pre.crop_size,
            "preprocessing": pre.to_dict(),
            "layers": [
                {
                    **t.to_dict(),
                    "relu_by_default": activation_for(t) != "none",
                    "patch_tokens": t.shape[0] - t.prefix_tokens if t.tokens else None,
                    "code_dim": None if pool.problem(t) else t.code_dim(pool),
                }
                for t in taps
            ],
        },
        indent=1,
    )


def _output_text(t) -> str:
    """A tap's output shape: C x H x W, D, or a token map as [prefix+]patches tok x D."""
    if not t.tokens:
        return "x".join(str(s) for s in t.shape)
    n, d = t.shape
    tokens = f"{t.prefix_tokens}+{n - t.prefix_tokens}" if t.prefix_tokens else str(n)
    return f"{tokens} tok x {d}"


def _holds_stages(t, shown) -> bool:
    """Whether `t` contains shown modules that themselves contain shown modules."""
    kids = [c for c in shown if c.name.startswith(t.name + ".") and c.level == t.level + 1]
    return any(any(g.name.startswith(c.name + ".") for g in shown) for c in kids)


def layers_text(plan, pool, show_all: bool) -> str:
    """`featx layers`: the taps as a table, and how to read it."""
    from featx.models.taps import RELU_FAMILY, activation_for

    pre = plan.preprocess
    shown = [t for t in plan.taps if show_all or t.trunk]
    if (
        not show_all
    ):  # a container of stages (timm's `blocks`) repeats its last block's output: --all lists it
        shown = [t for t in shown if not _holds_stages(t, shown)]
    rows = []
    for t in shown:
        dim = "-" if pool.problem(t) else t.code_dim(pool)
        depth = "head" if t.depth > 1.0 else f"{t.depth:.2f}"
        rows.append(
            [
                "  " * t.level + t.name,
                t.kind,
                _output_text(t),
                t.stride,
                depth,
                t.activation_label,
                "yes" if activation_for(t) != "none" else "no",
                dim,
            ]
        )
    tokens = any(t.tokens for t in shown)
    output = (
        ("output (C,H,W | tokens x D)" if any(len(t.shape) == 3 for t in shown) else "output (tokens x D)")
        if tokens
        else "output (C,H,W)"
    )
    table = format_table(
        rows,
        ["layer", "type", output, "stride", "depth", "activation", "relu'd", f"dim ({pool})"],
        align="lllrrllr",
    )
    text = (
        f"\n\n{plan.model} at {pre.crop_size}px: {pre}. 'activation': post-X = the output already went "
        f"through X; ->X = the network applies X next. Codes are ReLU'd where 'relu'd' says yes (--no-relu "
        f"keeps raw outputs, --relu forces ReLU everywhere). depth: share of conv/linear ops done (1.0 = "
        f"penultimate); head: the classifier's output (ImageNet scores), tapped by name, never by depth:."
    )
    acts = {a for t in plan.taps for a in (t.post_act, t.next_act) if a}
    if acts and not acts & set(RELU_FAMILY):
        text += f" This network uses {', '.join(sorted(acts))}, no ReLU: no code is ReLU'd by default."
    if tokens:
        text += (
            " Token maps: P+N tok x D = P prefix tokens (the class token first, then any register or "
            "distillation tokens) and N patch tokens of dim D. --pool cls takes the class token, mean (= avg) "
            "and max pool the patch tokens only, cls+mean concatenates the class token and the patch mean "
            "(2 x D)."
        )
    return table + text + ("" if show_all else " --all lists every module.")


def info_text(path: str, f, layers: list[dict], splits: dict) -> str:
    """`featx info FILE`: a complete codes file (`f`, a CodesFile) in a few lines and a layer table."""
    m = f.meta
    sha = str(m.weights_sha256 or "")
    lines = [
        f"{path}",
        f"  model         {m.model}  weights {m.weights} ({m.weights_source}"
        + (f", sha256 {sha[:16]}..." if sha else "")
        + ")",
        f"  preprocessing {m.preprocessing_text}",
        f"  dataset       {m.dataset}  ("
        + (
            f"{len(f.classes)} classes"
            if f.labelled
            else "unlabelled: no classes; fit, score and bench refuse it"
        )
        + f"; splits {splits}, {m.split_source})",
        f"  rows          {len(f)} of {m.samples} images ({len(f.skipped)} skipped), state {f.attrs.get('featx_state')}",
        f"  extraction    {m.precision} on {m.device}, batch {m.batch_size}, dtype {m.dtype}, created {m.created}, "
        f"featx {m.featx_version}, format {m.format_version}",
        "",
    ]
    rows = [
        [
            ly["name"],
            ly["dim"],
            _shape_text(ly.get("pre_pool_shape")),
            ly.get("pool"),
            ly.get("activation"),
            fixed(ly.get("depth")),
        ]
        for ly in layers
    ]
    lines.append(
        format_table(rows, ["layer", "dim", "pre-pool shape", "pool", "activation", "depth"], align="lrllll")
    )
    lines += [f"  skipped {ident}: {reason}" for ident, reason in f.skipped[:10]]
    if len(f.skipped) > 10:
        lines.append(f"  ... {len(f.skipped) - 10} more in /skipped")
    return "\n".join(lines)


def cache_text(entries) -> str:
    """`featx cache ls`: one row per entry (cache.list_entries)."""
    rows = []
    for e in entries:
        d, mib = e.detail, round(e.size / 2**20, 1)
        if e.state == "complete":
            what = f"{d.get('model')} {d.get('weights')} | {len(d.get('layers', []))} layers | {d.get('dataset')}"
            rows.append([os.path.basename(e.path), "complete", d.get("rows"), mib, what])
        elif e.state == "partial":
            shards = f" ({d['shards']} shards)" if d.get("shards") else ""
            rows.append(
                [
                    os.path.basename(e.path),
                    f"partial {d['samples_done']}/{d['samples']}{shards}",
                    d.get("rows"),
                    mib,
                    ", ".join(d.get("layers", [])),
                ]
            )
        else:
            rows.append([os.path.basename(e.path), e.state, None, mib, d.get("reason")])
    return format_table(rows, ["entry", "state", "rows", "MiB", "contents"], align="llrrl")


def predictions_text(preds, top_k: int) -> str:
    """`featx predict`: one row per image (predict.Prediction)."""
    rows = [
        [
            p.path,
            p.label,
            f"{p.score:.4f}" if p.score is not None else None,
            ", ".join(f"{c} {s:.3f}" for c, s in p.top) if not p.error else f"error: {p.error}",
        ]
        for p in preds
    ]
    return format_table(rows, ["image", "class", "score", f"top {top_k}"], align="llrl")


def _shape_text(v) -> str:
    return "x".join(str(s) for s in v) if isinstance(v, (list, tuple)) else str(v)


def score_text(results: list[dict], ranking: dict | None, metrics: list[str]) -> str:
    """`featx score`'s tables: per file and layer its scores; with several files, the model ranking."""
    several = len(results) > 1
    rows = [
        [
            f"{r['model']}@{r['weights']}" if several else ly["layer"],
            *([ly["layer"]] if several else []),
            "-" if ly["depth"] is None else fixed(ly["depth"]),
            ly["dim"],
            *("-" if ly["scores"][m] is None else f"{ly['scores'][m]:.4f}" for m in metrics),
            f"{ly['seconds']:.2f}",
        ]
        for r in results
        for ly in r["layers"]
    ]
    head = [*(["model", "layer"] if several else ["layer"]), "depth", "dim", *metrics, "s"]
    out = [
        f"{r['file']}: {r['model']} ({r['weights']}), {r['rows']} training images, {r['classes']} classes"
        for r in results
    ]
    out.append(
        format_table(rows, head, align="l" * (len(head) - len(metrics) - 3) + "r" * (len(metrics) + 3))
    )
    out += [
        f"  {r['model']} {ly['layer']}: {msg}"
        for r in results
        for ly in r["layers"]
        for msg in ly.get("errors", {}).values()
    ]
    if ranking:
        out.append("\nmodels by their best layer (higher is better; scores rank, probes measure):")
        rank_rows = [
            [m, i + 1, f"{e['model']}@{e['weights']}", e["layer"], f"{e['score']:.4f}"]
            for m in metrics
            for i, e in enumerate(ranking[m])
        ]
        out.append(format_table(rank_rows, ["metric", "rank", "model", "best layer", "score"], align="lrllr"))
    return "\n".join(out)


def _short(result: dict) -> str:
    """The continuous validation score's column name."""
    metric = result.get("val_tiebreak_metric", "")
    return {"mean log-likelihood": "log-lik", "mean margin": "margin", "mean average precision": "mAP"}.get(
        metric, "tie"
    )


def fit_text(report, codes_file: str, seeds) -> str:
    """`featx fit`'s tables: one line per layer (with the test accuracy's 95% interval), then the
    per-class numbers and the confusion matrix of the layer chosen by validation."""
    from featx.classifiers.cost import number_text, params_text
    from featx.classifiers.selection import LOGLIK
    from featx.stats import wilson_interval

    protocol = report.protocol
    several = len(seeds) > 1
    seeds_note = f" over seeds {','.join(map(str, seeds))}" if several else f", seed {seeds[0]}"
    rows = []
    for s in report.summary():
        acc = f"{s['accuracy']:.4f}" + (f" ± {s['accuracy_std']:.4f}" if several else "")
        bal = f"{s['balanced_accuracy']:.4f}" + (f" ± {s['balanced_accuracy_std']:.4f}" if several else "")
        lo, hi = wilson_interval(int(round(s["accuracy"] * s["n_test"])), s["n_test"])
        C = (
            s["C"]
            if not isinstance(s["C"], list)
            else "per-class"
            if protocol.per_class
            else "/".join(f"{c:.3g}" for c in s["C"])
        )
        rows.append(
            [
                s["layer"],
                s["dim"],
                C if isinstance(C, str) else f"{C:.4g}",
                f"{s['val_score']:.4f}",
                f"{s['val_tiebreak']:.4f}",
                acc,
                f"{lo:.3f}-{hi:.3f}",
                bal,
                s["train_size"],
                f"{s['fit_seconds']:.1f}",
                params_text(s.get("total_params")),
                number_text(s.get("inference_ms_per_image")),
            ]
        )
    first = report.results[0]
    name = protocol.preset or protocol.classifier
    out = [
        f"{name} on {codes_file}: train {first['train_size']} images ({report.train_size}), validation: "
        f"{first['val_source']}, test: the {first['test_split']} split ({first['n_test']} images){seeds_note}",
        format_table(
            rows,
            [
                "layer",
                "dim",
                "k, T" if protocol.classifier == "knn" else "C",
                "val score",
                f"val {_short(first)}",
                "test acc",
                "95% CI",
                "balanced acc",
                "train",
                "fit s",
                "params",
                "ms/img",
            ],
            align="lrrrrrrrrrrr",
        ),
    ]
    batch = next(
        (r.get("inference_batch_size") for r in report.results if r.get("inference_batch_size")), None
    )
    out.append(
        "params: the backbone's up to the layer plus the classifier's; ms/img: the forward to the layer on this "
        + (f"device at batch {batch}" if batch else "device")
        + "".join(f"; {n}" for n in getattr(report, "notes", []))
    )
    best = next(r for r in report.results if r["layer"] == report.best)
    if best.get("val_rule") == LOGLIK:
        how = (
            f"C and the layer by {first['val_source']} log-likelihood; the layer is the deepest within one "
            f"standard error of the best (paired over folds)"
        )
    else:
        how = (
            f"ties on validation score go to the better {best.get('val_tiebreak_metric', 'continuous score')}"
        )
    out.append(
        f"\nchosen layer: {report.best} (test accuracy {best['accuracy']:.4f}, 95% CI "
        f"{best['test_ci_low']:.3f}-{best['test_ci_high']:.3f}, seed {best['seed']}; {how})"
    )
    classes = list(best["per_class"])
    out.append(
        format_table(
            [
                [c, f"{v['precision']:.3f}", f"{v['recall']:.3f}", v["support"]]
                for c, v in best["per_class"].items()
            ],
            ["class", "precision", "recall", "support"],
            align="lrrr",
        )
    )
    out.append("\nconfusion matrix (rows: true, columns: predicted)")
    short = [c[:10] for c in classes]
    out.append(
        format_table([[short[i], *row] for i, row in enumerate(best["confusion_matrix"])], ["", *short])
    )
    return "\n".join(out)
