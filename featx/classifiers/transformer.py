"""`CNNCodes`: a scikit-learn transformer from images to CNN codes.

    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC
    clf = make_pipeline(CNNCodes("efficientnet_lite0", weights="imagenet", layers="depth:1.0"), LinearSVC())
    clf.fit(train_paths, train_labels); clf.score(test_paths, test_labels)

X is a list of image paths, PIL images or uint8 arrays (HxW, HxWx3, HxWx4), or one uint8 array
[N, H, W(, C)]. Codes are computed exactly as `featx extract` computes them (same preprocessing,
taps, activation and pooling: the same `featx.models.plan.resolve`; precision `auto` decided by the same
`featx.engine.compute.decide_precision`), in memory, without the cache. Following scikit-learn's contract,
`__init__` only stores parameters; `fit` validates them (as `featx.settings` objects) and resolves
the layers; the network itself is loaded on first use and shared between clones
(cross-validation folds reuse one loaded model).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.errors import FeatxError
from featx.settings import CodeSettings, ModelSettings, RunSettings


@lru_cache(maxsize=2)
def _loaded(model: ModelSettings):
    """(Backbone, plan of its taps): the network, loaded once per model settings and shared by clones."""
    from featx.engine.compute import load_backbone
    from featx.models.plan import resolve

    return load_backbone(resolve(model))


def _as_pil(item):
    from PIL import Image

    from featx.sources.decode import ImageError, decode_image, to_rgb

    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise FeatxError(f"CNNCodes takes uint8 arrays HxW or HxWxC; got {item.dtype} {item.shape}")
        return to_rgb(Image.fromarray(item))
    try:
        return decode_image(str(item))
    except ImageError as e:
        raise FeatxError(str(e)) from None


class CNNCodes(TransformerMixin, BaseEstimator):
    """Images -> CNN codes of `layers` of `model` (concatenated in execution order).

    Parameters mirror `featx extract`: model, weights, layers (names and/or depth fractions),
    pool, relu ('auto', 'on', 'off'), image_size, crop_pct, device, batch_size, precision
    ('auto': as extract decides on this device), with extract's defaults (those of the settings
    objects; `batch_size="auto"` is 32 images per forward here, since nothing is streamed).
    """

    def __init__(
        self,
        model: str = "efficientnet_lite0",
        weights: str = "DEFAULT",
        layers: str = "depth:1.0",
        pool: str = "avg",
        relu: str = "auto",
        image_size: int | None = None,
        crop_pct: float | None = None,
        device: str = "auto",
        batch_size: int | str = "auto",
        precision: str = "auto",
    ):
        self.model = model
        self.weights = weights
        self.layers = layers
        self.pool = pool
        self.relu = relu
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.device = device
        self.batch_size = batch_size
        self.precision = precision

    def _settings(self) -> tuple[ModelSettings, CodeSettings, RunSettings]:
        """The parameters as validated settings objects (one-line UsageError naming the bad one)."""
        return (
            ModelSettings(self.model, self.weights, self.image_size, self.crop_pct),
            CodeSettings(self.layers, self.pool, self.relu),
            RunSettings(device=self.device, batch_size=self.batch_size, precision=self.precision),
        )

    def _plan(self):
        from featx.models.plan import resolve

        model, codes, _ = self._settings()
        backbone, _ = _loaded(model)
        return backbone, resolve(model, codes).with_module(backbone.module)

    def fit(self, X=None, y=None):
        """Validate the parameters and resolve the layers (the network has nothing to learn)."""
        _, plan = self._plan()
        self.layers_ = list(plan.layers)
        self.layer_resolution_ = plan.resolved
        self.activations_ = dict(plan.activations)
        self.dims_ = plan.dims
        self.n_features_out_ = int(sum(self.dims_))
        self.preprocessing_ = plan.preprocess.to_dict()
        return self

    def transform(self, X) -> np.ndarray:
        import torch

        from featx.engine.compute import computer_for, decide_precision, resolve_device

        check_is_fitted(self, "layers_")
        backbone, plan = self._plan()
        _, _, run = self._settings()
        device = resolve_device(run.device)
        precision = decide_precision(run.precision, plan.model, device, plan.preprocess.crop_size)
        items = list(X)  # paths, PIL images, arrays, or the rows of an [N, H, W(, C)] array
        pre, bs = plan.preprocess, 32 if run.batch_size == "auto" else run.batch_size
        out = np.empty((len(items), self.n_features_out_), dtype=np.float32)
        with computer_for(plan, backbone.module, device, precision) as computer:
            for start in range(0, len(items), bs):
                batch = torch.stack([pre.to_uint8(_as_pil(x)) for x in items[start : start + bs]])
                out[start : start + len(batch)] = np.hstack(computer(batch))
        return out

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "layers_")
        return np.array(
            [f"{n}_{i}" for n, d in zip(self.layers_, self.dims_) for i in range(d)], dtype=object
        )
