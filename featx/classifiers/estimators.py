"""The scikit-learn pipeline of a probe: L2 normalization, standardization, PCA, the classifier."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin

from featx.classifiers.protocol import VISSL_COSTS, Protocol
from featx.errors import FeatxError


class L2Normalize(TransformerMixin, BaseEstimator):
    """x / (||x|| + eps), row-wise (VISSL's normalization, eps 1e-5)."""

    def __init__(self, eps: float = 1e-5):
        self.eps = eps

    def fit(self, X, y=None):
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def transform(self, X):
        X = np.asarray(X, dtype=np.float64)
        return X / (np.linalg.norm(X, axis=1, keepdims=True) + self.eps)


class PerClassSVM(ClassifierMixin, BaseEstimator):
    """VISSL's SVM protocol: per class, a binary LinearSVC whose cost is chosen by k-fold
    cross-validated average precision; prediction is the argmax of the decision functions."""

    def __init__(self, costs: Sequence[float] = VISSL_COSTS, folds: int = 3, max_iter: int = 2000):
        self.costs = costs
        self.folds = folds
        self.max_iter = max_iter

    def _svm(self, cost: float):
        from sklearn.svm import LinearSVC

        # VISSL leaves random_state unset; liblinear's dual solver shuffles, so featx seeds it (0) to be repeatable
        return LinearSVC(
            C=cost,
            class_weight={1: 2, -1: 1},
            intercept_scaling=1.0,
            penalty="l2",
            loss="squared_hinge",
            tol=1e-4,
            dual=True,
            max_iter=self.max_iter,
            random_state=0,
        )

    def fit(self, X, y):
        from sklearn.model_selection import cross_val_score

        X = np.asarray(X, dtype=np.float64)
        self.classes_ = np.unique(y)
        self.estimators_, self.costs_, self.cv_ap_ = [], [], []
        for c in self.classes_:
            yb = np.where(y == c, 1, -1)
            folds = min(self.folds, int(min((yb == 1).sum(), (yb == -1).sum())))
            if folds < 2:
                raise FeatxError(
                    f"class {c.item() if hasattr(c, 'item') else c} has fewer than 2 training images; "
                    f"the vissl-svm preset needs 2 or more"
                )
            aps = [
                cross_val_score(self._svm(cost), X, yb, cv=folds, scoring="average_precision").mean()
                for cost in self.costs
            ]
            best = int(np.argmax(aps))  # VISSL takes the first maximum
            self.costs_.append(float(self.costs[best]))
            self.cv_ap_.append(float(aps[best]))
            self.estimators_.append(self._svm(self.costs[best]).fit(X, yb))
        return self

    def decision_function(self, X):
        X = np.asarray(X, dtype=np.float64)
        return np.stack([e.decision_function(X) for e in self.estimators_], axis=1)

    def predict(self, X):
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]


def make_pipeline(protocol: Protocol, C: float, seed: int, n_fit: int, dim: int):
    """The scikit-learn Pipeline of one protocol at one C: scaling, optional PCA, classifier."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    steps = []
    if protocol.scale == "standardize":
        steps.append(("scale", StandardScaler()))
    elif protocol.scale == "l2":
        steps.append(("scale", L2Normalize()))
    if protocol.pca:
        steps.append(("pca", PCA(n_components=min(protocol.pca, n_fit, dim), random_state=seed)))
    if protocol.per_class:
        clf = PerClassSVM(protocol.Cs, protocol.cv or 3, protocol.max_iter)
    elif protocol.classifier == "svm":
        clf = LinearSVC(
            C=C,
            loss="squared_hinge",
            penalty="l2",
            dual="auto",
            max_iter=protocol.max_iter,
            random_state=seed,
        )
    elif protocol.classifier == "softmax" and protocol.solver == "torch":
        from featx.classifiers.torch_softmax import TorchSoftmax

        clf = TorchSoftmax(C=C, max_iter=protocol.max_iter, device=protocol.device)
    elif protocol.classifier == "softmax":
        clf = LogisticRegression(C=C, solver="lbfgs", max_iter=protocol.max_iter)
    else:
        clf = SGDClassifier(loss="hinge", penalty="l2", alpha=1.0 / (C * max(n_fit, 1)), random_state=seed)
    steps.append(("clf", clf))
    return Pipeline(steps)


def apply_steps(steps, X):
    for _, step in steps:
        X = step.transform(X)
    return X
