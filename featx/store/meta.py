"""Typed views of an entry's metadata: every attribute validated before use (`FileMeta`, `LayerMeta`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import numpy as np

from featx.errors import FeatxError

FORMAT_VERSION = 1


COMPLETE = "complete"


_BAD = object()


def _json(v, default=None):
    if not isinstance(v, str):
        return v if v is not None else default
    try:
        return json.loads(v)
    except ValueError:
        return default


@dataclass(frozen=True)
class LayerMeta:
    """The attributes of `/codes/<layer>`. `relu` is True when the stored codes are non-negative
    ReLU outputs (applied by featx, or already by the network); `activation` is what featx applied."""

    activation: str = "none"  # 'relu' | 'relu6' | 'none'
    pool: str = "avg"
    pre_pool_shape: tuple[int, ...] = ()
    relu: bool = False
    post_act: str = "none"
    next_act: str = "none"
    code_dim: int = 0
    stride: int = 0
    depth: float = 0.0
    kind: str = ""

    @classmethod
    def from_tap(cls, tap, activation: str, pool) -> LayerMeta:
        return cls(
            activation=activation,
            pool=str(pool),
            pre_pool_shape=tuple(tap.shape),
            relu=activation != "none" or tap.post_act in ("relu", "relu6"),
            post_act=tap.post_act or "none",
            next_act=tap.next_act or "none",
            code_dim=tap.code_dim(pool),
            stride=tap.stride or 0,
            depth=tap.depth,
            kind=tap.kind,
        )

    def to_attrs(self) -> dict:
        return {
            "pre_pool_shape": np.array(self.pre_pool_shape, dtype=np.int64),
            "pool": self.pool,
            "relu": self.relu,
            "activation": self.activation,
            "post_act": self.post_act,
            "next_act": self.next_act,
            "code_dim": self.code_dim,
            "stride": self.stride,
            "depth": self.depth,
            "kind": self.kind,
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> LayerMeta:
        a = {k: attr_value(v) for k, v in attrs.items()}
        shape = a.get("pre_pool_shape", ())
        return cls(
            activation=str(a.get("activation", "none")),
            pool=str(a.get("pool", "avg")),
            pre_pool_shape=tuple(shape) if isinstance(shape, (list, tuple)) else (),
            relu=bool(a.get("relu", False)),
            post_act=str(a.get("post_act", "none")),
            next_act=str(a.get("next_act", "none")),
            code_dim=_num(a.get("code_dim"), int, 0),
            stride=_num(a.get("stride"), int, 0),
            depth=_num(a.get("depth"), float, 0.0),
            kind=str(a.get("kind", "")),
        )


def _num(v, kind, default):
    return kind(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


# root attribute name -> FileMeta field, where they differ (the root `relu` is the requested mode)
_RENAMED = {"relu": "relu_mode"}


_JSON_FIELDS = ("preprocessing", "data_options", "library_versions", "layer_resolution", "config")


@dataclass(frozen=True)
class FileMeta:
    """The root attributes extraction writes (`finalize` adds rows, rows_sha256 and featx_state)."""

    model: str
    weights: str
    layers: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    featx_version: str | None = None
    cache_key: str | None = None
    weights_source: str | None = None
    weights_ident: str | None = None
    weights_sha256: str = ""
    preprocessing: dict | None = None
    preprocessing_text: str | None = None
    image_size: int | None = None
    dataset: str | None = None
    dataset_name: str | None = None
    dataset_fingerprint: str | None = None
    split_source: str | None = None
    data_options: dict | None = None
    created: str | None = None
    library_versions: dict | None = None
    layer_resolution: dict | None = None
    pool: str | None = None
    relu_mode: str | None = None  # 'auto' | 'on' | 'off', as requested (stored as root attr `relu`)
    dtype: str | None = None
    precision: str | None = None
    device: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    decoder: str | None = None
    samples: int | None = None
    config: dict | None = None
    labelled: bool | None = None  # False: unlabelled data (one class "", labels 0); None/True: labelled
    unparsed: tuple[str, ...] = ()  # JSON attributes that did not parse (read as None)

    def parsed(self, name: str, path: str):
        """A JSON field that featx needs: a one-line FeatxError naming the file if it did not parse."""
        if name in self.unparsed:
            raise FeatxError(
                f"{path}: attribute {name!r} is not valid JSON; rebuild the file with featx extract"
            )
        return getattr(self, name)

    def to_attrs(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None or f.name == "unparsed":
                continue
            if f.name in _JSON_FIELDS:
                v = json.dumps(v)
            elif f.name == "layers":
                v = np.array(list(v), dtype=object)
            out[{b: a for a, b in _RENAMED.items()}.get(f.name, f.name)] = v
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> FileMeta:
        a = {_RENAMED.get(k, k): attr_value(v) for k, v in attrs.items()}
        known = {f.name for f in fields(cls)} - {"unparsed"}
        kw = {k: v for k, v in a.items() if k in known}
        bad = []
        for k in _JSON_FIELDS:
            if k in kw:
                kw[k] = _json(kw[k], _BAD)
                if kw[k] is _BAD:
                    kw[k] = None
                    bad.append(k)
        kw["unparsed"] = tuple(bad)
        kw["layers"] = tuple(kw.get("layers") or ())
        kw.setdefault("format_version", 1)  # files from before the attribute was written
        return cls(**{"model": str(a.get("model", "")), "weights": str(a.get("weights", "")), **kw})


def attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        return [attr_value(x) for x in v.tolist()]
    if isinstance(v, np.generic):
        return v.item()
    return v
