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
    "load_model": "featx.models",
    "Backbone": "featx.models",
    "Preprocess": "featx.models",
    "list_taps": "featx.taps",
    "TapInfo": "featx.taps",
    "resolve_layers": "featx.taps",
    "open_source": "featx.data",
    "ModelSettings": "featx.settings",
    "CodeSettings": "featx.settings",
    "RunSettings": "featx.settings",
    "DataOptions": "featx.settings",
    "resolve": "featx.plan",
    "Plan": "featx.plan",
    "Timings": "featx.engine",
    "extract": "featx.extraction",
    "ExtractResult": "featx.extraction",
    "CodesFile": "featx.store",
    "open_codes": "featx.store",
    "fit": "featx.classify",
    "fit_cell": "featx.classify",
    "protocol_for": "featx.classify",
    "Protocol": "featx.classify",
    "FitReport": "featx.classify",
    "Predictor": "featx.predict",
    "load_classifier": "featx.classifier_io",
    "save_classifier": "featx.classifier_io",
    "export_joblib": "featx.classifier_io",
    "CNNCodes": "featx.transformer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
