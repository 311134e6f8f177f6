"""`CNNCodes`: a scikit-learn transformer from images to CNN codes.

    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC
    clf = make_pipeline(CNNCodes("efficientnet_lite0", weights="imagenet", layers="depth:1.0"), LinearSVC())
    clf.fit(train_paths, train_labels); clf.score(test_paths, test_labels)

X is a list of image paths, PIL images or uint8 arrays (HxW, HxWx3, HxWx4), or one uint8 array
[N, H, W(, C)]. Codes are computed exactly as `featx extract` computes them (same preprocessing,
taps, activation and pooling), in memory, without the cache. Following scikit-learn's contract,
`__init__` only stores parameters; `fit` resolves the layers; the network itself is loaded on
first use and shared between clones (cross-validation folds reuse one loaded model).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.errors import FeatxError


@lru_cache(maxsize=2)
def _backbone(model: str, weights: str, image_size, crop_pct):
    from featx.models import load_model
    from featx.taps import list_taps

    backbone = load_model(model, weights, image_size=image_size, crop_pct=crop_pct)
    return backbone, list_taps(backbone.module, backbone.preprocess.crop_size, device="cpu")


def _as_pil(item):
    from PIL import Image

    from featx.data import ImageError, decode_image, to_rgb

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
    pool, relu ('auto', 'on', 'off'), image_size, crop_pct, device, batch_size, precision.
    """

    def __init__(self, model: str = "efficientnet_lite0", weights: str = "DEFAULT", layers: str = "depth:1.0",
                 pool: str = "avg", relu: str = "auto", image_size: int | None = None, crop_pct: float | None = None,
                 device: str = "cpu", batch_size: int = 32, precision: str = "auto"):  # fmt: skip
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

    def fit(self, X=None, y=None):
        """Resolve the layers (the network has nothing to learn)."""
        from featx.taps import activation_for, parse_pool, resolve_layers

        backbone, taps = _backbone(self.model, self.weights, self.image_size, self.crop_pct)
        names, resolved = resolve_layers(taps, self.layers, self.model)
        by_name = {t.name: t for t in taps}
        pool = parse_pool(self.pool)
        for n in names:
            pool.check(by_name[n])
        self.layers_ = names
        self.layer_resolution_ = resolved
        self.activations_ = {n: activation_for(by_name[n], self.relu) for n in names}
        self.dims_ = [by_name[n].code_dim(pool) for n in names]
        self.n_features_out_ = int(sum(self.dims_))
        self.preprocessing_ = backbone.preprocess.to_dict()
        return self

    def transform(self, X) -> np.ndarray:
        import torch

        from featx.extraction import CodeComputer, resolve_device
        from featx.taps import parse_pool

        check_is_fitted(self, "layers_")
        backbone, taps = _backbone(self.model, self.weights, self.image_size, self.crop_pct)
        by_name = {t.name: t for t in taps}
        device = resolve_device(self.device)
        precision = (
            self.precision if self.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        )
        items = list(X)  # paths, PIL images, arrays, or the rows of an [N, H, W(, C)] array
        pre = backbone.preprocess
        out = np.empty((len(items), self.n_features_out_), dtype=np.float32)
        with CodeComputer(backbone.module, [by_name[n] for n in self.layers_], self.activations_, parse_pool(self.pool),
                          pre, device, precision) as computer:  # fmt: skip
            for start in range(0, len(items), self.batch_size):
                batch = torch.stack(
                    [pre.to_uint8(_as_pil(x)) for x in items[start : start + self.batch_size]]
                )
                out[start : start + len(batch)] = np.hstack(computer(batch))
        return out

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "layers_")
        return np.array(
            [f"{n}_{i}" for n, d in zip(self.layers_, self.dims_) for i in range(d)], dtype=object
        )
