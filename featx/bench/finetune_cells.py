"""Fine-tune cells of a bench: one per (dataset, freeze point, method, train size, seed), beside the probe cells.

A fine-tune cell runs `featx.finetune.job.finetune` on the dataset with the bench's model, run and data
options, from its freeze point, with the same train-size subset and seed a probe cell of that
train size and seed uses (so they see the same training images). Cells are resumable like probe
cells: each finished cell is appended (fsync'ed) to the bench's `cells.jsonl` under a key that
hashes what determines it (model, weights, preprocessing overrides, the data spec and options,
freeze point, train size, seed, recipe); a cell killed mid-run resumes from its own epoch
checkpoints (`OUT/finetune-ckpt/KEY/`), removed once the cell is recorded. Their rows carry
`kind: "finetune"` (probe rows: `kind: "probe"`), the freeze point's module and depth in the
`layer` / `relative_depth` columns.

`featx bench --finetune depth:0,0.5,1.0` runs them (for the bench's first model), after the
probe cells; `compare` sets the best fine-tune cell beside the best probe cell per dataset and
train size, both chosen by validation score, for the report.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field, replace

from featx.classifiers.protocol import TrainSize, parse_train_size
from featx.errors import FeatxError
from featx.finetune.settings import FinetuneSettings
from featx.stats import Paired
from featx.store.cache import digest

log = logging.getLogger("featx")


@dataclass(frozen=True)
class FinetuneCell:
    source: int  # index into the bench's datasets
    spec: str
    point: str
    train_size: TrainSize
    seed: int
    method: str = "full"

    def settings(self, base: FinetuneSettings) -> FinetuneSettings:
        return replace(
            base, train_from=self.point, train_size=str(self.train_size), seed=self.seed, method=self.method
        )

    def key(self, config, base: FinetuneSettings) -> str:
        m = config.model
        # "sized": cells fine-tuned before the backbone carried the plan's preprocessing ran at the
        # weights' default size whatever their key said; the marker retires them
        return digest(
            {
                "kind": "finetune",
                "sized": True,
                "model": m.name,
                "weights": m.weights,
                "image_size": m.image_size,
                "crop_pct": m.crop_pct,
                "data": os.path.abspath(self.spec) if os.path.exists(self.spec) else self.spec,
                "data_options": config.data_options.to_dict(),
                "run": {"device": config.run.device, "precision": config.run.precision},
                "recipe": self.settings(base).key_dict(),
            }
        )


def finetune_cells(config, points: list[str], sizes: list[str], seeds) -> list[FinetuneCell]:
    """Every fine-tune cell, in a fixed order (dataset, freeze point, method, train size, seed)."""
    return [
        FinetuneCell(i, bd.spec, p, parse_train_size(s), int(seed), m)
        for i, bd in enumerate(config.datasets)
        for p in points
        for m in config.finetune_methods
        for s in sizes
        for seed in dict.fromkeys(seeds)
    ]


def run_finetune_cells(
    config, points: list[str], base: FinetuneSettings, progress: bool = False
) -> list[tuple]:
    """Run the missing fine-tune cells of `config` (a BenchConfig) one after another (each uses all
    cores); returns [(cell, result)] for every cell of the grid, finished before or now. A cell the
    data cannot support is recorded with its reason (`{"error": ...}`), as probe cells are."""
    from featx.files import append_record, load_done, make_out_dir, open_log
    from featx.finetune.job import finetune

    make_out_dir(config.out)
    cells = finetune_cells(config, points, list(config.train_sizes), config.seeds)
    done = load_done(config.out)
    todo = [c for c in cells if c.key(config, base) not in done]
    log.info("%d fine-tune cells: %d done before, %d to run", len(cells), len(cells) - len(todo), len(todo))
    with open_log(config.out) as fh:
        for cell in todo:
            key = cell.key(config, base)
            ckpt = os.path.join(config.out, "finetune-ckpt", key[:24])
            try:
                r = finetune(
                    config.model,
                    cell.spec,
                    cell.settings(base),
                    run=config.run,
                    data_options=config.data_options,
                    checkpoint_dir=ckpt,
                    progress=progress,
                ).results
            except FeatxError as e:
                r = {"error": str(e)}
            append_record(fh, {"key": key, "result": json.loads(json.dumps(r))})
            done[key] = r
            shutil.rmtree(ckpt, ignore_errors=True)
    return [(c, done[c.key(config, base)]) for c in cells]


def finetune_rows(config, cells: list[tuple]) -> list[dict]:
    """One flat row per finished fine-tune cell, in the columns of the probe rows plus `kind`."""
    from featx.bench.config import model_label
    from featx.finetune.train import converged

    rows = []
    for cell, r in cells:
        if "error" in r:
            continue
        bd = config.datasets[cell.source]
        rows.append(
            {
                "kind": "finetune",
                "model": model_label(config.model),
                "control_of": "",
                "dataset": os.path.basename(bd.spec.rstrip("/")),
                "similarity_label": bd.label or "",
                "layer": r["train_from_module"],
                "train_from": cell.point,
                "relative_depth": r["train_from_depth"],
                "code_dim": None,
                "train_size": r["train_size"],
                "train_size_spec": str(cell.train_size),
                "classifier": "finetune",
                "preset": "",
                "C": None,
                "seed": cell.seed,
                "accuracy": r["accuracy"],
                "balanced_accuracy": r["balanced_accuracy"],
                "val_score": r["val_score"],
                "n_test": r["n_test"],
                "fit_seconds": r["seconds"],
                "baseline": "",
                "epoch": r["epoch"],
                "image_size": r["preprocessing"]["crop_size"],
                "resize_size": r["preprocessing"]["resize_size"],
                "epochs_run": r["epochs_run"],
                "converged": r.get("converged", converged(r["history"])),
                "augment": r.get("augment", "default" if r["recipe"].get("augment") is True else "none"),
                "lr": r.get("lr", r["recipe"].get("lr")),
                "method": r.get("method", "full"),
                "trainable_params": r.get("trainable_params"),
                "total_params": r.get("total_params"),
                "train_seconds": r.get("train_seconds", r["seconds"]),
                "lora_rank": r.get("lora_rank"),
                "lora_alpha": r.get("lora_alpha"),
                **{
                    k: r.get(k)
                    for k in (
                        "inference_ms_per_image",
                        "inference_batch_size",
                        "val_source",
                        "n_val",
                        "test_ci_low",
                        "test_ci_high",
                        "test_correct",
                    )
                },
            }
        )
    return rows


@dataclass(frozen=True)
class FinetuneVsProbe:
    """At one (dataset, train size): the probe's chosen layer and the fine-tune's chosen freeze
    point (each the best by mean validation score over seeds), their test accuracies (seed means)
    and Wilson 95% intervals, the gain of fine-tuning in points with its spread over seeds, and the
    exact McNemar test of the two on the same test images (the first seed's cells), the rule that
    judges layers and models too."""

    dataset: str
    size: str
    probe_layer: str
    probe_acc: float
    probe_ci: tuple[float, float]
    point: str
    point_module: str
    ft_acc: float
    ft_std: float
    ft_ci: tuple[float, float]
    seeds: int
    n_test: int
    epoch: float
    points: tuple = ()  # every freeze point: {"point", "acc", "std", "val", "converged"} (seed means), in grid order
    paired: Paired | None = (
        None  # McNemar: a = the fine-tune, b = the probe; None when the test images differ
    )
    converged: bool = True  # every seed's cell of the chosen point stopped improving before its last epoch
    epochs_run: float = 0.0
    recipe: str = ""  # the chosen augmentation and learning rate(s), e.g. "light, lr 0.03"
    model: str = ""  # the probe analysis' model label and classifier (to find it again)
    classifier: str = ""
    ft_correct: object = field(default=None, repr=False, compare=False)  # first seed's per-image correctness

    @property
    def gain(self) -> float:
        return 100 * (self.ft_acc - self.probe_acc)

    @property
    def verdict(self) -> str:
        """'pays' / 'does not pay' when McNemar's p < NOISE_P, else 'within noise'; 'not paired'
        when the two did not see the same test images."""
        from featx.bench.analysis import NOISE_P

        if self.paired is None:
            return "not paired"
        if self.paired.p >= NOISE_P or self.paired.a_only == self.paired.b_only:
            return "within noise"
        return "pays" if self.paired.a_only > self.paired.b_only else "does not pay"

    @property
    def p_text(self) -> str:
        return "-" if self.paired is None else f"{self.paired.p:.2g}"


def compare(analyses, rows: list[dict]) -> list[FinetuneVsProbe]:
    """Best fine-tune cell beside best probe cell per (dataset, train size), both by validation."""
    import numpy as np

    from featx.bench.analysis import best_layer
    from featx.stats import mcnemar_exact, unpack_correct, wilson_interval

    ft = [r for r in rows if r.get("kind") == "finetune"]
    out = []
    for a in analyses:
        if a.control_of or (a.model and ft and a.model != ft[0]["model"]):
            continue
        for size in a.sizes:
            mine = [r for r in ft if r["dataset"] == a.name and r["train_size_spec"] == size]
            if not mine:
                continue
            by_point: dict[str, list[dict]] = {}
            for r in mine:
                by_point.setdefault(point_label(r), []).append(r)
            point = max(by_point, key=lambda p: (np.mean([r["val_score"] for r in by_point[p]]), p))
            rs, layer = by_point[point], best_layer(a, size)
            acc, n = float(np.mean([r["accuracy"] for r in rs])), int(rs[0]["n_test"])
            first = min(rs, key=lambda r: r["seed"])
            probe_bits = a.correct.get((layer, size))
            paired, bits = None, None
            if first.get("test_correct"):
                bits = unpack_correct(first["test_correct"], first["n_test"])
                if probe_bits is not None and len(probe_bits) == len(bits):
                    paired = mcnemar_exact(bits, probe_bits)
            out.append(
                FinetuneVsProbe(
                    a.name,
                    size,
                    layer,
                    a.acc[(layer, size)].mean,
                    a.ci(layer, size),
                    point,
                    rs[0]["layer"],
                    acc,
                    float(np.std([r["accuracy"] for r in rs])),
                    wilson_interval(int(round(acc * n)), n),
                    len(rs),
                    n,
                    float(np.mean([r["epoch"] for r in rs])),
                    tuple(
                        {
                            "point": p,
                            "acc": float(np.mean([r["accuracy"] for r in v])),
                            "std": float(np.std([r["accuracy"] for r in v])),
                            "seeds": len(v),
                            "val": float(np.mean([r["val_score"] for r in v])),
                            "converged": all(r.get("converged", True) for r in v),
                        }
                        for p, v in by_point.items()
                    ),
                    paired,
                    all(r.get("converged", True) for r in rs),
                    float(np.mean([r.get("epochs_run") or 0 for r in rs])),
                    _recipe_text(rs),
                    a.model,
                    a.classifier,
                    bits,
                )
            )
    return out


def point_label(row: dict) -> str:
    """A fine-tune row's freeze point, with its method unless it is the full fine-tune ('depth:0.5 (lora)')."""
    method = row.get("method") or "full"
    return row["train_from"] if method == "full" else f"{row['train_from']} ({method})"


def _recipe_text(rs: list[dict]) -> str:
    """The chosen augmentation and learning rate over the seeds' cells ('light, lr 0.03')."""
    aug = "/".join(dict.fromkeys(str(r.get("augment") or "?") for r in rs))
    lr = "/".join(dict.fromkeys(f"{r['lr']:g}" if isinstance(r.get("lr"), (int, float)) else "?" for r in rs))
    return f"{aug}, lr {lr}"


def rule_line(a, c: FinetuneVsProbe) -> str:
    """Whether the fine-tune measurement at the largest train size confirms the rule of thumb's
    case: never a verdict from a fine-tune that had not converged, or when a baseline beat both."""
    from featx.bench.analysis import probe_words

    rule = "fine-tune" if a.case in (2, 4) else f"{probe_words(a.classifier)} on codes"
    relation = "is within noise of the probe" if c.verdict == "within noise" else c.verdict
    head = (
        f"{a.name}: rule of thumb for case {a.case} ({a.size}, {a.similarity_text}): {rule}; measured at train size "
        f"{c.size}: fine-tuning from {c.point} {relation} ({c.gain:+.1f} points against {c.probe_layer}, exact "
        f"McNemar p = {c.p_text})"
    )
    if not c.converged:
        return (
            f"{head}; not converged (validation had not stopped improving when its {c.epochs_run:g} epochs ran out): "
            f"a budget measurement, not a verdict on the rule."
        )
    if a.baseline_wins:
        return f"{head}; but {a.baseline_wins}, so neither answer of the rule is the one to use here."
    agrees = {"pays": a.case in (2, 4), "does not pay": a.case in (1, 3)}.get(c.verdict)
    word = "cannot tell them apart" if agrees is None else "confirms it" if agrees else "contradicts it"
    return f"{head}, which {word}."
