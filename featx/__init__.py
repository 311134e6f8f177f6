"""featx: tap layers of pretrained CNNs into an HDF5 cache and measure their codes with linear classifiers.

The subpackages follow the data: sources -> models -> engine -> store -> classifiers / finetune ->
bench -> cli (docs/architecture.md draws it, tests/test_layout.py enforces it).

The package imports lazily so that `import featx` and cache hits stay fast (importing torch alone
takes over a second); the names below load their modules on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

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
    "ExtractResult": "featx.engine.job",
    "CodesFile": "featx.store.codes",
    "open_codes": "featx.store.codes",
    "export_layer": "featx.store.export",
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


# Module paths of the flat layout before the subpackages that files on disk still name: a joblib
# export (`fit --export-joblib`) pickles its pipeline's classes by module path (featx.classify.L2Normalize).
MOVED = {
    "featx.classify": "featx.classifiers.estimators",
    "featx.block_softmax": "featx.classifiers.block_softmax",
    "featx.torch_softmax": "featx.classifiers.torch_softmax",
    "featx.transformer": "featx.classifiers.transformer",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module that holds its classes now."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass


sys.meta_path.append(_MovedModules())
