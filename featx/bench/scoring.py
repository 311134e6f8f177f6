"""Transferability scores of every tapped layer, kept in scores.jsonl beside the cells."""

from __future__ import annotations

import numpy as np

from featx.bench.config import BenchConfig
from featx.bench.grid import Source, cache_key, min_class_count
from featx.classifiers.protocol import TrainSize, parse_train_size
from featx.errors import FeatxError
from featx.files import append_record, load_done, open_log
from featx.store.cache import digest
from featx.store.codes import CodesFile

SCORES_FILE = "scores.jsonl"


def _scored_size(config: BenchConfig, src: Source) -> TrainSize | None:
    """The train size whose training rows the scores use: the largest of the grid this data
    supports (by images), as the analysis's largest size."""
    sizes = [parse_train_size(s) for s in config.train_sizes]
    per_class_min = min_class_count(src.codes)

    def count(t: TrainSize) -> int:
        return {"all": src.n_train, "total": t.n, "per_class": t.n * src.n_classes}[t.kind]

    fits = [
        t
        for t in sizes
        if t.kind == "all"
        or (t.kind == "total" and t.n <= src.n_train)
        or (t.kind == "per_class" and t.n <= per_class_min)
    ]
    return max(fits, key=count) if fits else None


def _score_key(cache_key: str, layer: str, size: TrainSize) -> str:
    from featx.classifiers.scores import METRICS

    return digest(
        {"scores": cache_key, "layer": layer, "train_size": str(size), "seed": 0, "metrics": list(METRICS)}
    )


def _score_source(src: Source, size: TrainSize, todo: list[str]) -> dict[str, dict]:
    """Every score of each layer in `todo`, on the training rows `size` draws with seed 0."""
    import time

    from featx.classifiers.rows import subsample
    from featx.classifiers.scores import METRICS, score

    out = {}
    with CodesFile(src.codes) as f:
        train = np.flatnonzero(f.split == "train")
        rows = subsample(train, f.labels, size, np.random.default_rng(0), f.classes)
        for layer in todo:
            t0 = time.perf_counter()
            X, y, errors = f.codes(layer, rows), f.labels[rows], {}
            try:  # a metric undefined on these codes scores None with its reason; the others are kept
                values = score(X, y, METRICS, errors=errors)
            except FeatxError as e:  # no metric can be computed (one class, non-finite codes, too many dims)
                out[layer] = {"error": str(e)}
                continue
            if all(v is None for v in values.values()):
                out[layer] = {"error": "; ".join(f"{m}: {e}" for m, e in errors.items())}
                continue
            out[layer] = {
                "scores": values,
                "rows": int(len(rows)),
                "train_size": str(size),
                "seconds": round(time.perf_counter() - t0, 3),
                **({"errors": errors} if errors else {}),
            }
    return out


def score_sources(config: BenchConfig, sources: list[Source]) -> dict[tuple[int, str], dict]:
    """(source index, layer) -> its scores record, computed where scores.jsonl lacks them (appended
    as they finish, so a killed bench keeps them)."""
    done = load_done(config.out, SCORES_FILE)
    out = {}
    with open_log(config.out, SCORES_FILE) as fh:
        for i, src in enumerate(sources):
            size = _scored_size(config, src)
            if size is None:
                continue
            ck = cache_key(src.codes)
            keys = {layer: _score_key(ck, layer, size) for layer in src.layers}
            todo = [layer for layer in src.layers if keys[layer] not in done]
            for layer, rec in (_score_source(src, size, todo) if todo else {}).items():
                append_record(fh, {"key": keys[layer], "result": rec})
                done[keys[layer]] = rec
            out.update({(i, layer): done[keys[layer]] for layer in src.layers})
    return out
