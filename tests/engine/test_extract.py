"""extract(): codes against an independent reference, the cache, resume, locks, skipped images."""

import dataclasses
import json
import os
import shutil
import threading
import time

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, make_images
from featx.engine.extract import extract
from featx.errors import FeatxError, Interrupted, UsageError
from featx.models.build import load_model
from featx.models.preprocess import Preprocess
from featx.settings import DataOptions
from featx.sources.spec import open_source
from featx.store.cache import EntryLock
from featx.store.codes import open_codes


def _reference(path, model_name, weights, feature_extractor):
    """Codes recomputed independently: the file's preprocessing on its images, an FX feature
    extractor on a freshly loaded model, then the file's activation and pooling per layer."""
    with open_codes(path) as f:
        pre = Preprocess.from_dict(json.loads(f.attrs["preprocessing"]))
        ds = open_source(f.attrs["dataset"])
        order = {ident: i for i, ident in enumerate(ds.ids)}
        rows = [order[p] for p in f.paths]
        batch = torch.stack([pre.to_uint8(ds.load(i)) for i in rows])
        x = pre.normalize(batch)
        model = load_model(model_name, weights, image_size=pre.crop_size, crop_pct=pre.crop_pct).module.eval()
        fx = feature_extractor(model, {n: n for n in f.layers}).eval()
        with torch.no_grad():
            out = fx(x)
        ref, ours = {}, {}
        for name in f.layers:
            a = f.layer_attrs(name)
            r = out[name]
            r = {"relu": F.relu, "relu6": F.relu6, "none": lambda t: t}[a["activation"]](r)
            pool = a["pool"]
            if r.dim() == 4 and pool == "avg":
                r = F.adaptive_avg_pool2d(r, 1)
            elif r.dim() == 4 and pool == "max":
                r = F.adaptive_max_pool2d(r, 1)
            elif r.dim() == 4 and pool.startswith("avg"):
                r = F.adaptive_avg_pool2d(r, int(pool[3:].split("x")[0]))
            ref[name] = r.flatten(1).numpy()
            ours[name] = f.codes(name)
    return ours, ref


@pytest.mark.parametrize("pool", ["avg", "max", "avg2x2", "none"])
def test_torchvision_codes_equal_create_feature_extractor(image_folder, cache_dir, pool):
    from torchvision.models.feature_extraction import create_feature_extractor

    layers = "layer1,layer2.1,layer3,avgpool,fc" if pool != "avg2x2" else "layer1,layer2.1,layer3"
    res = extract("resnet18", str(image_folder), layers, pool=pool, cache_dir=str(cache_dir), **FAST)
    ours, ref = _reference(res.path, "resnet18", "none", create_feature_extractor)
    for name in ours:
        assert ours[name].shape == ref[name].shape
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "model,layers",
    [
        ("timm:resnet18", "layer1,layer3,global_pool"),
        ("efficientnet_lite0", "blocks.2.0,conv_head,bn2,global_pool"),
    ],
)
def test_timm_codes_equal_timm_feature_extractor(image_folder, cache_dir, model, layers):
    from timm.models import create_feature_extractor

    res = extract(model, str(image_folder), layers, cache_dir=str(cache_dir), **FAST)
    ours, ref = _reference(res.path, model, "none", create_feature_extractor)
    with open_codes(res.path) as f:
        acts = {n: f.layer_attrs(n)["activation"] for n in f.layers}
    first = layers.split(",")[0]
    assert acts["global_pool"] == "relu" and acts[first] == ("relu" if model.startswith("timm:") else "none")
    for name in ours:
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_file_layout_is_plain_hdf5(image_folder, cache_dir):
    res = extract("resnet18", str(image_folder), "depth:0.5,layer4", cache_dir=str(cache_dir), **FAST)
    with h5py.File(res.path, "r") as f:
        assert f.attrs["featx_state"] == "complete" and f.attrs["rows"] == 15
        assert set(f) == {"codes", "labels", "classes", "split", "paths", "skipped"}
        assert f["labels"].dtype == np.int64 and f["codes/layer4"].dtype == np.float32
        assert f["codes/layer4"].shape == (15, 512) and f["codes/layer4"].compression == "gzip"
        assert list(f["codes/layer4"].attrs["pre_pool_shape"]) == [512, 1, 1]
        assert f["codes/layer4"].attrs["pool"] == "avg" and bool(f["codes/layer4"].attrs["relu"])
        assert set(f["split"].asstr()[:]) == {"train", "test"}
        assert f["classes"].asstr()[:].tolist() == ["cat", "dog", "owl"]
        assert json.loads(f.attrs["layer_resolution"])["depth:0.5"] in f["codes"]
        for key in (
            "model",
            "weights",
            "weights_sha256",
            "preprocessing",
            "dataset_fingerprint",
            "created",
            "library_versions",
            "featx_version",
            "cache_key",
        ):
            assert key in f.attrs
        json.loads(f.attrs["library_versions"])
        assert f.attrs["preprocessing_text"].startswith("resize shorter side to 37")
    assert res.rows == 15 and not res.hit


def test_float16_codes(image_folder, cache_dir):
    a = extract("resnet18", str(image_folder), "layer3", cache_dir=str(cache_dir), **FAST)
    b = extract("resnet18", str(image_folder), "layer3", dtype="float16", cache_dir=str(cache_dir), **FAST)
    assert a.path != b.path
    with open_codes(a.path) as fa, open_codes(b.path) as fb:
        assert fb.attrs["dtype"] == "float16"
        np.testing.assert_allclose(fb.codes("layer3"), fa.codes("layer3"), rtol=2e-3, atol=2e-3)


def test_cache_hit_and_key(tmp_path, cache_dir):
    data = make_images(tmp_path / "d", per_class=3)
    first = extract("resnet18", str(data), "layer2,layer3", cache_dir=str(cache_dir), **FAST)
    mtime = os.path.getmtime(first.path)
    again = extract("resnet18", str(data), "layer2,layer3", cache_dir=str(cache_dir), **FAST)
    assert again.hit and again.path == first.path and os.path.getmtime(first.path) == mtime
    shutil.rmtree(cache_dir / ".requests")  # without the memo, the key alone finds the entry
    assert extract("resnet18", str(data), "layer3,layer2", cache_dir=str(cache_dir), **FAST).hit
    paths = {first.path}
    variants = [
        dict(layers="layer3"),
        dict(pool="max"),
        dict(image_size=40),
        dict(relu="off"),
        dict(crop_pct=1.0),
    ]
    for v in variants:
        kw = {**FAST, "layers": "layer2,layer3", **v}
        layers = kw.pop("layers")
        r = extract("resnet18", str(data), layers, cache_dir=str(cache_dir), **kw)
        assert not r.hit and r.path not in paths, v
        paths.add(r.path)
    make_images(tmp_path / "d", classes=("cat",), per_class=4, seed=9)  # one more image: a new dataset
    r = extract("resnet18", str(data), "layer2,layer3", cache_dir=str(cache_dir), **FAST)
    assert not r.hit and r.path not in paths


def test_weights_file_content_is_in_the_key(image_folder, cache_dir, tmp_path):
    state = load_model("resnet18", "none").module.state_dict()
    ck = tmp_path / "w.pth"
    torch.save(state, ck)
    kw = {**FAST, "weights": str(ck)}
    a = extract("resnet18", str(image_folder), "layer3", cache_dir=str(cache_dir), **kw)
    state["conv1.weight"] += 1.0
    torch.save(state, ck)
    b = extract("resnet18", str(image_folder), "layer3", cache_dir=str(cache_dir), **kw)
    assert not b.hit and a.path != b.path
    with open_codes(a.path) as fa:
        assert fa.attrs["weights_sha256"] != ""


def test_corrupt_entry_is_rebuilt(image_folder, cache_dir, caplog):
    res = extract("resnet18", str(image_folder), "layer3", cache_dir=str(cache_dir), **FAST)
    with open_codes(res.path) as f:
        good = f.codes("layer3")
    with open(res.path, "r+b") as fh:  # garble the superblock
        fh.write(b"\0" * 64)
    with pytest.raises(FeatxError, match="cannot use this codes file"):
        open_codes(res.path)
    again = extract("resnet18", str(image_folder), "layer3", cache_dir=str(cache_dir), **FAST)
    assert not again.hit and "rebuilding" in caplog.text
    with open_codes(again.path) as f:
        np.testing.assert_array_equal(f.codes("layer3"), good)


class _Interrupting:
    """A loader that behaves like Ctrl-C once it reaches sample `at`."""

    def __init__(self, loader, at):
        self.loader, self.at = loader, at

    def __call__(self, i):
        if i == self.at:
            raise KeyboardInterrupt
        return self.loader(i)


def test_interrupted_run_resumes_to_identical_codes(tmp_path, cache_dir):
    data = make_images(tmp_path / "d", per_class=7)
    ref = extract("resnet18", str(data), "layer1,layer4", cache_dir=str(tmp_path / "ref"), **FAST)
    ds = open_source(str(data))
    broken = dataclasses.replace(ds, loader=_Interrupting(ds.loader, 13))
    with pytest.raises(Interrupted, match="12 of 21 images are kept"):
        extract("resnet18", broken, "layer1,layer4", cache_dir=str(cache_dir), **FAST)
    assert not any(p.suffix == ".h5" for p in cache_dir.iterdir())  # nothing looks complete
    # resuming with another batch size keeps the interrupted run's, so codes stay identical
    res = extract(
        "resnet18", str(data), "layer1,layer4", cache_dir=str(cache_dir), **{**FAST, "batch_size": 5}
    )
    assert res.resumed_from == 12 and not res.hit
    with open_codes(ref.path) as a, open_codes(res.path) as b:
        assert a.paths == b.paths
        np.testing.assert_array_equal(a.labels, b.labels)
        for n in a.layers:
            np.testing.assert_array_equal(a.codes(n), b.codes(n))


def test_workers_give_the_same_codes(image_folder, tmp_path):
    a = extract("resnet18", str(image_folder), "layer2", cache_dir=str(tmp_path / "a"), **FAST)
    b = extract(
        "resnet18", str(image_folder), "layer2", cache_dir=str(tmp_path / "b"), **{**FAST, "workers": 2}
    )
    with open_codes(a.path) as fa, open_codes(b.path) as fb:
        np.testing.assert_array_equal(fa.codes("layer2"), fb.codes("layer2"))


def test_undecodable_images_are_skipped_and_listed(tmp_path, cache_dir):
    data = make_images(tmp_path / "d", per_class=3)
    (data / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    res = extract("resnet18", str(data), "layer2", cache_dir=str(cache_dir), **FAST)
    assert res.rows == 9 and res.samples == 10
    assert res.skipped[0][0] == "dog/broken.jpg" and "cannot decode" in res.skipped[0][1]
    with open_codes(res.path) as f:
        assert "dog/broken.jpg" not in f.paths and f.skipped[0][0] == "dog/broken.jpg"
        assert [f.classes[k] for k in f.labels] == [p.split("/")[0] for p in f.paths]
    with pytest.raises(FeatxError, match="dog/broken.jpg: cannot decode.*--strict"):
        extract("resnet18", str(data), "layer3", cache_dir=str(cache_dir), strict=True, **FAST)


def test_lock_no_wait_and_wait(image_folder, cache_dir):
    from featx.models.plan import resolve
    from featx.settings import ModelSettings

    ds = open_source(str(image_folder))
    plan = resolve(ModelSettings("resnet18", "none", 32), "layer2")
    from featx.store.cache import entry_path

    entry = entry_path(str(cache_dir), ds.name, "resnet18", plan.cache_key("fp32", "pil", ds.fingerprint))
    lock = EntryLock(entry).__enter__()
    try:
        with pytest.raises(FeatxError, match="another featx process.*is writing"):
            extract("resnet18", str(image_folder), "layer2", cache_dir=str(cache_dir), wait=False, **FAST)
        threading.Timer(1.0, lock.__exit__, args=(None, None, None)).start()
        t = time.monotonic()
        res = extract("resnet18", str(image_folder), "layer2", cache_dir=str(cache_dir), **FAST)
        assert time.monotonic() - t >= 0.9 and res.rows == 15
    finally:
        lock.__exit__(None, None, None)


def test_bad_options_fail_before_work(image_folder, cache_dir):
    for kw, msg in [
        (dict(dtype="int8"), "--dtype"),
        (dict(precision="fp8"), "--precision"),
        (dict(pool="sum"), "--pool"),
        (dict(device="tpu"), "--device"),
    ]:
        with pytest.raises(UsageError, match=msg):
            extract("resnet18", str(image_folder), "layer2", cache_dir=str(cache_dir), **{**FAST, **kw})
    with pytest.raises(UsageError, match="unknown layer 'layer9'"):
        extract("resnet18", str(image_folder), "layer9", cache_dir=str(cache_dir), **FAST)
    assert not any(p.suffix in (".h5", ".partial") for p in cache_dir.iterdir())


def test_data_options_change_the_entry(split_folder, cache_dir):
    a = extract("resnet18", str(split_folder), "layer2", cache_dir=str(cache_dir), **FAST)
    b = extract(
        "resnet18",
        str(split_folder),
        "layer2",
        cache_dir=str(cache_dir),
        data_options=DataOptions(per_class_limit=2),
        **FAST,
    )
    assert a.path != b.path and b.rows == 12 and a.rows == 24
