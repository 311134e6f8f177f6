"""Old module paths that files on disk name still load: a joblib export pickled before the
subpackages names featx.classify.L2Normalize and featx.classify.PerClassSVM."""

from __future__ import annotations

import pickle

import numpy as np
from sklearn.pipeline import make_pipeline

from featx.classifiers.estimators import L2Normalize, PerClassSVM


def test_a_pickle_naming_the_old_module_paths_loads():
    X = np.random.default_rng(0).normal(size=(30, 4))
    y = np.arange(30) % 3
    pipe = make_pipeline(L2Normalize(), PerClassSVM(costs=(1.0,), folds=2)).fit(X, y)
    old = pickle.dumps(pipe, protocol=0).replace(b"featx.classifiers.estimators", b"featx.classify")
    assert b"featx.classify\\n" in old or b"featx.classify\n" in old
    back = pickle.loads(old)
    assert type(back.steps[0][1]) is L2Normalize and type(back.steps[1][1]) is PerClassSVM
    np.testing.assert_array_equal(back.predict(X), pipe.predict(X))
