"""Which layers to tap and how a tapped output becomes a code.

`list_taps` runs one probe forward (on the meta device when no values are needed) and describes
every module whose output is a tensor with a `TapInfo`: output shape, stride, relative depth, and
how the network's own activation relates to it (`post_act`: the output already went through an
activation; `next_act`: the network applies one to it next). `resolve_layers` turns names and
`depth:` fractions into module names. `Tapper` hooks the chosen modules and, during extraction,
turns each output into a code at once (activation, then pooling), so one forward pass serves all
taps, later in-place ops cannot corrupt a tapped tensor, and the forward stops after the last tap.

Naming: taps are module names as `model.named_modules()` gives them (`layer3`, `features.10`,
`blocks.4.0`). A module called several times per forward (a shared ReLU) is tapped at its last call.

Relative depth: the fraction of the network's convolution and linear operations that have run when
the tap's output exists, out of those before the classifier head; 1.0 is the penultimate
representation (the input of the final classifier).

Token maps: a [T, D] output of a ViT-style model (timm ViT/DeiT/BEiT/EVA, torchvision ViT) starts
with its prefix tokens (the class token first, then any register or distillation tokens) and ends
with the patch tokens; `TapInfo.prefix_tokens` counts them, so pooling can take the class token
(`cls`) or pool only the patch tokens (`avg`/`mean`, `max`), as a CNN's global pooling covers only
its spatial grid.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from featx.errors import UsageError, closest
from featx.settings import Pool, depth_fraction, layer_tokens

RELU_FAMILY = ("relu", "relu6")
_ACT_FUNCS = {
    "relu": "relu",
    "relu_": "relu",
    "relu6": "relu6",
    "silu": "silu",
    "silu_": "silu",
    "gelu": "gelu",
    "hardswish": "hardswish",
    "hardswish_": "hardswish",
    "mish": "mish",
    "elu": "elu",
    "elu_": "elu",
    "selu": "selu",
    "celu": "celu",
    "leaky_relu": "leaky_relu",
    "leaky_relu_": "leaky_relu",
}
_WEIGHT_FUNCS = {
    "conv1d",
    "conv2d",
    "conv3d",
    "linear",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
}
# modules whose output carries its input's activation state (pooling of post-ReLU maps stays >= 0)
_PASSTHROUGH = re.compile(r"(Pool|Flatten|Dropout|Identity)", re.I)
_STAGE = re.compile(r"(Stage|Stack)$")
_NOT_CANDIDATES = re.compile(r"^(Dropout\w*|Identity|Flatten)$")


@dataclass(frozen=True)
class TapInfo:
    """One tappable module, as the probe forward saw it."""

    name: str  # module path: 'layer3', 'features.10'
    kind: str  # module class: 'Bottleneck'
    shape: tuple[int, ...]  # output shape without the batch dim: (C, H, W), (D,), (L, C)
    stride: int | None  # input pixels per output pixel, for spatial outputs
    depth: float  # relative depth; 1.0 = penultimate, > 1 for the classifier head
    post_act: str | None  # activation the output already went through ('relu', 'silu', ...)
    next_act: str | None  # activation the network applies to this output next
    trunk: bool  # on the main path (shown by `featx layers` without --all)
    candidate: bool  # eligible for `depth:` resolution
    calls: int  # calls per forward (a tap takes the last)
    order: int  # position in execution order (by call start)
    level: int  # nesting level, for display
    prefix_tokens: int = 0  # token maps [T, D]: leading class/register/distillation tokens (0: all patches)
    class_token: bool = False  # token 0 of this token map is a class token (what --pool cls takes)

    def code_dim(self, pool: Pool) -> int:
        return pool.dim(self.shape)

    @property
    def tokens(self) -> bool:
        """A token map [T, D] (ViT-style blocks), as opposed to a spatial map [C, H, W] or a vector [D]."""
        return len(self.shape) == 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @property
    def activation_label(self) -> str:
        if self.post_act:
            return f"post-{self.post_act}"
        if self.next_act:
            return f"->{self.next_act}"
        return "-"


# -- activation policy ---------------------------------------------------------------------------


def activation_for(tap: TapInfo, relu: str = "auto") -> str:
    """The op applied to a tap's output before pooling: 'relu', 'relu6' or 'none'.

    auto: the network's own ReLU where it has one at this tap (the output is post-ReLU, or the
    network applies ReLU/ReLU6 to it next); raw elsewhere. on: ReLU everywhere. off: raw everywhere.
    """
    if relu == "off":
        return "none"
    if relu == "on":
        return "relu"
    if tap.post_act in RELU_FAMILY:
        return "relu"
    if tap.next_act in RELU_FAMILY:
        return tap.next_act
    return "none"


# -- the probe -----------------------------------------------------------------------------------


def list_taps(module, input_size: int, device: str = "meta") -> list[TapInfo]:
    """Describe every module of `module` whose output is a tensor, by one forward of a 1 x 3 x S x S input.

    Runs on `device` ('meta' needs no memory or weights); the module must already live there.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    seq = [0]
    keep: list = []  # keeps probed tensors alive so their id()s stay unique
    starts: dict[str, int] = {}
    wstart: dict[str, int] = {}  # weight ops done when a module starts
    outs: dict[str, tuple] = {}  # name -> (tensor, seq, weight ops so far, calls)
    tensor_act: dict[int, tuple[str, int]] = {}  # id(tensor) -> (activation, seq)
    act_inputs: list[tuple[int, int, str]] = []  # (id(input), seq, activation)
    wcount = [0]

    def tick() -> int:
        seq[0] += 1
        return seq[0]

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            fname = getattr(func, "__name__", "")
            act = _ACT_FUNCS.get(fname)
            if fname == "hardtanh":  # nn.ReLU6 is hardtanh(0, 6)
                lo = args[1] if len(args) > 1 else (kwargs or {}).get("min_val", -1.0)
                hi = args[2] if len(args) > 2 else (kwargs or {}).get("max_val", 1.0)
                act = "relu6" if (lo, hi) == (0.0, 6.0) else None
            if act and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                t = tick()
                keep.extend((args[0], out))
                act_inputs.append((id(args[0]), t, act))
                tensor_act[id(out)] = (act, t)
            elif fname in _WEIGHT_FUNCS:
                wcount[0] += 1
            return out

    def pre_hook(name):
        def hook(mod, inputs):
            if name not in starts:
                starts[name] = tick()
                wstart[name] = wcount[0]

        return hook

    def post_hook(name):
        def hook(mod, inputs, out):
            if not isinstance(out, torch.Tensor):
                return
            t = tick()
            keep.append(out)
            calls = outs[name][3] + 1 if name in outs else 1
            inp = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            outs[name] = (out, t, wcount[0], calls, inp)
            if inp is not None and _PASSTHROUGH.search(type(mod).__name__) and id(inp) in tensor_act:
                tensor_act.setdefault(id(out), (tensor_act[id(inp)][0], t))

        return hook

    named = [(n, m) for n, m in module.named_modules() if n]
    inplace = [(m, m.inplace) for _, m in named if isinstance(getattr(m, "inplace", None), bool)]
    handles = []
    try:
        for m, _ in inplace:  # in-place activations would make a conv's output look post-activation
            m.inplace = False
        for n, m in named:
            handles.append(m.register_forward_pre_hook(pre_hook(n)))
            handles.append(m.register_forward_hook(post_hook(n)))
        x = torch.randn(1, 3, input_size, input_size, device=device)
        with torch.no_grad(), Mode():
            y = module(x)
    except Exception as e:
        raise UsageError(
            f"the model cannot run on a {input_size}x{input_size} input ({type(e).__name__}: {e}); "
            f"choose another --image-size"
        ) from None
    finally:
        for h in handles:
            h.remove()
        for m, flag in inplace:
            m.inplace = flag

    trunk, containers = _trunk_names(module)
    # the classifier head: the first non-container module that computes the model's output with weights
    heads = [n for n, (o, _t, w, *_rest) in outs.items() if o is y and n not in containers and w > wstart[n]]
    head_start = min((starts[n] for n in heads), default=math.inf)

    def is_candidate(n: str, mod) -> bool:
        return (
            n in trunk
            and n not in containers
            and starts[n] < head_start
            and not _NOT_CANDIDATES.match(type(mod).__name__)
        )

    mods = dict(named)
    cands = [n for n in outs if is_candidate(n, mods[n])]
    denom = max((outs[n][2] for n in cands), default=0) or max(wcount[0], 1)

    prefix, patches, has_cls = _token_layout(module, outs, mods)
    infos = []
    for n, (o, t, w, calls, _inp) in outs.items():
        shape = tuple(int(s) for s in o.shape[1:])
        # a token map [T, D] of prefix + patch tokens; the patch embedding's own output has no prefix
        k = prefix if prefix and len(shape) == 2 and shape[0] == patches + prefix else 0
        stride = int(round(input_size / shape[1])) if len(shape) == 3 and shape[1] else None
        pa = tensor_act.get(id(o))
        post = pa[0] if pa and pa[1] <= t else None
        nxt = None
        if post is None:
            nxt = next((a for i, s, a in act_inputs if i == id(o) and s > t), None)
        infos.append(
            TapInfo(
                name=n,
                kind=type(mods[n]).__name__,
                shape=shape,
                stride=stride,
                depth=round(w / denom, 4),
                post_act=post,
                next_act=nxt,
                trunk=n in trunk,
                candidate=n in cands,
                calls=calls,
                order=starts[n],
                level=n.count("."),
                prefix_tokens=k,
                class_token=bool(k) and has_cls,
            )
        )
    infos.sort(key=lambda i: i.order)
    return infos


def _token_layout(module, outs: dict, mods: dict) -> tuple[int, int, bool]:
    """(prefix tokens, patch tokens, class token first) of a ViT-style model; (0, 0, False) otherwise.

    timm's ViT family says how many tokens it prepends to the patches (`num_prefix_tokens`: class,
    register and distillation tokens, the class token first) and holds a `cls_token` when one is
    among them; torchvision's ViT prepends one `class_token`. The patch count is what the patch
    embedding (timm `patch_embed`, torchvision `conv_proj`) output in the probe.
    """
    import torch.nn as nn

    cls = getattr(module, "cls_token", None)
    if cls is None:
        cls = getattr(module, "class_token", None)
    has_cls = isinstance(cls, nn.Parameter)
    prefix = getattr(module, "num_prefix_tokens", None)
    if isinstance(prefix, bool) or not isinstance(prefix, int):
        prefix = 1 if has_cls else 0
    embed = next((n for n in ("patch_embed", "conv_proj") if n in outs), None)
    if prefix <= 0 or embed is None:
        return 0, 0, False
    shape = tuple(outs[embed][0].shape[1:])
    if len(shape) == 2:  # [P, D]
        patches = shape[0]
    elif len(shape) == 3:  # a conv's [D, H, W], or timm's NHWC [H, W, D]
        patches = shape[1] * shape[2] if isinstance(mods[embed], nn.Conv2d) else shape[0] * shape[1]
    else:
        return 0, 0, False
    return prefix, int(patches), has_cls


def _trunk_names(module) -> tuple[set[str], set[str]]:
    """The main path: the root's children, expanding containers recursively. Returns (trunk
    names, the containers among them).

    Containers are Sequential/ModuleList modules and stage modules named by timm's convention
    (class name ending in 'Stage' or 'Stack', e.g. ConvNeXtStage, RegStage), so the listing shows
    stages and their blocks while residual blocks stay whole.
    """
    import torch.nn as nn

    names: set[str] = set()
    containers: set[str] = set()

    def expand(prefix: str, m) -> None:
        for child_name, child in m.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            names.add(full)
            if isinstance(child, (nn.Sequential, nn.ModuleList)) or _STAGE.search(type(child).__name__):
                containers.add(full)
                expand(full, child)

    expand("", module)
    return names, containers


# -- naming layers -------------------------------------------------------------------------------


def resolve_layers(
    taps: Sequence[TapInfo], spec: str | Sequence[str], model: str = "the model"
) -> tuple[list[str], dict[str, str]]:
    """Names and `depth:` fractions -> module names in execution order, plus how each depth resolved.

    `spec` is a comma-separated string or a list: module names (`layer3`), and fractions after a
    `depth:` prefix (`depth:0.25,0.5,1.0`); both may mix (`layer1,depth:0.5,0.75`).
    """
    tokens = layer_tokens(spec)
    if not tokens:
        raise UsageError(
            "--layers is empty; give module names (`featx layers MODEL` lists them) or depth:0.25,0.5,..."
        )
    by_name = {t.name: t for t in taps}
    cands = [t for t in taps if t.candidate]
    chosen: list[str] = []
    resolved: dict[str, str] = {}
    for tok in tokens:
        frac = depth_fraction(tok)
        if frac is not None:
            if not 0.0 < frac <= 1.0:
                raise UsageError(f"--layers {tok}: depth fractions must be in (0, 1]")
            if not cands:
                raise UsageError(
                    f"--layers {tok}: {model} has no main-path layers to place depths on; "
                    f"name layers instead (`featx layers {model} --all`)"
                )
            best = min(cands, key=lambda t: (abs(t.depth - frac), -t.order))
            resolved[tok] = best.name
            chosen.append(best.name)
            continue
        chosen.append(tok)
    unknown = [tok for tok in chosen if tok not in by_name]
    if len(unknown) == 1:
        raise UsageError(
            f"unknown layer {unknown[0]!r} for {model}; closest: {closest(unknown[0], list(by_name))} "
            f"(`featx layers {model} --all` lists every name)"
        )
    if unknown:  # every unknown name at once, each with its closest
        raise UsageError(
            f"unknown layers for {model}: "
            + "; ".join(f"{tok!r} (closest: {closest(tok, list(by_name), n=2)})" for tok in unknown)
            + f" (`featx layers {model} --all` lists every name)"
        )
    order = {t.name: t.order for t in taps}
    return sorted(dict.fromkeys(chosen), key=order.__getitem__), resolved


# -- hooks for extraction ------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the last tap's hook: nothing after it needs computing."""


class Tapper:
    """Hooks `taps` of `module`; calling it runs one forward and returns {name: code [N, D]}.

    Each code is computed inside the hook (activation in float32, then pooling), so it is a new
    tensor that later in-place ops cannot touch; the forward stops once every tap has fired.
    """

    def __init__(
        self,
        module,
        taps: Sequence[TapInfo],
        activations: dict[str, str],
        pool: Pool,
        stop_early: bool = True,
    ):
        self.module = module
        self.taps = list(taps)
        self.activations = activations
        self.pool = pool
        self.stop_early = stop_early
        self._handles: list = []
        self._codes: dict = {}
        self._seen: dict[str, int] = {}

    def __enter__(self) -> Tapper:
        mods = dict(self.module.named_modules())
        for tap in self.taps:
            self._handles.append(mods[tap.name].register_forward_hook(self._hook(tap)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, tap: TapInfo):
        import torch
        import torch.nn.functional as F

        op = self.activations.get(tap.name, "none")

        def hook(mod, inputs, out):
            self._seen[tap.name] = self._seen.get(tap.name, 0) + 1
            if self._seen[tap.name] < tap.calls:
                return
            x = out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
            if op == "relu":
                x = F.relu(x)
            elif op == "relu6":
                x = F.relu6(x)
            self._codes[tap.name] = self.pool.apply(x, tap.prefix_tokens)
            if self.stop_early and len(self._codes) == len(self.taps):
                raise _Stop

        return hook

    def __call__(self, x) -> dict:
        self._codes, self._seen = {}, {}
        with contextlib.suppress(_Stop):
            self.module(x)
        missing = [t.name for t in self.taps if t.name not in self._codes]
        if missing:
            raise RuntimeError(f"taps {missing} did not fire during the forward pass")
        codes, self._codes = self._codes, {}
        return {t.name: codes[t.name] for t in self.taps}
