"""Typed metadata of a codes file (featx.store.meta.FileMeta / LayerMeta): written in one place, read
in one place, and the plain-h5py layout of docs/files.md unchanged."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import FAST, write_codes
from featx.engine.extract import extract
from featx.errors import FeatxError
from featx.store.codes import open_codes
from featx.store.meta import FORMAT_VERSION, FileMeta, LayerMeta

# docs/files.md, "HDF5 layout": every root attribute extraction writes, plus what finalize adds
ROOT_ATTRS = {
    "featx_version",
    "format_version",
    "cache_key",
    "model",
    "weights",
    "weights_source",
    "weights_ident",
    "weights_sha256",
    "preprocessing",
    "preprocessing_text",
    "image_size",
    "dataset",
    "dataset_name",
    "dataset_fingerprint",
    "split_source",
    "data_options",
    "created",
    "library_versions",
    "layers",
    "layer_resolution",
    "pool",
    "relu",
    "dtype",
    "precision",
    "device",
    "batch_size",
    "workers",
    "channels_last",
    "compile",
    "decoder",
    "samples",
    "config",
    "rows",
    "rows_sha256",
    "featx_state",
}
LAYER_ATTRS = {
    "pre_pool_shape",
    "pool",
    "relu",
    "activation",
    "post_act",
    "next_act",
    "code_dim",
    "stride",
    "depth",
    "kind",
    "sha256",
}


def test_layout_read_with_plain_h5py_is_unchanged(image_folder, cache_dir):
    res = extract(
        "resnet18", str(image_folder), "layer2,avgpool", cache_dir=str(cache_dir), relu="off", **FAST
    )
    with h5py.File(res.path, "r") as f:
        assert set(f.attrs) == ROOT_ATTRS
        assert f.attrs["relu"] == "off" and f.attrs["format_version"] == FORMAT_VERSION == 1
        assert isinstance(f.attrs["preprocessing"], str) and list(f.attrs["layers"]) == ["layer2", "avgpool"]
        layer = f["codes"]["layer2"].attrs
        assert set(layer) == LAYER_ATTRS
        assert layer["activation"] == "none" and bool(layer["relu"]) is True  # layer2 is post-ReLU already
        assert list(layer["pre_pool_shape"]) == [128, 4, 4] and layer["code_dim"] == 128
    with open_codes(res.path) as f:
        m = f.meta
        assert m.relu_mode == "off" and m.layers == ("layer2", "avgpool") and m.precision == "fp32"
        assert m.preprocessing["crop_size"] == 32 and m.config["pool"] == "avg" and not m.unparsed
        lm = f.layer_meta("layer2")
        assert lm == LayerMeta.from_attrs(f.layer_attrs("layer2")) and lm.pre_pool_shape == (128, 4, 4)


def test_file_meta_round_trips_through_attrs():
    m = FileMeta(
        model="resnet18",
        weights="none",
        layers=("a", "b"),
        preprocessing={"crop_size": 32},
        relu_mode="auto",
        batch_size=4,
        channels_last=True,
    )
    attrs = m.to_attrs()
    assert attrs["relu"] == "auto" and "relu_mode" not in attrs and isinstance(attrs["preprocessing"], str)
    assert FileMeta.from_attrs(attrs) == m


def test_older_or_hostile_files_read_with_defaults(tmp_path):
    path = write_codes(tmp_path / "x.h5", {"a": np.zeros((4, 2))}, [0, 1, 0, 1], ["train"] * 4, ["p", "q"])
    with h5py.File(path, "r+") as f:
        f.attrs["config"] = "{not json"
    with open_codes(path) as f:
        m = f.meta
        assert m.format_version == 1 and m.cache_key is None and m.unparsed == ("config",)
        assert f.layer_meta("a").depth == 0.0 and f.layer_meta("a").activation == "none"
        with pytest.raises(FeatxError, match="'config' is not valid JSON"):
            m.parsed("config", f.path)
