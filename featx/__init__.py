"""featx: tap layers of pretrained CNNs into an HDF5 cache and measure their codes with linear classifiers.

docs/architecture.md draws the one-way flow (settings -> plan -> engine -> store -> classifiers ->
bench/report) with the module that owns each step.

The package imports lazily so that `import featx` and cache hits stay fast (importing torch alone
takes over a second); the names below load their modules on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "FeatxError": "featx.errors",
    "UsageError": "featx.errors",
    "load_model": "featx.models.build",
    "Backbone": "featx.models.build",
    "Preprocess": "featx.models.preprocess",
    "list_taps": "featx.models.taps",
    "TapInfo": "featx.models.taps",
    "resolve_layers": "featx.models.taps",
    "open_source": "featx.sources.spec",
    "ModelSettings": "featx.settings",
    "CodeSettings": "featx.settings",
    "RunSettings": "featx.settings",
    "DataOptions": "featx.settings",
    "resolve": "featx.models.plan",
    "Plan": "featx.models.plan",
    "Timings": "featx.engine.compute",
    "extract": "featx.engine.extract",
    "ExtractResult": "featx.engine.extract",
    "CodesFile": "featx.store.codes",
    "open_codes": "featx.store.codes",
    "fit": "featx.classifiers.fit",
    "fit_cell": "featx.classifiers.fit",
    "protocol_for": "featx.classifiers.protocol",
    "Protocol": "featx.classifiers.protocol",
    "FitReport": "featx.classifiers.fit",
    "Predictor": "featx.classifiers.predict",
    "load_classifier": "featx.classifiers.io",
    "save_classifier": "featx.classifiers.io",
    "export_joblib": "featx.classifiers.io",
    "CNNCodes": "featx.classifiers.transformer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
