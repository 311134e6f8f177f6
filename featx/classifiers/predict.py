"""Prediction on new images with a saved classifier (saving and loading: featx.classifiers.io)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from featx.classifiers.description import check_backbone, describe
from featx.classifiers.io import load_classifier, save_classifier
from featx.errors import FeatxError, UsageError

log = logging.getLogger("featx")

classifier_meta = describe  # the 0.1.0 name
__all__ = [
    "Prediction",
    "Predictor",
    "collect_images",
    "classifier_meta",
    "load_classifier",
    "save_classifier",
]


# -- images in -----------------------------------------------------------------------------------


def collect_images(inputs: list[str]) -> list[str]:
    """Files as given; folders searched recursively for images; a .csv gives its path column
    (featx.sources.manifests.read_csv: the same reader as extract's manifests); a .txt or .lst
    list its image paths, one a line."""
    from featx.sources.dataset import IMAGE_EXTENSIONS
    from featx.sources.decode import check_limits
    from featx.sources.folders import walk_images
    from featx.sources.manifests import LIST_SUFFIXES, read_image_list, read_path_list

    check_limits()

    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = walk_images(item)
            if not found:
                raise UsageError(
                    f"{item}: no images in this folder (extensions {' '.join(IMAGE_EXTENSIONS)})"
                )
            out.extend(found)
        elif item.lower().endswith(".csv") and os.path.isfile(item):
            out.extend(read_image_list(item))
        elif item.lower().endswith(LIST_SUFFIXES) and os.path.isfile(item):  # image paths, one a line
            base = os.path.dirname(os.path.abspath(item))
            out.extend(p if os.path.isabs(p) else os.path.join(base, p) for p in read_path_list(item, item))
        elif os.path.exists(item):
            out.append(item)
        else:
            raise UsageError(f"{item}: no such image, folder or CSV")
    if not out:
        raise UsageError("give images, folders or a CSV of image paths to predict")
    return out


# -- the predictor -------------------------------------------------------------------------------


@dataclass
class Prediction:
    path: str
    label: str | None
    score: float | None
    top: list[tuple[str, float]]
    error: str | None = None

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "class": self.label,
            "score": self.score,
            "top": [[c, s] for c, s in self.top],
            "error": self.error,
        }


class Predictor:
    """A loaded classifier plus the backbone that feeds it, checked against each other."""

    def __init__(
        self,
        path: str,
        *,
        weights: str | None = None,
        device: str = "auto",
        force: bool = False,
        trust_pickle: bool = False,
    ):
        from featx.engine.compute import computer_for, resolve_device
        from featx.models.build import load_recorded
        from featx.models.plan import Plan

        if self._init_finetuned(path, device):
            return
        self.pipeline, self.meta = load_classifier(path, force=force, trust_pickle=trust_pickle)
        meta = self.meta
        spec = weights or meta["weights"]
        if meta.get("weights_source") == "file" and weights is None and not os.path.isfile(spec):
            raise FeatxError(
                f"{path} needs the weights file {spec}, which is gone; pass --weights PATH to its new place"
            )
        backbone = load_recorded(meta, weights)
        ref = backbone.weights
        found_sha = backbone.weights.sha256 or ""
        want_sha = meta.get("weights_sha256") or ""
        mismatch = (want_sha and found_sha and want_sha != found_sha) or (
            not (want_sha and found_sha) and meta.get("weights_ident") != ref.ident
        )
        if mismatch and not force:
            raise FeatxError(
                f"{path} was trained on codes of {meta['model']} with weights {meta['weights']} "
                f"(sha256 {want_sha[:16] or meta.get('weights_ident')}), but the weights found differ "
                f"(sha256 {found_sha[:16] or ref.ident}); use the weights it was made for (--weights PATH) or refit it"
            )
        check_backbone(path, meta, backbone.module, force)
        plan = Plan.from_meta(meta, backbone.module, weights_ref=ref)  # exactly what the codes file recorded
        self.preprocess = plan.preprocess
        missing = plan.missing_layers()
        if missing:
            raise FeatxError(
                f"{path}: layers {', '.join(missing)} are not in {meta['model']}; the classifier does not fit this model"
            )
        dim = sum(plan.dims)
        ids = getattr(self.pipeline, "classes_", None)
        if (
            getattr(self.pipeline, "n_features_in_", dim) != dim
            or ids is None
            or int(np.max(ids)) >= len(meta["classes"])
        ):
            raise FeatxError(
                f"{path}: the pipeline does not match its description (features or classes differ); refit it"
            )
        # the precision the training codes were computed at, on any device: the same codes
        self.computer = computer_for(
            plan, backbone.module, resolve_device(device), meta.get("precision") or "fp32"
        )
        self.classes = meta["classes"]

    def _init_finetuned(self, path: str, device: str) -> bool:
        """A fine-tuned network (`featx finetune --out`): its own head gives the class scores."""
        from featx.classifiers.description import locate
        from featx.engine.compute import CodeComputer, resolve_device
        from featx.models.saved import finetuned_description, load_finetuned
        from featx.settings import Pool

        kind, found = locate(path)
        if kind != "arrays" or finetuned_description(found) is None:
            return False
        module, head, self.preprocess, self.meta = load_finetuned(found)
        self.pipeline, self.classes = None, self.meta["classes"]
        self.computer = CodeComputer(
            module, [head], {head.name: "none"}, Pool("avg"), self.preprocess, resolve_device(device), "fp32"
        )
        return True

    def close(self) -> None:
        self.computer.close()

    def codes(self, images) -> np.ndarray:
        parts = self.computer(images)
        return np.hstack(parts) if len(parts) > 1 else parts[0]

    def predict(
        self, paths: list[str], top_k: int = 3, batch_size: int = 32, workers: int = 0, progress: bool = True
    ) -> list[Prediction]:
        """One Prediction per path, in order (an undecodable image carries its reason); a progress
        bar on stderr unless `progress=False`."""
        import sys

        from tqdm.auto import tqdm

        from featx.engine.compute import ImageSequence, make_loader
        from featx.sources.dataset import FileLoader

        out: list[Prediction] = []
        bar = tqdm(
            total=len(paths),
            unit="img",
            desc="predict",
            file=sys.stderr,
            disable=not progress,
            mininterval=0.5 if sys.stderr.isatty() else 10.0,
            dynamic_ncols=True,
        )
        for index, images, bad, done in make_loader(
            ImageSequence(FileLoader(paths, paths), len(paths), self.preprocess),
            batch_size,
            workers,
            pin_memory=False,
        ):
            bar.update(done - bar.n)
            results = {}
            if images is not None:
                X = self.codes(images)
                scores, probabilistic = self._scores(X)
                for row, i in enumerate(index):
                    order = np.argsort(-scores[row])[:top_k]
                    top = [(self.classes[int(self._class_ids[k])], float(scores[row, k])) for k in order]
                    results[int(i)] = Prediction(paths[i], top[0][0], top[0][1], top)
            for i, reason in bad:
                results[int(i)] = Prediction(paths[i], None, None, [], reason)
            out.extend(results[k] for k in sorted(results))
        bar.close()
        return out

    @property
    def _class_ids(self) -> np.ndarray:
        return np.arange(len(self.classes)) if self.pipeline is None else self.pipeline.classes_

    def _scores(self, X) -> tuple[np.ndarray, bool]:
        """Per class: probabilities when the classifier has them, else decision values."""
        if self.pipeline is None:  # a fine-tuned network's logits: softmax
            z = np.exp(X - X.max(1, keepdims=True))
            return z / z.sum(1, keepdims=True), True
        if hasattr(self.pipeline, "predict_proba") and hasattr(self.pipeline[-1], "predict_proba"):
            try:
                return self.pipeline.predict_proba(X), True
            except AttributeError:  # e.g. SGD with hinge loss
                pass
        d = self.pipeline.decision_function(X)
        if d.ndim == 1:  # binary: one margin for the second class
            d = np.stack([-d, d], axis=1)
        return d, False
