"""The cost fields of a probe result (`featx.engine.cost.COST_FIELDS`), so that a probe sits in one
table with a fine-tune:

- `method`: "probe" (the `classifier` field keeps softmax, svm, sgd, knn or the preset);
- `trainable_params`: the classifier's own parameters: a linear probe's weights and biases
  (classes x dims + classes; a two-class linear model has one row), per-class SVMs' together. The
  scaler's mean and scale and a PCA projection are fitted in closed form and not counted. k-NN
  trains nothing: 0 (it keeps its training codes instead, n_train x dims numbers);
- `total_params`: the backbone's parameters up to and including the tapped layer
  (`featx.engine.layer_cost.backbone_params`) plus `trainable_params`;
- `train_seconds`: the cell's fit seconds (reading its codes, the C, k or T search and the refit):
  the extraction is not training;
- `inference_ms_per_image`, `inference_batch_size`: the forward pass to the layer
  (`featx.engine.layer_cost`); the classifier's own arithmetic is left out (microseconds).
"""

from __future__ import annotations

import numpy as np

METHOD = "probe"


def classifier_params(pipe) -> int:
    """Trained parameters of a fitted probe pipeline's final step (0 for k-NN)."""
    clf = pipe.steps[-1][1] if hasattr(pipe, "steps") else pipe
    parts = getattr(clf, "estimators_", None) or [clf]
    total = 0
    for est in parts:
        if hasattr(est, "coef_"):
            total += int(np.size(est.coef_))
            if getattr(est, "fit_intercept", True):
                total += int(np.size(getattr(est, "intercept_", 0)))
    return total


def probe_cost(pipe) -> dict:
    """The cost fields a fitted cell knows by itself (the backbone's and `train_seconds`, which is
    its `fit_seconds`, come from `with_layer_cost`: a cell's own result keeps one timing field, so
    two fits compare equal apart from it)."""
    return {"method": METHOD, "trainable_params": classifier_params(pipe)}


def with_layer_cost(result: dict, cost) -> dict:
    """`result` with `total_params` and the inference fields from a `LayerCost` (None: unknown)."""
    backbone = getattr(cost, "backbone_params", None)
    trained = result.get("trainable_params")
    return {
        **result,
        "method": result.get("method", METHOD),
        "train_seconds": result.get("train_seconds", result.get("fit_seconds")),
        "total_params": None if backbone is None or trained is None else backbone + trained,
        "inference_ms_per_image": getattr(cost, "inference_ms_per_image", None),
        "inference_batch_size": getattr(cost, "inference_batch_size", None),
    }


UNKNOWN = "–"  # how a table shows a cost field a result does not carry


def params_text(n) -> str:
    """A parameter count for a table: 0, 1,539, 158k, 11.2M, 1.3B; `UNKNOWN` when missing."""
    if n is None or isinstance(n, bool) or not isinstance(n, (int, float)):
        return UNKNOWN
    n = int(n)
    if n < 10_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n / 1e3:.3g}k"
    if n < 1_000_000_000:
        return f"{n / 1e6:.3g}M"
    return f"{n / 1e9:.3g}B"


def number_text(v, fmt: str = ".3g") -> str:
    """A measured number (seconds, ms) for a table; `UNKNOWN` when missing."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        return UNKNOWN
    return format(v, fmt)
