"""What a result costs: parameters, and inference time per image measured on this device.

Every probe and fine-tune result carries the same cost fields (`COST_FIELDS`), so one table can
set a linear probe beside a LoRA fine-tune:

- `trainable_params`: the parameters the method trained (a probe: its classifier's; k-NN: none);
- `total_params`: the parameters a prediction runs through (the backbone up to the layer, plus the
  classifier);
- `train_seconds`: wall seconds of training (a probe: its fit, C search included; a fine-tune:
  every epoch, the recipe search and a linear probe's first step included), not the extraction;
- `inference_ms_per_image`: milliseconds per image of the forward pass a prediction needs,
  measured here on random input at `batch_size` (`INFERENCE_BATCH` unless the run gave one):
  decoding and resizing are left out, they cost the same for every row.
"""

from __future__ import annotations

import time

COST_FIELDS = (
    "method",
    "trainable_params",
    "total_params",
    "train_seconds",
    "inference_ms_per_image",
    "inference_batch_size",
)
INFERENCE_BATCH = 64  # the batch size timed when the run's is "auto" (autotune's first try)
INFERENCE_REPS = 3  # timed batches after one warm-up; the median counts


def inference_batch(batch_size) -> int:
    """The batch size inference is timed at: the run's, or INFERENCE_BATCH for "auto"."""
    return batch_size if isinstance(batch_size, int) and not isinstance(batch_size, bool) else INFERENCE_BATCH


def count_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def inference_ms(forward, size: int, batch_size: int, device, reps: int = INFERENCE_REPS) -> float:
    """Median milliseconds per image of `forward(x)` on a random [batch, 3, size, size] batch on
    `device` (one warm-up batch first; CUDA synchronised around each timed batch)."""
    import torch

    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(reps + 1):
            sync()
            t = time.perf_counter()
            forward(x)
            sync()
            if i:
                times.append(time.perf_counter() - t)
    times.sort()
    return round(1000 * times[len(times) // 2] / batch_size, 4)
