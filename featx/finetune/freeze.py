"""The freeze point: the head, which modules train, batch-norm statistics of the frozen part."""

from __future__ import annotations

from dataclasses import dataclass

from featx.errors import UsageError


def find_head(module) -> str:
    """The classifier head's module name: the last nn.Linear, whose weight and bias end the
    state dict (the layout `featx.models.build` reloads with another number of classes)."""
    import torch.nn as nn

    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    keys = list(module.state_dict())
    if (
        not linears
        or module.get_submodule(linears[-1]).bias is None
        or keys[-2:] != [f"{linears[-1]}.weight", f"{linears[-1]}.bias"]
    ):
        raise UsageError(
            f"{type(module).__name__} has no recognisable classifier head (a final nn.Linear with a bias, "
            f"last in its state dict); featx finetune replaces that head, so use another model"
        )
    return linears[-1]


def replace_head(module, head: str, n_classes: int, seed: int) -> None:
    import torch
    import torch.nn as nn

    old = module.get_submodule(head)
    parent, _, name = head.rpartition(".")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, n_classes)
    setattr(module.get_submodule(parent) if parent else module, name, new)


@dataclass(frozen=True)
class FreezePoint:
    """`spec` resolved: train from module `first` on (None: everything trains), frozen module names."""

    spec: str
    cut: str | None  # the tap whose output the trained part consumes ('depth:F'), or None
    first: str | None  # the first module that trains ('name' specs), or None
    depth: float
    frozen: frozenset

    def describe(self) -> str:
        if self.cut is None and self.first is None:
            return "input (everything trains)"
        return f"after {self.cut}" if self.cut else self.first


def resolve_freeze_point(taps, module, spec: str, model: str = "the model") -> FreezePoint:
    """`depth:0` (full fine-tune), `depth:F` (the tap `resolve_layers` picks for F: its output and
    everything before it are frozen) or a module name (it and everything after it train)."""
    from featx.models.taps import resolve_layers
    from featx.settings import depth_fraction

    spec = spec.strip()
    by_name = {t.name: t for t in taps}
    frac = depth_fraction(spec.replace(" ", ""))
    try:
        if frac == 0.0:
            return FreezePoint(spec, None, None, 0.0, frozenset())
        if frac is not None or spec in by_name:
            names, _ = resolve_layers(taps, spec, model)
            return _freeze_set(spec, by_name[names[0]], frac is not None, taps, module)
    except (UsageError, ValueError):
        pass
    names = [t.name for t in taps if t.candidate]
    raise UsageError(
        f"--train-from {spec}: not a freeze point of {model}; use depth:F with F from 0 (train everything) "
        f"to 1.0 (head only), or one of its layers: {', '.join(names)}"
    )


def _freeze_set(spec: str, tap, after: bool, taps, module) -> FreezePoint:
    order = {t.name: t.order for t in taps}

    def pos(name: str) -> int:  # modules without a tensor output: their nearest tapped ancestor's position
        while name and name not in order:
            name = name.rpartition(".")[0]
        return order.get(name, -1)

    cut = tap.name
    frozen = set()
    for name, _ in module.named_modules():
        if not name or cut.startswith(name + "."):  # the root and the cut's ancestors hold trained parts
            continue
        inside = name == cut or name.startswith(cut + ".")
        if (inside and after) or (not inside and pos(name) < order[cut]):
            frozen.add(name)
    return FreezePoint(spec, cut if after else None, None if after else cut, tap.depth, frozenset(frozen))


def apply_freeze(module, point: FreezePoint, head: str) -> tuple[list, list]:
    """requires_grad off in the frozen part; returns (trainable backbone params, head params).
    The root's and the freeze point's ancestors' own tensors (a ViT's class token and position
    embedding) are used first, so they freeze whenever anything does."""
    head_params = list(module.get_submodule(head).parameters())
    head_ids = {id(p) for p in head_params}
    point_name = point.cut or point.first or ""
    backbone = []
    for name, mod in module.named_modules():
        ancestor = not name or point_name.startswith(name + ".")
        for p in mod.parameters(recurse=False):
            if id(p) in head_ids:
                continue
            freeze = name in point.frozen or (ancestor and bool(point.frozen))
            p.requires_grad_(not freeze)
            if not freeze:
                backbone.append(p)
    return backbone, head_params


def set_train_mode(module, point: FreezePoint) -> None:
    """Train mode for the trained part, eval mode (batch-norm statistics fixed) for the frozen part."""
    module.train()
    for name, mod in module.named_modules():
        if name in point.frozen:
            mod.training = False


def train_mode(module, point, method: str) -> None:
    """Training mode for one epoch: LoRA runs the whole network in eval mode (its base weights and
    statistics are fixed); the other methods train after the freeze point (`set_train_mode`),
    LP-FT with every batch norm's running statistics fixed."""
    if method == "lora":
        module.eval()
        return
    set_train_mode(module, point)
    if method == "lp-ft":  # the probe was fitted on features under these statistics: keep them
        import torch.nn as nn

        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
