"""Orientation reaches every automatic path (issue #13): an explicit ``Session(orientation=)``
(the plugin's), the uncertainty pass (same labels as ``Session.automatic`` through the canvas
and the flips) and the left/right pair rule (the volume's x code says which side is right)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samed.engine import Session
from samed.io import Volume

PAIRS = {"lateral_pairs": [[1, 2]]}


def _adapter(make_tiny_model, tmp_path):
    """A tiny automatic adapter trained "on LAS at 1.5 mm" (recorded), classes 1 / 2 a pair."""
    from samed.lora import LoraConfig, apply_lora, load_adapter, remove_adapter, save_adapter

    model = make_tiny_model("tinyvit", seed=3)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    torch.manual_seed(1)
    with torch.no_grad():  # a decoder that is not all-background somewhere
        for p in model.mask_decoder.output_hypernetworks_mlps.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    pre = {"intensity": "minmax", "spacing": 1.5, "orientation": "LAS"}
    folder = save_adapter(
        model,
        tmp_path / "ad",
        labels={0: "background", 1: "right", 2: "left"},
        metadata={"preprocessing": pre, "postprocessing": PAIRS},
    )
    remove_adapter(model)
    return load_adapter(model, folder)


def _volume(codes: str) -> Volume:
    """A 2 x 120 x 140 volume at 1.2 mm, an off-centre bright block, stored with x axis code
    ``codes[0]`` (``"L"``: the affine's x column negated, as BTCV; ``"R"``: as
    TotalSegmentator's RAS CT)."""
    rng = np.random.default_rng(0)
    v = rng.normal(0.3, 0.05, (2, 120, 140)).astype(np.float32)
    v[:, 30:80, 20:70] += 0.5
    affine = np.diag([1.2, 1.2, 2.5, 1.0])
    if codes[0] == "L":
        affine[0, 0] = -1.2  # x grows toward the patient's left on LAS, right on RAS
    return Volume(np.clip(v, 0, 1), affine)


def test_explicit_orientation_is_the_affines(make_tiny_model, tmp_path):
    model = _adapter(make_tiny_model, tmp_path)
    ras = _volume("RAS")
    assert ras.orientation == "RAS"
    from_affine = Session(model, ras)
    given = Session(model, ras.array, spacing=(1.2, 1.2), orientation="ras")
    assert given.orientation == from_affine.orientation == "RAS"
    assert "columns flipped" in given.preprocessing["reorientation"]
    out = from_affine.automatic(postprocess="none")
    np.testing.assert_array_equal(given.automatic(postprocess="none"), out)
    unknown = Session(model, ras.array, spacing=(1.2, 1.2)).automatic(postprocess="none")
    assert not np.array_equal(unknown, out)  # without it: no flip, another result
    with pytest.raises(ValueError, match="three axis codes"):
        Session(model, ras.array, orientation="RA")


@pytest.mark.parametrize("method", ["entropy", "flip"])
def test_uncertainty_labels_are_the_automatic_ones(make_tiny_model, tmp_path, method):
    from samed.uncertainty import automatic_uncertainty

    model = _adapter(make_tiny_model, tmp_path)
    vol = _volume("RAS")
    for pp in ("none", "adapter"):
        ref = Session(model, vol).automatic(postprocess=pp)
        res = automatic_uncertainty(Session(model, vol), method, postprocess=pp)
        np.testing.assert_array_equal(res.labels, ref)
        assert res.uncertainty.shape == vol.array.shape
        assert 0 <= res.uncertainty.min() and res.uncertainty.max() <= 1
    # the native grid (no canvas, no flip) would have given something else
    native = Session(model, vol.array).automatic(postprocess="none")
    assert not np.array_equal(native, Session(model, vol).automatic(postprocess="none"))


def test_pair_rule_follows_the_volumes_orientation(make_tiny_model, tmp_path):
    model = _adapter(make_tiny_model, tmp_path)
    labels = np.zeros((2, 120, 140), np.int16)
    labels[:, 40:60, 10:40] = 2  # low x (left of the image)
    labels[:, 40:60, 100:130] = 2  # high x
    las, ras = Session(model, _volume("LAS")), Session(model, _volume("RAS"))
    a, b = las.postprocess(labels, "adapter"), ras.postprocess(labels, "adapter")
    # LAS: x grows toward the patient's left, so low x is the patient's right (class 1)
    assert (a[:, 40:60, 10:40] == 1).all() and (a[:, 40:60, 100:130] == 2).all()
    # RAS: the other way round
    assert (b[:, 40:60, 10:40] == 2).all() and (b[:, 40:60, 100:130] == 1).all()
