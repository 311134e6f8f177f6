"""What a prediction from one tapped layer of a codes file costs: the backbone's parameters up to the
layer, and the forward pass to it timed on this device.

A probe on layer L never runs the network past L (extraction stops after its deepest tap), so the
backbone part of its cost is the forward to L:

- `backbone_params`: the parameters of every module that has started running by the time L's output
  exists, in the execution order `featx.models.taps.list_taps` records (`TapInfo.order`, by call
  start): a module counts when it started at or before L (everything before L on the path, and L's
  own parameters) or lies inside L. Parameters held directly by a module that is no tap of its own
  (a ViT's class token and position embedding on the root module) count with the first tap inside
  that module, or always when it has none. A parameter shared by two modules counts once. The
  classifier head (depth > 1) is therefore outside every layer up to the penultimate one.
- `inference_ms_per_image`: `featx.engine.cost.inference_ms` of the forward to L (hooked as
  extraction hooks it, stopping after L's output is pooled), in float32, on random input at the
  codes file's crop size, at the batch size `featx.engine.cost.inference_batch` gives for the run.

The architecture is built with featx's seeded random initialisation, never with the entry's weights:
the operations (and so the count and the time) are the same, and nothing is downloaded or read.
A fine-tuned checkpoint whose head differs in classes is counted with the architecture's own head,
which matters only for a tap on the head itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from featx.engine.cost import inference_batch, inference_ms
from featx.errors import FeatxError, first_line


@dataclass(frozen=True)
class LayerCost:
    """The backbone's share of a probe's cost at one layer (None: unknown; `note` says why)."""

    backbone_params: int | None = None
    inference_ms_per_image: float | None = None
    inference_batch_size: int | None = None
    note: str = ""


def backbone_params(module, taps: Sequence, layer: str) -> int | None:
    """Parameters of `module` a forward runs through up to and including `layer` (None: no such tap)."""
    by_name = {t.name: t for t in taps}
    tap = by_name.get(layer)
    if tap is None:
        return None
    orders = sorted((t.name, t.order) for t in taps)
    seen: set[int] = set()
    total = 0
    for name, mod in module.named_modules():
        own = list(mod.parameters(recurse=False))
        if not own:
            continue
        if name in by_name:
            start = by_name[name].order
        else:  # no tap of its own: as early as the first tap inside it, else always counted
            inner = [o for n, o in orders if not name or n.startswith(name + ".")]
            start = min(inner) if inner else 0
        inside = name == layer or name.startswith(layer + ".")
        if start <= tap.order or inside:
            for p in own:
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel()
    return int(total)


def entry_costs(
    path: str,
    layers: Sequence[str],
    device: str = "auto",
    batch_size: int | str | None = None,
    timing: bool = True,
) -> dict[str, LayerCost]:
    """{layer: LayerCost} for `layers` of the codes file at `path`: backbone parameters up to each
    layer, and (with `timing`) the forward to it on `device` at `inference_batch(batch_size)` (None:
    the batch size the entry was extracted with). A layer that is not a module of the recorded
    architecture (a concatenation is costed by its deepest part), or an architecture featx cannot
    build here, gets an empty cost with a note instead of an error."""
    from featx.store.codes import CodesFile

    with CodesFile(path) as f:
        meta = f.meta
        size = int((meta.preprocessing or {}).get("crop_size") or meta.image_size or 0)
        attrs = {n: f.layer_meta(n) for n in f.layers}
    wanted = list(dict.fromkeys(layers))
    try:
        module, taps = _architecture(meta.model, size)
    except (FeatxError, RuntimeError, ValueError, KeyError, ImportError) as e:
        note = f"{meta.model}: cannot build the architecture here ({first_line(e)})"
        return {n: LayerCost(note=note) for n in wanted}
    out = {}
    by_name = {t.name: t for t in taps}
    for name in wanted:
        parts = [p for p in name.split("+") if p in by_name]
        if len(parts) != len(name.split("+")):
            out[name] = LayerCost(note=f"{name}: not a module of {meta.model}")
            continue
        deepest = max(parts, key=lambda p: by_name[p].order)
        out[name] = LayerCost(backbone_params(module, taps, deepest))
    if timing and any(c.backbone_params is not None for c in out.values()):
        batch = inference_batch(batch_size if batch_size is not None else meta.batch_size)
        out = _timed(module, by_name, attrs, meta, out, device, size, batch)
    return out


def _architecture(model: str, size: int):
    """(module with featx's random initialisation on the CPU, its taps) of a recorded model name."""
    from featx.models.build import build_module
    from featx.models.spec import parse_model_name
    from featx.models.taps import list_taps

    module = build_module(parse_model_name(model))
    return module, list_taps(module, size, device="cpu")


def _timed(module, by_name, attrs, meta, costs, device, size, batch) -> dict[str, LayerCost]:
    """The costs with each layer's forward timed (a layer whose timing fails keeps its count)."""
    from dataclasses import replace

    from featx.engine.compute import resolve_device
    from featx.models.taps import Tapper
    from featx.settings import parse_pool

    dev = resolve_device(device)
    module = module.to(dev).eval()
    try:
        pool = parse_pool(meta.pool or "avg")
    except FeatxError:
        pool = parse_pool("avg")
    out = dict(costs)
    for name, cost in costs.items():
        if cost.backbone_params is None:
            continue
        parts = name.split("+")
        deepest = max(parts, key=lambda p: by_name[p].order)
        acts = {deepest: getattr(attrs.get(deepest), "activation", "none") or "none"}
        try:
            with Tapper(module, [by_name[deepest]], acts, pool) as tapper:
                ms = inference_ms(tapper, size, batch, dev)
        except RuntimeError as e:  # out of memory at this batch size, say
            out[name] = replace(cost, note=f"{name}: inference not timed ({first_line(e)})")
            continue
        out[name] = replace(cost, inference_ms_per_image=ms, inference_batch_size=batch)
    return out
