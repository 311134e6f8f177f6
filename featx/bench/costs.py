"""The backbone's share of each probe row's cost, measured once per (model, layer) of a bench and kept
in costs.jsonl beside the cells.

Every probe row gets `featx.engine.cost.COST_FIELDS` (featx.classifiers.cost says what each means):
its classifier's parameters and fit seconds come with the cell; the backbone's parameters up to the
layer and the forward pass to it (`featx.engine.layer_cost.entry_costs`, timed on the bench's device
at `inference_batch(--batch-size)`) are measured here, after the cells, once per (architecture, crop
size, layer, device, batch size): a random-init control shares its model's measurement, two datasets
at the same image size share one, the raw-pixel baseline is measured as its own "model" (no
parameters; its forward is the identity). A record is appended (fsync'ed) as it is measured, so a
resumed or rerun bench reuses it and writes the same results. A layer that cannot be measured (an
architecture this machine cannot build) is left empty, named in the report's notes, and tried again
on the next run.
"""

from __future__ import annotations

from featx.bench.config import BenchConfig
from featx.bench.grid import Source
from featx.engine.autotune import device_name
from featx.engine.compute import resolve_device
from featx.engine.cost import inference_batch
from featx.engine.layer_cost import LayerCost
from featx.files import append_record, load_done, open_log
from featx.store.cache import digest
from featx.store.codes import CodesFile

COSTS_FILE = "costs.jsonl"


def layer_costs(
    config: BenchConfig, sources: list[Source]
) -> tuple[dict[tuple[str, str], LayerCost], list[str]]:
    """({(codes path, layer): LayerCost} for every probe entry of the bench, notes on what could not be
    measured); measured where costs.jsonl lacks them."""
    from featx.engine.layer_cost import entry_costs

    done = load_done(config.out, COSTS_FILE)
    batch = inference_batch(config.run.batch_size)
    device = device_name(resolve_device(config.run.device))
    entries: dict[str, list[str]] = {}
    for src in sources:
        entries.setdefault(src.codes, []).extend(src.layers)
        if src.pixels:
            entries.setdefault(src.pixels, []).append("pixels")
    out, notes = {}, []
    with open_log(config.out, COSTS_FILE) as fh:
        for path, layers in entries.items():
            with CodesFile(path) as f:
                arch = {"model": f.meta.model, "preprocessing": f.meta.preprocessing, "pool": f.meta.pool}
            keys = {
                n: digest({"cost": 1, **arch, "layer": n, "device": device, "batch": batch}) for n in layers
            }
            todo = [n for n in dict.fromkeys(layers) if keys[n] not in done]
            if todo:
                for n, cost in entry_costs(path, todo, config.run.device, batch).items():
                    if cost.note:
                        notes.append(f"inference cost of {arch['model']} {n}: not measured ({cost.note})")
                        continue
                    rec = {
                        k: getattr(cost, k)
                        for k in ("backbone_params", "inference_ms_per_image", "inference_batch_size")
                    }
                    append_record(fh, {"key": keys[n], "result": rec})
                    done[keys[n]] = rec
            for n in layers:
                out[(path, n)] = LayerCost(**done[keys[n]]) if keys[n] in done else LayerCost()
    return out, list(dict.fromkeys(notes))
