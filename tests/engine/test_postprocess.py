"""Largest-connected-component clean-up of automatic label maps, and adapters recommending it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samed.engine import Session
from samed.lora import (
    AdapterError,
    LoraConfig,
    apply_lora,
    load_adapter,
    remove_adapter,
    save_adapter,
)
from samed.postprocess import apply_postprocessing, keep_largest_component


def _islands() -> np.ndarray:
    lab = np.zeros((6, 20, 20), np.int16)
    lab[1:5, 2:10, 2:10] = 1  # class 1: big block
    lab[0, 15:17, 15:17] = 1  # class 1: island (removed)
    lab[2:4, 12:18, 12:18] = 2  # class 2: block
    lab[5, 0:2, 18:20] = 2  # class 2: island (removed)
    lab[3, 10, 10] = 3  # class 3: a single voxel, its own largest component (kept)
    return lab


def test_each_class_keeps_only_its_largest_3d_component():
    lab = _islands()
    out = keep_largest_component(lab)
    assert out.dtype == lab.dtype and out.shape == lab.shape
    assert out[0, 15:17, 15:17].sum() == 0 and out[5, 0:2, 18:20].sum() == 0
    assert (out == 1).sum() == 4 * 8 * 8 and (out == 2).sum() == 2 * 6 * 6 and (out == 3).sum() == 1
    assert lab[0, 15, 15] == 1  # input untouched


def test_only_the_listed_classes_are_cleaned():
    lab = _islands()
    out = keep_largest_component(lab, [2])
    assert out[0, 15, 15] == 1 and out[5, 0, 18] == 0


def test_connectivity_decides_what_touches():
    lab = np.zeros((1, 5, 5), np.int16)
    lab[0, 0:2, 0:2] = 1
    lab[0, 2, 2] = 1  # touches only by a corner
    assert (keep_largest_component(lab, connectivity=1) == 1).sum() == 4
    assert (keep_largest_component(lab) == 1).sum() == 5


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="integer label map"):
        keep_largest_component(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="connectivity"):
        keep_largest_component(np.zeros((2, 3, 3), np.int16), connectivity=4)
    with pytest.raises(ValueError, match="postprocess"):
        apply_postprocessing(np.zeros((2, 3, 3), np.int16), "biggest")


def _automatic_adapter(tmp_path, post: object, make_tiny_model) -> object:
    torch.manual_seed(0)
    m = apply_lora(make_tiny_model("tinyvit"), LoraConfig(mode="automatic", num_classes=3))
    meta = {"description": "test"} if post is None else {"postprocessing": post}
    return save_adapter(
        m, tmp_path / "auto", labels={0: "background", 1: "a", 2: "b"}, metadata=meta
    )


def test_adapter_recommendation_is_loaded_and_applied_by_automatic(tmp_path, make_tiny_model):
    folder = _automatic_adapter(
        tmp_path, {"largest_component": [1, 2], "note": "val +0.01"}, make_tiny_model
    )
    m = load_adapter(make_tiny_model("tinyvit"), folder)
    assert m.adapter_postprocessing["largest_component"] == [1, 2]
    vol = np.random.default_rng(3).random((4, 40, 48)).astype(np.float32)
    s = Session(m, vol, intensity="minmax")
    raw = s.automatic(postprocess="none")
    cleaned = s.automatic()
    assert np.array_equal(cleaned, keep_largest_component(raw, [1, 2]))
    remove_adapter(m)
    assert m.adapter_postprocessing == {}


def test_adapter_without_recommendation_gives_the_raw_argmax(tmp_path, make_tiny_model):
    folder = _automatic_adapter(tmp_path, None, make_tiny_model)
    m = load_adapter(make_tiny_model("tinyvit"), folder)
    assert m.adapter_postprocessing == {}
    vol = np.random.default_rng(4).random((3, 40, 48)).astype(np.float32)
    s = Session(m, vol, intensity="minmax")
    assert np.array_equal(s.automatic(), s.automatic(postprocess="none"))


def test_a_malformed_recommendation_is_refused(tmp_path, make_tiny_model):
    folder = _automatic_adapter(tmp_path, {"largest_component": "yes"}, make_tiny_model)
    with pytest.raises(AdapterError, match="postprocessing"):
        load_adapter(make_tiny_model("tinyvit"), folder)
    (folder / "metadata.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(make_tiny_model("tinyvit"), folder)
    (folder / "metadata.json").write_text(json.dumps({"postprocessing": None}))
    assert load_adapter(make_tiny_model("tinyvit"), folder).adapter_postprocessing == {}


def test_choose_largest_component_class_by_class_on_validation_volumes():
    from samed.postprocess import choose_largest_component

    names = {1: "a", 2: "b", 3: "c"}
    pred = _islands()
    gt = keep_largest_component(pred)  # the islands are errors: cleaning helps classes 1 and 2
    rec = choose_largest_component([(pred, gt)], names)
    assert rec["largest_component"] == [1, 2]  # class 3 unchanged by it: left alone
    [m] = rec["measured"].values()
    assert m["largest_component"]["a"] == 1.0 > m["none"]["a"]
    assert m["chosen"]["mean"] == 1.0 and m["none"]["mean"] < 1.0
    assert apply_postprocessing(pred, rec).tolist() == gt.tolist()  # a valid spec
    # a structure in two pieces in the ground truth: keeping one piece lowers Dice -> no clean-up
    two = np.zeros((6, 20, 20), np.int16)
    two[0:2, 2:8, 2:8] = 1
    two[4:6, 12:18, 12:18] = 1
    rec = choose_largest_component([(two, two), (gt, gt)], names)
    assert rec["largest_component"] is False and "No clean-up" in rec["note"]
    with pytest.raises(ValueError, match="at least one"):
        choose_largest_component([], names)
