"""The bench's plots: accuracy against relative depth (a panel per train size) and learning curves,
with the test set's Wilson intervals as bars, laid out so that no legend or title is cut off.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _save_figure(fig, path: str) -> None:
    """Write a PNG atomically: an interrupted bench never leaves a truncated plot."""
    from featx.files import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _size_order(spec: str):
    """Train-size specs in reading order: per-class sizes, then totals, each by size; `all` last."""
    from featx.classifiers.protocol import parse_train_size

    ts = parse_train_size(spec)
    return ({"per_class": 0, "total": 1, "all": 2}[ts.kind], ts.n)


def _style(similarity: str):
    return ("-", "o") if similarity == "similar" else ("--", "s")


def _title_width(fig) -> int:
    """Characters of an 11 pt title that fit the figure's width."""
    return max(30, int(fig.get_figwidth() * 10.5))


def _wrap(title: str, width: int = 110) -> str:
    """A long title (several models) on several lines rather than cut off at the figure's edge."""
    import textwrap

    return "\n".join(textwrap.wrap(title, width)) or title


def plot_depth(analyses, path: str, title: str, finetune_rows: Sequence[dict] = (), comparisons=()) -> str:
    """Accuracy vs relative depth: a panel per train size, a line per dataset and model (similar
    solid, different dashed, random-init controls dotted) on the shared relative-depth axis; the
    lower row shows accuracy relative to each line's chosen layer (the best by validation at that
    size, as in the tables)."""
    import matplotlib

    from featx.bench.analysis import best_layer

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({s for a in analyses for s in a.sizes}, key=_size_order)
    several = len({a.model for a in analyses}) > 1
    # a legend line per (dataset, model, fine-tune method): room for them below the panels
    ft_entries = len({(r["dataset"], r.get("model"), r.get("method") or "") for r in finetune_rows})
    # constrained layout places the legend below the panels and the wrapped title above them, inside the
    # figure; panels of one row share their y-range so that sizes compare at a glance
    fig, axes = plt.subplots(
        2,
        len(sizes),
        figsize=(max(6.0, 4.2 * len(sizes)), 7 + 0.25 * several * len(analyses) + 0.25 * ft_entries),
        squeeze=False,
        sharex=True,
        sharey="row",
        layout="constrained",
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, size in enumerate(sizes):
        for k, a in enumerate(analyses):
            pts = [(a.depth[n], a.acc[(n, size)]) for n in a.layers if (n, size) in a.acc]
            if not pts:
                continue
            ls, marker = _style(a.similarity)
            ls = ":" if a.control_of else ls  # a random-init control: dotted
            x = [p[0] for p in pts]
            y = np.array([p[1].mean for p in pts])
            # the bars are the test set's Wilson 95% interval, the uncertainty the report's words rely on
            ci = np.array([a.ci(n, size) for n in a.layers if (n, size) in a.acc])
            e = np.clip(np.vstack([y - ci[:, 0], ci[:, 1] - y]), 0, None)
            label = f"{a.model + ' · ' if several else ''}{a.name} ({a.similarity_text})"
            color = colors[k % len(colors)]
            chosen = a.acc[(best_layer(a, size), size)].mean
            axes[0][j].errorbar(x, y, yerr=e, ls=ls, marker=marker, color=color, label=label, capsize=2)
            axes[1][j].plot(x, y / chosen, ls=ls, marker=marker, color=color, label=label)
            by_method = _finetune_points(finetune_rows, a, size)
            ft = [p for pts in by_method.values() for p in pts]
            # fine-tune cells at their freeze points, a marker per method
            for method, pts in by_method.items():
                fx, fy = zip(*pts)
                marker = METHOD_MARKERS.get(method, "X")
                what = f"fine-tuned ({method})" if method else "fine-tuned"
                axes[0][j].plot(
                    fx, fy, ls="none", marker=marker, ms=9, color=color, label=f"{label}: {what} from depth"
                )
                axes[1][j].plot(fx, np.array(fy) / chosen, ls="none", marker=marker, ms=9, color=color)
            if ft:
                fx = [p[0] for p in ft]
                c = next(
                    (
                        c
                        for c in comparisons
                        if (c.dataset, c.size, c.model, c.classifier) == (a.name, size, a.model, a.classifier)
                    ),
                    None,
                )
                if c is not None:  # the chosen fine-tune's verdict, the table's words
                    depth = next(
                        (
                            float(r["relative_depth"])
                            for r in finetune_rows
                            if r["train_from"] == c.point and r["dataset"] == a.name
                        ),
                        fx[0],
                    )
                    axes[0][j].annotate(
                        f"{c.verdict} (p = {c.p_text}){'' if c.converged else ', not converged'}",
                        (depth, c.ft_acc),
                        textcoords="offset points",
                        xytext=(4, 6),
                        fontsize=7,
                        color=color,
                    )
        axes[0][j].set_title(f"train size {size}")
        axes[1][j].set_xlabel("relative depth (1.0 = penultimate)")
    axes[0][0].set_ylabel("test accuracy (bars: 95% CI)")
    axes[1][0].set_ylabel("accuracy / chosen layer's")
    # one legend for the figure: a dataset missing from some panel (a size it cannot reach) still shows
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(
        list(handles.values()),
        list(handles),
        loc="outside lower center",
        fontsize=8,
        ncols=1 if several or len(sizes) == 1 else min(len(handles), 3),
    )
    fig.suptitle(_wrap(title, _title_width(fig)), fontsize=11)
    _save_figure(fig, path)
    plt.close(fig)
    return path


# a fine-tune method's marker on the depth plot (rows without a method: "X", labelled "fine-tuned")
METHOD_MARKERS = {"full": "X", "lp-ft": "P", "bitfit": "D", "lora": "*"}


def _finetune_points(rows: Sequence[dict], a, size: str) -> dict[str, list[tuple[float, float]]]:
    """Per fine-tune method ("" when a row does not say), (freeze depth, mean test accuracy over
    seeds) of the fine-tune rows of `a`'s dataset at `size`."""
    by: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        if (
            r["dataset"] == a.name
            and r["train_size_spec"] == size
            and not a.control_of
            and r["model"] == a.model
        ):
            by.setdefault((r.get("method") or "", float(r["relative_depth"])), []).append(r["accuracy"])
    out: dict[str, list[tuple[float, float]]] = {}
    for (method, d), v in sorted(by.items()):
        out.setdefault(method, []).append((d, float(np.mean(v))))
    return out


def plot_learning_curves(analyses, path: str, title: str) -> str:
    """Accuracy vs training images per dataset: the best layer, the top layer, raw pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        len(analyses),
        figsize=(max(6.0, 4.2 * len(analyses)), 3.8),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    for ax, a in zip(axes[0], analyses):
        xs = [a.size_counts[s] for s in a.sizes]
        curves = (
            [(a.best, "-o", "chosen = top")]
            if a.best == a.top
            else [(a.best, "-o", "chosen"), (a.top, "--s", "top")]
        )
        for layer, style, tag in curves:
            ys = np.array([a.acc[(layer, s)].mean if (layer, s) in a.acc else np.nan for s in a.sizes])
            ci = np.array([a.ci(layer, s) if (layer, s) in a.acc else (np.nan, np.nan) for s in a.sizes])
            es = np.clip(
                np.vstack([ys - ci[:, 0], ci[:, 1] - ys]), 0, None
            )  # Wilson 95% interval of the test set
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=2, label=f"{tag}: {layer} ({a.depth[layer]:.2f})")
        if a.pixels:
            ax.plot(
                [a.size_counts[s] for s in a.sizes if s in a.pixels],
                [a.pixels[s].mean for s in a.sizes if s in a.pixels],
                ":^",
                color="gray",
                label="raw pixels",
            )
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("training images")
        ax.set_title(
            f"{a.model + chr(10) if a.model and len({b.model for b in analyses}) > 1 else ''}"
            f"{a.name} ({a.similarity_text})",
            fontsize=9,
        )
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("test accuracy (bars: 95% CI)")
    fig.suptitle(_wrap(title, _title_width(fig)), fontsize=11)
    _save_figure(fig, path)
    plt.close(fig)
    return path
