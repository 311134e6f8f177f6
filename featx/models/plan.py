"""`resolve`: model + codes settings -> a `Plan`, the one place that turns names into modules.

A plan holds the parsed model name, the weights' identity (a local file is hashed once), the
exact preprocessing, every tap of the architecture (probed on the meta device: no weights, no
FLOPs), the chosen layers with how `depth:` fractions resolved, their activations and pooling.
`extract`, `featx layers`, `bench`, `Predictor` and `CNNCodes` all build their plan here, so they
agree on what a layer name, a depth or `relu=auto` means. `Plan.cache_key` is the key of the
cache entry (unchanged since format 1: existing entries stay hits); `request_key` is the cheap key
of the request memo, computed before anything is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from featx.errors import FeatxError
from featx.settings import CodeSettings, ModelSettings, as_codes, as_model


@dataclass(frozen=True)
class Plan:
    """A resolved model + codes request. `taps` describes every module; `layers` are the chosen ones."""

    model: object  # ModelSpec
    weights: object  # WeightsRef
    preprocess: object  # Preprocess
    taps: tuple  # TapInfo of every module
    layers: tuple[str, ...]
    resolved: dict  # 'depth:F' -> module name
    activations: dict  # layer -> 'relu' | 'relu6' | 'none'
    pool: object  # Pool
    dtype: str = "float32"
    relu_mode: str = "auto"

    @property
    def chosen(self) -> list:
        """TapInfo of the chosen layers, in execution order."""
        by_name = {t.name: t for t in self.taps}
        return [by_name[n] for n in self.layers]

    @property
    def dims(self) -> list[int]:
        return [t.code_dim(self.pool) for t in self.chosen]

    def cache_key(self, precision: str, decoder: str, dataset_fingerprint: str) -> str:
        """The cache entry's key: everything that changes the stored codes (and nothing else)."""
        from featx.store.cache import digest

        fields = {
            "format": 1,
            "model": str(self.model),
            "weights": self.weights.ident,
            "layers": list(self.layers),
            "activations": self.activations,
            "pool": str(self.pool),
            "preprocess": self.preprocess.to_dict(),
            "dtype": self.dtype,
            "precision": precision,
            "dataset": dataset_fingerprint,
        }
        if decoder != "pil":  # its resize differs slightly from PIL's: other pixels, another entry
            fields["decoder"] = decoder
        skipped = {t.name: t.prefix_tokens for t in self.chosen if t.prefix_tokens}
        if skipped and self.pool.kind in ("avg", "max"):
            # avg/max of a token map pool only its patch tokens: entries of earlier featx versions, which
            # pooled the class token in, must not be hits (keys without token maps are unchanged)
            fields["prefix_tokens_skipped"] = skipped
        return digest(fields)

    def head_layer(self) -> str | None:
        """The ImageNet classifier head's module name, when the weights come with ImageNet classes."""
        if self.weights.source in ("random", "builtin", "file"):
            return None
        taps = self.taps
        heads = [
            t
            for t in taps
            if t.depth > 1.0 and t.shape == (1000,) and not any(c.depth > t.depth for c in taps)
        ]
        return heads[-1].name if heads else None

    def with_module(self, module) -> Plan:
        """The plan with taps probed on the loaded `module` (on the CPU), for weights that may
        change the architecture (a checkpoint can rebuild the classifier head)."""
        from featx.models.taps import list_taps

        if self.weights.source != "file":
            return self
        taps = tuple(list_taps(module, self.preprocess.crop_size, device="cpu"))
        return replace(self, taps=taps)

    def to_meta(self) -> dict:
        """The plan as plain data, as classifier files and codes files record it."""
        w = self.weights
        return {
            "model": str(self.model),
            "weights": w.spec,
            "weights_source": w.source,
            "weights_ident": w.ident,
            "layers": list(self.layers),
            "activations": dict(self.activations),
            "pool": str(self.pool),
            "preprocessing": self.preprocess.to_dict(),
            "dtype": self.dtype,
        }

    @classmethod
    def from_meta(cls, meta: dict, module, weights_ref=None) -> Plan:
        """The plan a file recorded (`to_meta`'s fields), with taps probed on the loaded `module`:
        exactly the recorded preprocessing, layers, activations and pooling. `weights_ref`: the
        already resolved weights (default: resolve the recorded ones)."""
        from featx.models.preprocess import Preprocess
        from featx.models.spec import parse_model_name
        from featx.models.taps import list_taps
        from featx.models.weights import resolve_weights
        from featx.settings import parse_pool

        mname = parse_model_name(meta["model"])
        ref = weights_ref or resolve_weights(mname, meta["weights"])
        pre = Preprocess.from_dict(meta["preprocessing"])
        taps = tuple(list_taps(module, pre.crop_size, device="cpu"))
        return cls(
            mname,
            ref,
            pre,
            taps,
            tuple(meta["layers"]),
            {},
            dict(meta["activations"]),
            parse_pool(meta["pool"]),
            meta.get("dtype", "float32"),
        )

    def missing_layers(self) -> list[str]:
        names = {t.name for t in self.taps}
        return [n for n in self.layers if n not in names]


def resolve(
    model: ModelSettings | str, codes: CodeSettings | str | None = None, *, default_may_be_none: bool = False
) -> Plan:
    """Parse, identify the weights, build the skeleton on the meta device, probe its taps, and
    resolve `codes` (None: no layers chosen, as `featx layers` wants). `default_may_be_none`:
    DEFAULT falls back to random init for architectures without pretrained weights."""
    from featx.models.build import build_module, weights_preprocess
    from featx.models.spec import parse_model_name
    from featx.models.taps import activation_for, list_taps, resolve_layers
    from featx.models.weights import resolve_weights
    from featx.settings import parse_pool

    m = as_model(model)
    mname = parse_model_name(m.name)
    try:
        ref = resolve_weights(mname, m.weights)
    except FeatxError:
        if not (default_may_be_none and m.weights == "DEFAULT"):
            raise
        ref = resolve_weights(mname, "none")
    skeleton = build_module(mname, device="meta")
    pre = weights_preprocess(mname, ref, skeleton).with_overrides(m.image_size, m.crop_pct)
    taps = tuple(list_taps(skeleton, pre.crop_size, device="meta"))
    c = as_codes(codes) if codes is not None else CodeSettings()
    pool = parse_pool(c.pool)
    if codes is None:
        return Plan(mname, ref, pre, taps, (), {}, {}, pool, c.dtype, c.relu)
    names, resolved = resolve_layers(taps, c.layers, str(mname))
    by_name = {t.name: t for t in taps}
    for n in names:
        pool.check(by_name[n])
    acts = {n: activation_for(by_name[n], c.relu) for n in names}
    return Plan(mname, ref, pre, taps, tuple(names), resolved, acts, pool, c.dtype, c.relu)


def weights_request(weights: str) -> str:
    """The weights as typed, with a local file replaced by its content hash (for the request key)."""
    from featx.models.weights import is_weights_path, weights_sha256

    if weights and (is_weights_path(weights)):
        return f"sha256:{weights_sha256(weights)}" if os.path.isfile(weights) else f"missing:{weights}"
    return weights


def request_key(
    model: ModelSettings, codes: CodeSettings, precision: str, decoder: str, data_fingerprint: str, libs: dict
) -> str:
    """The request memo's key: the settings as given (before resolution), the data and the libraries."""
    from featx import __version__
    from featx.store.cache import digest

    return digest(
        {
            "featx": __version__,
            "model": model.name,
            "weights": weights_request(model.weights),
            "layers": codes.layers,
            "pool": codes.pool,
            "relu": codes.relu,
            "image_size": model.image_size,
            "crop_pct": model.crop_pct,
            "dtype": codes.dtype,
            "precision": precision,
            "decoder": decoder,
            "data": data_fingerprint,
            "libs": libs,
        }
    )
