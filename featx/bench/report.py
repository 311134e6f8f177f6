"""Presentation: text and markdown tables for the CLI, and a bench's outputs (results.csv and
results.json, report.md, the depth and learning-curve plots)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from featx.bench.plots import (
    plot_depth,
    plot_learning_curves,
)
from featx.engine.cost import COST_FIELDS


def fixed(v, digits: int = 2) -> str:
    """A number from a file's attributes, which may hold anything: shown as it is if not a number."""
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def markdown_table(rows: Sequence[Sequence], headers: Sequence[str]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(format_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# results.json also holds each cell's `test_correct` (per-image correctness bits, for paired tests)

RESULT_COLUMNS = [
    "kind",
    "model",
    "control_of",
    "dataset",
    "similarity_label",
    "layer",
    "relative_depth",
    "code_dim",
    "train_size",
    "train_size_spec",
    "classifier",
    "preset",
    "C",
    "k",
    "temperature",
    "seed",
    "accuracy",
    "balanced_accuracy",
    "test_ci_low",
    "test_ci_high",
    "n_test",
    "val_score",
    "val_tiebreak",
    "val_source",
    "val_rule",
    "val_folds",
    "n_val",
    "fit_seconds",
    "baseline",
    "score_logme",
    "score_hscore",
    "score_transrate",
    "score_gbc",
    "train_from",
    "epoch",
    *COST_FIELDS,  # featx.engine.cost: method, parameters, training seconds, inference ms/image
    "lora_rank",
    "lora_alpha",
]


def write_results(rows: list[dict], out_dir: str) -> tuple[str, str]:
    """results.csv and results.json (one row per cell), written atomically."""
    import csv
    import io

    from featx.classifiers.selection import pack_folds, unpack_folds
    from featx.files import write_json_atomic, write_text_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(
            {
                **r,
                "C": "/".join(f"{c:g}" for c in r["C"])
                if isinstance(r["C"], list)
                else ""
                if r["C"] is None
                else r["C"]
                if isinstance(r["C"], str)
                else f"{r['C']:g}",
                "val_folds": pack_folds(unpack_folds(r.get("val_folds"))),
            }
        )
    csv_path, json_path = os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.json")
    write_text_atomic(csv_path, buf.getvalue())
    write_json_atomic(json_path, rows)
    return csv_path, json_path


def markdown_report(
    analyses,
    *,
    title: str,
    command: str | None,
    plots: list[str],
    notes: list[str],
    finetune=(),
    recipe: str = "",
    decision: Sequence[str] = (),
) -> str:
    """The bench's report.md: a summary table, the plots, then per dataset its table and evidence."""

    from featx.bench.analysis import CASES

    lines = [f"# {title}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    summary = []
    several = len({a.model for a in analyses}) > 1
    for a in analyses:
        size = a.sizes[-1]
        gain = f"{a.late_gain:.2f}" if a.late_gain is not None else "-"
        summary.append(
            [
                *([a.model] if several else []),
                a.name,
                a.classifier,
                a.label or "-",
                f"{a.measured} ({gain})",
                a.size_text,
                f"{a.case}",
                f"{a.best} ({a.depth[a.best]:.2f})",
                a.acc_text(a.best, size),
                f"{a.top}: {a.acc_text(a.top, size)}",
                str(a.pixels[size]) if size in a.pixels else "-",
            ]
        )
    lines += [
        markdown_table(
            summary,
            [
                *(["model"] if several else []),
                "dataset",
                "classifier",
                "label",
                "measured (late-layer gain)",
                "size",
                "case",
                "chosen layer (depth)",
                "its test acc",
                "top layer",
                "raw pixels",
            ],
        ),
        "",
    ]
    lines += [
        "The chosen layer is picked on validation (never on test) at the largest train size: the best validation "
        "score on a hold-out or val split; under cross-validation (softmax on small training sets), the deepest "
        "layer within one standard error of the best cross-validated log-likelihood (featx.classifiers.selection). "
        "Test accuracies are seed means with their Wilson 95% interval over the test images.",
        "",
        "Cases: " + "; ".join(f"{k}. {v}" for k, v in CASES.items()) + ".",
        "",
    ]
    lines += list(decision)  # featx.bench.decision: every probe and fine-tune with its cost, and the answer
    lines += _finetune_section(analyses, finetune, recipe)
    lines += _models_section(analyses) + _gain_section(analyses) + _scores_section(analyses)
    for p in plots:
        lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})", ""]
    several = len({a.model for a in analyses}) > 1
    for a in analyses:
        who = f"{a.model}, " if several else ""
        if a.control_of:  # a reference, never an answer: no "Use ...", no rule of thumb, no label check
            lines += [
                f"## {a.name} ({who}{a.classifier}): random-init control of {a.control_of}",
                "",
                f"A reference, not a candidate: the same architecture with random weights, so the gap to "
                f'{a.control_of} at each depth is what pretraining adds ("What pretraining adds" above).',
                "",
            ]
        else:
            lines += [f"## {a.name} ({who}{a.classifier}): case {a.case} ({a.size}, {a.similarity_text})", ""]
            lines += [f"**{a.answer}**", "", a.rule_check[0].upper() + a.rule_check[1:] + ".", ""]
        if a.disagrees and not a.control_of:
            lines += [
                f"**Label and measurement disagree**: labelled {a.label}, but the depth curve says {a.measured}.",
                "",
            ]
        header = ["layer", "depth", *[f"{s} ({a.size_counts[s]})" for s in a.sizes]]
        rows = []
        for n in a.layers:
            cells = []
            for s in a.sizes:
                st = a.acc.get((n, s))
                text = str(st) if st else "-"
                cells.append(f"**{text}**" if st and n == _best_at(a, s) else text)
            rows.append([n, f"{a.depth[n]:.2f}", *cells])
        if a.pixels:
            rows.append(["raw pixels", "-", *[str(a.pixels[s]) if s in a.pixels else "-" for s in a.sizes]])
        several_seeds = any(st.n > 1 for st in a.acc.values())
        caption = (
            "Test accuracy (mean ± std over seeds; bold: the chosen layer at that train size, picked on "
            "validation as above). The ± is the spread over seeds, each drawing its own training subset; at "
            "`all` the seeds share the training images and only the validation split changes, so a small ± "
            "there is not precision"
            if several_seeds
            else "Test accuracy (one seed; bold: the chosen layer at that train size, picked on validation as above)"
        )
        lines += [
            f"{caption}: the test set's own uncertainty is the 95% interval ({a.n_test} test images).",
            "",
            markdown_table(rows, header),
            "",
        ]
        lines += [f"- {e}" for e in a.evidence] + [""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(_once(lines))


def _once(lines: list[str]) -> list[str]:
    """No sentence twice: a bullet already printed (word for word) is dropped."""
    seen: set[str] = set()
    out = []
    for line in lines:
        if line.startswith("- ") and line in seen:
            continue
        seen.add(line)
        out.append(line)
    return out


def _finetune_section(analyses, comparisons, recipe: str) -> list[str]:
    """Fine-tuning beside probing: per dataset and train size the two picks, the gain, the verdict
    (exact McNemar, as for layers and models), convergence and the chosen recipe, and at the
    largest size whether the measurement confirms the rule of thumb's case."""
    from featx.bench.analysis import NOISE_P
    from featx.bench.finetune_cells import rule_line

    if not comparisons:
        return []
    lines = [
        "## Fine-tuning beside probing",
        "",
        "Per dataset and train size: the chosen probe layer and the best fine-tune freeze point, each chosen by "
        "validation score (mean over seeds), never by test; test accuracies are seed means with their Wilson 95% "
        "interval; the gain is fine-tune minus probe in points (± the fine-tune's spread over seeds). The verdict "
        f"is the exact McNemar test of the two on the same test images (first seed), the rule that judges layers "
        f'and models: "pays" or "does not pay" when p < {NOISE_P:g}, else "within noise". A fine-tune '
        'whose validation was still improving at its last epoch is marked "not converged": a budget '
        "measurement, not a verdict." + (f" Recipe: {recipe}." if recipe else ""),
        "",
    ]
    rows = [
        [
            c.dataset,
            c.size,
            f"{c.probe_layer}: {c.probe_acc:.3f} ({c.probe_ci[0]:.2f}-{c.probe_ci[1]:.2f})",
            f"{c.point} ({c.point_module.removeprefix('input (').removesuffix(')')}): {_spread(c.ft_acc, c.ft_std, c.seeds)} ({c.ft_ci[0]:.2f}-{c.ft_ci[1]:.2f})",
            f"{c.gain:+.1f}",
            c.p_text,
            c.verdict if c.converged else f"{c.verdict}; not converged",
            f"{c.epoch:g} of {c.epochs_run:g}",
            c.recipe,
        ]
        for c in comparisons
    ]
    lines += [
        markdown_table(
            rows,
            [
                "dataset",
                "train size",
                "probe (chosen layer)",
                "fine-tune (chosen freeze point)",
                "gain (points)",
                "McNemar p",
                "verdict",
                "chosen epoch of run",
                "chosen recipe",
            ],
        ),
        "",
    ]
    lines += [
        "Every freeze point (test accuracy, mean ± std over seeds, or one seed's; validation score in brackets; "
        "* not converged):",
        "",
    ]
    every = [[c.dataset, c.size, *(_point_text(p) for p in c.points)] for c in comparisons]
    width = max(len(c.points) for c in comparisons)
    lines += [
        markdown_table(
            [r + [""] * (2 + width - len(r)) for r in every],
            ["dataset", "train size", *[f"freeze point {i + 1}" for i in range(width)]],
        ),
        "",
    ]
    for a in analyses:
        mine = [
            c for c in comparisons if (c.dataset, c.model, c.classifier) == (a.name, a.model, a.classifier)
        ]
        if not mine or a.control_of:
            continue
        lines.append(f"- {rule_line(a, mine[-1])}")
    return lines + [""]


def _point_text(p: dict) -> str:
    star = "" if p.get("converged", True) else "*"
    return f"{p['point']}: {_spread(p['acc'], p['std'], p.get('seeds', 2))} [{p['val']:.3f}]{star}"


def _spread(mean: float, std: float, seeds: int) -> str:
    """'0.786 ± 0.012' over several seeds; one seed has no spread to show: '0.786 (one seed)'."""
    return f"{mean:.3f} ± {std:.3f}" if seeds > 1 else f"{mean:.3f} (one seed)"


def _models_section(analyses) -> list[str]:
    """Which model, which layer: per dataset, each model's chosen layer, and the pick by validation."""
    from featx.bench.crossmodel import model_choices

    choices = model_choices(analyses)
    if not choices:
        return []
    lines = [
        "## Which model, which layer",
        "",
        "Per dataset, each model's chosen layer (best by validation score at the largest train size) with its "
        "validation score and test accuracy (seed mean, Wilson 95% interval); the model is chosen the same way, "
        "by validation, never by test.",
        "",
    ]
    for c in choices:
        rows = [
            [
                f"**{a.model}**" if a is c.chosen else a.model,
                f"{a.best} ({a.depth[a.best]:.2f})",
                f"{a.val[(a.best, c.size)].mean:.3f}",
                a.acc_text(a.best, c.size),
            ]
            for a in c.entries
        ]
        lines += [
            f"### {c.dataset} ({c.classifier}), train size {c.size}",
            "",
            f"**{c.answer}**",
            "",
            markdown_table(rows, ["model", "chosen layer (depth)", "val score", "test acc (95% CI)"]),
            "",
        ]
        lines += [f"- {e}" for e in c.evidence] + [""]
    return lines


def _gain_section(analyses) -> list[str]:
    """What pretraining adds: pretrained minus random-init accuracy per depth."""
    from featx.bench.crossmodel import pretraining_gains

    gains = pretraining_gains(analyses)
    if not gains:
        return []
    lines = [
        "## What pretraining adds",
        "",
        "Test accuracy of each pretrained model minus its random-init control (the same architecture, featx's "
        "seeded random initialisation) at each depth, at the largest train size.",
        "",
    ]
    for g in gains:
        rows = [
            [n, f"{d:.2f}", f"{p:.3f}", f"{r:.3f}", f"{gain * 100:+.1f}"] for n, d, p, r, gain in g.by_layer
        ]
        lines += [
            f"### {g.dataset} ({g.classifier}): {g.model}",
            "",
            markdown_table(rows, ["layer", "depth", "pretrained", "random init", "gain (points)"]),
            "",
            g.sentence,
            "",
        ]
    return lines


# Kendall's tau over n layers reaches a two-sided p below 0.05 only from n = 5 on (n = 4: at best
# p = 2/4! = 0.083): over fewer layers a tau cannot tell agreement from chance, so none is printed
MIN_RANK_LAYERS = 5


def _scores_section(analyses) -> list[str]:
    """How well each transferability score ranked the layers against the measured probe."""
    from featx.bench.crossmodel import score_agreement

    rows = []
    for a in analyses:
        for s in score_agreement(a):
            tau = (
                "too few layers to rank"
                if s.n_layers < MIN_RANK_LAYERS
                else "-"
                if s.tau is None
                else f"{s.tau:+.2f} (p = {s.p:.2g})"
            )
            rows.append(
                [
                    a.name,
                    a.model or "-",
                    a.classifier,
                    s.metric,
                    s.n_layers,
                    tau,
                    s.pick + (" (= measured)" if s.pick == s.measured else ""),
                    s.measured,
                ]
            )
    if not rows:
        return []
    return [
        "## Transferability scores against the probes",
        "",
        "Kendall's tau-b across layers between each score (computed on the training rows of the largest train "
        "size, seed 0's draw) and the measured test accuracy of each layer's probe at that size, with the layer "
        "each score ranks first beside the layer validation chose. The scores show how far they agree with the "
        "measurement; they do not replace it: the chosen layers above are the measured ones. Over fewer than "
        f"{MIN_RANK_LAYERS} layers no tau is printed: none could reach p < 0.05.",
        "",
        markdown_table(
            rows,
            [
                "dataset",
                "model",
                "classifier",
                "score",
                "layers",
                "Kendall tau",
                "score's pick",
                "measured pick (validation)",
            ],
        ),
        "",
    ]


def _best_at(a, size: str) -> str:
    from featx.bench.analysis import best_layer

    return best_layer(a, size)


def leakage_lines(result) -> list[str]:
    """One line per leaky (model, dataset) of the bench: near-copies of training rows among its
    validation/test rows (featx.classifiers.neardup.leak_warning), so its accuracies are inflated."""
    from featx.classifiers.neardup import leak_warning

    return [
        leak_warning(s.leakage, f"**Near-duplicates**, {s.model} {s.name}")
        for s in result.sources
        if s.leakage and s.leakage.get("leaky")
    ]


def write_bench_report(result, command: str | None = None) -> dict[str, str]:
    """Write every output of a finished bench into its results directory; returns their paths."""

    from featx.bench.analysis import analyze, apply_baselines, head_confidence
    from featx.files import write_text_atomic

    cfg = result.config
    rows = result.rows()
    csv_path, json_path = write_results(rows, cfg.out)
    conf = {(s.model, s.name): head_confidence(s.head_codes, s.head) for s in result.sources if s.head_codes}
    analyses = analyze(rows, result.sources, conf)
    ft_rows = [r for r in rows if r.get("kind") == "finetune"]
    from featx.bench.finetune_cells import compare

    comparisons = compare(analyses, rows) if ft_rows else []
    apply_baselines(analyses, comparisons)
    from featx.bench.decision import decision_section, decisions

    decision = decision_section(decisions(analyses, rows), markdown_table)
    models = cfg.bench_models()
    title = (
        f"featx bench: {cfg.model.name} ({cfg.model.weights} weights)"
        if len(models) == 1
        else f"featx bench: {', '.join(m.label for m in models)}"
    )
    plots = []
    by_clf: dict[str, list] = {}
    for a in analyses:
        by_clf.setdefault(a.classifier, []).append(a)
    for clf, group in by_clf.items():
        suffix = "" if len(by_clf) == 1 else f"_{clf.replace('/', '-')}"
        plots.append(
            plot_depth(
                group, os.path.join(cfg.out, f"depth{suffix}.png"), f"{title}, {clf}", ft_rows, comparisons
            )
        )
        plots.append(
            plot_learning_curves(
                group, os.path.join(cfg.out, f"learning_curves{suffix}.png"), f"{title}, {clf}"
            )
        )
    recipe = cfg.finetune_settings.recipe_text() if ft_rows else ""
    md = markdown_report(
        analyses,
        title=title,
        command=command,
        plots=plots,
        notes=leakage_lines(result) + result.notes,
        finetune=comparisons,
        recipe=recipe,
        decision=decision,
    )
    md_path = os.path.join(cfg.out, "report.md")
    write_text_atomic(md_path, md)
    return {
        "results.csv": csv_path,
        "results.json": json_path,
        "report.md": md_path,
        **{os.path.basename(p): p for p in plots},
    }
