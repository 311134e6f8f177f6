"""Fine-tune cells of a bench: one per (dataset, freeze point, train size, seed), beside the probe cells.

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
from dataclasses import dataclass, replace

from featx.classifiers.protocol import TrainSize, parse_train_size
from featx.errors import FeatxError
from featx.finetune.settings import FinetuneSettings
from featx.store.cache import digest

log = logging.getLogger("featx")


@dataclass(frozen=True)
class FinetuneCell:
    source: int  # index into the bench's datasets
    spec: str
    point: str
    train_size: TrainSize
    seed: int

    def settings(self, base: FinetuneSettings) -> FinetuneSettings:
        return replace(base, train_from=self.point, train_size=str(self.train_size), seed=self.seed)

    def key(self, config, base: FinetuneSettings) -> str:
        m = config.model
        # "sized": cells fine-tuned before the backbone carried the plan's preprocessing ran at the
        # weights' default size whatever their key said; the marker retires them
        return digest({"kind": "finetune", "sized": True, "model": m.name, "weights": m.weights, "image_size": m.image_size,
                       "crop_pct": m.crop_pct, "data": os.path.abspath(self.spec) if os.path.exists(self.spec)
                       else self.spec, "data_options": config.data_options.to_dict(),
                       "run": {"device": config.run.device, "precision": config.run.precision},
                       "recipe": self.settings(base).to_dict()})  # fmt: skip


def finetune_cells(config, points: list[str], sizes: list[str], seeds) -> list[FinetuneCell]:
    """Every fine-tune cell, in a fixed order (dataset, freeze point, train size, seed)."""
    return [FinetuneCell(i, bd.spec, p, parse_train_size(s), int(seed))
            for i, bd in enumerate(config.datasets) for p in points for s in sizes
            for seed in dict.fromkeys(seeds)]  # fmt: skip


def run_finetune_cells(config, points: list[str], base: FinetuneSettings, progress: bool = False) -> list[tuple]:
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
                r = finetune(config.model, cell.spec, cell.settings(base), run=config.run,
                             data_options=config.data_options, checkpoint_dir=ckpt, progress=progress).results  # fmt: skip
            except FeatxError as e:
                r = {"error": str(e)}
            append_record(fh, {"key": key, "result": json.loads(json.dumps(r))})
            done[key] = r
            shutil.rmtree(ckpt, ignore_errors=True)
    return [(c, done[c.key(config, base)]) for c in cells]


def finetune_rows(config, cells: list[tuple]) -> list[dict]:
    """One flat row per finished fine-tune cell, in the columns of the probe rows plus `kind`."""
    from featx.bench.config import model_label

    rows = []
    for cell, r in cells:
        if "error" in r:
            continue
        bd = config.datasets[cell.source]
        rows.append({
            "kind": "finetune", "model": model_label(config.model), "control_of": "", "dataset": os.path.basename(bd.spec.rstrip("/")), "similarity_label": bd.label or "",
            "layer": r["train_from_module"], "train_from": cell.point, "relative_depth": r["train_from_depth"],
            "code_dim": None, "train_size": r["train_size"], "train_size_spec": str(cell.train_size),
            "classifier": "finetune", "preset": "", "C": None, "seed": cell.seed, "accuracy": r["accuracy"],
            "balanced_accuracy": r["balanced_accuracy"], "val_score": r["val_score"], "n_test": r["n_test"],
            "fit_seconds": r["seconds"], "baseline": "", "epoch": r["epoch"],
            "image_size": r["preprocessing"]["crop_size"], "resize_size": r["preprocessing"]["resize_size"],
            **{k: r.get(k) for k in ("val_source", "n_val", "test_ci_low", "test_ci_high", "test_correct")},
        })  # fmt: skip
    return rows


@dataclass(frozen=True)
class FinetuneVsProbe:
    """At one (dataset, train size): the probe's chosen layer and the fine-tune's chosen freeze
    point (each the best by mean validation score over seeds), their test accuracies (seed means)
    and Wilson 95% intervals, and the gain of fine-tuning in points with its spread over seeds."""

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
    points: tuple = ()  # every freeze point: {"point", "acc", "std", "val"} (seed means), in grid order

    @property
    def gain(self) -> float:
        return 100 * (self.ft_acc - self.probe_acc)

    @property
    def verdict(self) -> str:
        """'pays' / 'does not pay' when the two intervals are apart, else 'within noise'."""
        if self.ft_ci[0] > self.probe_ci[1]:
            return "pays"
        if self.ft_ci[1] < self.probe_ci[0]:
            return "does not pay"
        return "within noise"


def compare(analyses, rows: list[dict]) -> list[FinetuneVsProbe]:
    """Best fine-tune cell beside best probe cell per (dataset, train size), both by validation."""
    import numpy as np

    from featx.bench.analysis import best_layer
    from featx.stats import wilson_interval

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
                by_point.setdefault(r["train_from"], []).append(r)
            point = max(by_point, key=lambda p: (np.mean([r["val_score"] for r in by_point[p]]), p))
            rs, layer = by_point[point], best_layer(a, size)
            acc, n = float(np.mean([r["accuracy"] for r in rs])), int(rs[0]["n_test"])
            out.append(FinetuneVsProbe(
                a.name, size, layer, a.acc[(layer, size)].mean, a.ci(layer, size), point, rs[0]["layer"], acc,
                float(np.std([r["accuracy"] for r in rs])), wilson_interval(int(round(acc * n)), n), len(rs), n,
                float(np.mean([r["epoch"] for r in rs])),
                tuple({"point": p, "acc": float(np.mean([r["accuracy"] for r in v])),
                       "std": float(np.std([r["accuracy"] for r in v])),
                       "val": float(np.mean([r["val_score"] for r in v]))} for p, v in by_point.items()),
            ))  # fmt: skip
    return out
