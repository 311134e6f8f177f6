"""How the part after the freeze point adapts: `full`, `lp-ft`, `bitfit` or `lora`.

The freeze point (`--train-from`) says *where* the network may change; the method says *how*:

- `full`: every parameter after the freeze point trains (at `lr * backbone_lr_mult`), with a new head;
- `lp-ft` (Kumar et al., ICLR 2022): first a linear probe, then `full`. The probe is a multinomial
  logistic regression on the head's own input (the pooled features the head reads, computed with
  the eval transform on the run's training rows), C chosen on the run's validation rows; its
  weights become the new head's starting point, so fine-tuning starts from a good head and moves
  the pretrained features less. The probe alone counts as "epoch 0" (winning ties): when no
  epoch of fine-tuning beats it on validation, it is the answer. Batch-norm running statistics stay fixed during LP-FT's
  fine-tuning (their affine parameters train): the probe was fitted on features under those
  statistics, and a few small augmented batches move them far enough to undo it (measured on
  flowers5_128: validation 0.70 with the probe, 0.60 after one epoch at a learning rate of 1e-9
  with the statistics updating). The probe is fitted here rather than read from a cache entry:
  the head reads the network's pre-head features (not featx's ReLU'd, pooled codes of a tapped
  layer), on exactly the rows this run trains on;
- `bitfit` (Ben Zaken et al., 2022): after the freeze point only biases and normalisation
  parameters train (at `lr`, as the head: they are few), plus the head; batch-norm statistics
  keep updating there;
- `lora` (Hu et al., 2022) through the PEFT library: low-rank adapters (rank `lora_rank`, scale
  `lora_alpha / lora_rank`) on every `nn.Linear` and every ungrouped `nn.Conv2d` after the freeze
  point except the head; grouped (depthwise) convolutions get none, because PEFT can neither
  give them a rank that does not divide their groups nor merge them. The adapters train at `lr`,
  the original weights and batch-norm statistics stay fixed (the whole network runs in eval
  mode: dropout off too). The saved model is *merged* (W + B A folded into each weight), so it
  is an ordinary network of the original layout that `predict` and `extract --weights` load
  without PEFT; the adapters' rank and alpha are recorded in its description.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from featx.errors import UsageError

log = logging.getLogger("featx")

LP_C = (0.001, 0.01, 0.1, 1.0, 10.0)  # LP-FT's probe: C on standardised features, chosen on validation
PEFT_MISSING = "--method lora needs the PEFT library; install it with: pip install 'featx[peft]'"


def require_peft():
    try:
        import peft
    except ImportError:
        raise UsageError(PEFT_MISSING) from None
    return peft


def _norm_types():
    import torch.nn as nn

    return (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def lora_targets(module, point, head: str) -> list[str]:
    """Module names LoRA adapts: nn.Linear and ungrouped nn.Conv2d after the freeze point, not the head."""
    import torch.nn as nn

    out = []
    for name, m in module.named_modules():
        if name == head or name in point.frozen or not name:
            continue
        if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
            out.append(name)
    return out


def adapt(module, point, head: str, settings, trained: list, head_params: list):
    """(module to train, adapted params, head params) for `settings.method`, given the parameters
    `apply_freeze` left trainable (`trained`, the backbone's; `head_params`)."""
    if settings.method in ("full", "lp-ft"):
        return module, trained, head_params
    if settings.method == "bitfit":
        norms = _norm_types()
        keep = set()
        for m in module.modules():
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, norms) or pname == "bias":
                    keep.add(id(p))
        adapted = [p for p in trained if id(p) in keep]
        for p in trained:
            if id(p) not in keep:
                p.requires_grad_(False)
        return module, adapted, head_params
    return _lora(module, point, head, settings, trained, head_params)


def _lora(module, point, head, settings, trained, head_params):
    import torch

    peft = require_peft()
    targets = lora_targets(module, point, head)
    if not targets:
        raise UsageError(
            f"--method lora --train-from {point.spec}: no linear or ungrouped convolution layer trains "
            f"after this freeze point; train from an earlier point (depth:0 adapts every layer)"
        )
    config = peft.LoraConfig(
        r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules=targets
    )
    with torch.random.fork_rng(devices=[]):  # the adapters' initialisation: a function of the seed
        torch.manual_seed(settings.seed * 7919 + 13)
        wrapped = peft.get_peft_model(module, config)
    for p in head_params:
        p.requires_grad_(True)
    head_ids = {id(p) for p in head_params}
    adapted = [p for p in wrapped.parameters() if p.requires_grad and id(p) not in head_ids]
    return wrapped, adapted, head_params


def plain_module(module, method: str):
    """The network to save and time: LoRA's adapters merged into its weights, else `module` itself."""
    if method == "lora" and hasattr(module, "merge_and_unload"):
        return module.merge_and_unload()
    return module


def lp_head(job, head: str, folder: str | None, memo: dict) -> dict:
    """LP-FT's first step: fit the head as a linear probe on the head's input features and load it
    into the network; the fitted head is kept in `memo` (for the recipe grid's other points) and
    in `folder` (lp-head.safetensors, so a resumed run reuses it). Returns what it measured
    (chosen C, validation accuracy, seconds)."""
    import time

    import torch

    from featx.finetune.checkpoints import read_checkpoint_file, tensors_bytes, write_file

    layer = job.module.get_submodule(head)
    path = os.path.join(folder, "lp-head.safetensors") if folder else None
    got = memo.get("probe") or (read_checkpoint_file(path, "featx_lp_head") if path else None)
    if got and got[0]["weight"].shape == layer.weight.shape:
        tensors, info = got
    else:
        from threadpoolctl import threadpool_limits

        from featx.finetune.threads import torch_threads

        t0 = time.perf_counter()
        # one thread for the features and the fit: the same probe in every process, whatever its
        # thread settings, so a run resumed in another process continues from the same head
        with torch_threads(1), threadpool_limits(1):
            (x_fit, y_fit), (x_val, y_val) = (
                _head_inputs(job, layer, r) for r in (job.rows.train, job.rows.val)
            )
            weight, bias, info = _fit_probe(x_fit, y_fit, x_val, y_val, len(job.ds.classes))
        info["seconds"] = round(time.perf_counter() - t0, 3)
        tensors = {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}
        if path:
            write_file(path, tensors_bytes(tensors, {"featx_lp_head": info}))
    memo["probe"] = (tensors, info)
    with torch.no_grad():
        layer.weight.copy_(tensors["weight"].to(layer.weight))
        layer.bias.copy_(tensors["bias"].to(layer.bias))
    log.info(
        "LP-FT: the head starts as a linear probe (C %g, val accuracy %.4f)", info["C"], info["val_accuracy"]
    )
    return info


def _head_inputs(job, layer, rows) -> tuple[np.ndarray, np.ndarray]:
    """(features the head reads [N, d], labels [N]) of `rows`, through `predict_logits` with a hook."""
    from featx.finetune.train import predict_logits

    feats = []
    hook = layer.register_forward_hook(lambda m, i, o: feats.append(i[0].detach().float().cpu().numpy()))
    try:
        _, y = predict_logits(job, rows)
    finally:
        hook.remove()
    return (np.concatenate(feats) if feats else np.empty((0, layer.in_features), np.float32)), y


def _fit_probe(x_fit, y_fit, x_val, y_val, k: int):
    """Multinomial logistic regression on centred features scaled by one number (their RMS standard
    deviation), C chosen on validation (accuracy, then log-loss, then the smaller C); folded into
    (weight [k, d], bias [k]). One scale for every feature, not one each: dividing by a near-constant
    feature's tiny deviation would fold a huge weight into the head, whose gradients then wreck the
    backbone in the first fine-tuning steps."""
    from sklearn.linear_model import LogisticRegression

    mean = x_fit.mean(0)
    std = float(np.sqrt(np.mean(x_fit.var(0)))) or 1.0
    z_fit, z_val = (x_fit - mean) / std, (x_val - mean) / std
    best = None
    for c in LP_C:
        clf = LogisticRegression(C=c, max_iter=1000).fit(z_fit, y_fit)
        p = np.full((len(z_val), k), 1e-12)
        p[:, clf.classes_] = np.clip(clf.predict_proba(z_val), 1e-12, 1)
        score = (
            float(np.mean(p.argmax(1) == y_val)),
            -float(-np.log(p[np.arange(len(y_val)), y_val]).mean()),
        )
        if best is None or score > best[0]:
            best = (score, c, clf)
    (acc, _), c, clf = best
    coef = np.zeros((k, x_fit.shape[1]))
    intercept = np.full(k, -30.0)  # a class absent from the training rows: never predicted at first
    if len(clf.classes_) == 2 and clf.coef_.shape[0] == 1:  # binary: sklearn keeps one row
        coef[clf.classes_[1]], intercept[clf.classes_[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        coef[clf.classes_[0]], intercept[clf.classes_[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
    weight = coef / std
    bias = intercept - weight @ mean
    return weight.astype(np.float32), bias.astype(np.float32), {"C": c, "val_accuracy": acc}
