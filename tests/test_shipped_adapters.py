"""The adapters shipped in adapters/ load on the bundled model and do their job on real slices."""

from __future__ import annotations

import numpy as np
import pytest
from realdata import shared_path

from samed.engine import Session
from samed.io import load_label_map, load_volume
from samed.lora import load_adapter, remove_adapter
from samed.model import build_model
from samed.registry import find_adapters, resolve_adapter

pytestmark = pytest.mark.slow  # the real LiteMedSAM with each shipped adapter

SHIPPED = ("acdc-cardiac-mri", "acdc-cardiac-mri-prompted", "abdomen-ct", "abdomen-mri")


@pytest.fixture(scope="module")
def lite():
    return build_model("litemedsam", device="cpu")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_shipped_adapters_are_listed_and_load_strictly(lite):
    names = {a.name for a in find_adapters()}
    assert set(SHIPPED) <= names
    for name in SHIPPED:
        load_adapter(lite, resolve_adapter(name))  # base kind + SHA-256 + strict keys/shapes
        assert lite.adapter_name == name and lite.adapter_digest
        labels = lite.adapter_labels
        if lite.lora_config.mode == "automatic":
            assert lite.num_mask_outputs == len(labels) and labels[0] == "background"
    remove_adapter(lite)
    assert lite.adapter_name is None


def _acdc_case():
    img = shared_path("acdc/imagesTr/patient028_frame01.nii.gz")
    vol = load_volume(img)
    gt = np.asarray(
        load_label_map(shared_path("acdc/labelsTr/patient028_frame01.nii.gz"), reference=vol).array
    )
    # three slices where RV, MYO and LV are all present (val patient, never trained on)
    full = [z for z in range(gt.shape[0]) if all((gt[z] == c).any() for c in (1, 2, 3))]
    return vol, gt.astype(np.int64), full[len(full) // 2 - 1 : len(full) // 2 + 2]


def test_automatic_acdc_adapter_segments_held_out_slices(lite):
    vol, gt, zs = _acdc_case()
    load_adapter(lite, resolve_adapter("acdc-cardiac-mri"))
    try:
        assert lite.adapter_postprocessing["largest_component"] == [1, 2, 3]
        lab = Session(lite, vol, intensity="auto").automatic(slices=zs, postprocess="none")
    finally:
        remove_adapter(lite)
    dice = {c: _dice(lab[zs] == c, gt[zs] == c) for c in (1, 2, 3)}
    # measured 2026-11-23 on these slices: RV 0.937, MYO 0.916, LV 0.955
    assert min(dice.values()) > 0.75, dice


def test_prompted_acdc_adapter_lifts_the_myocardium(lite):
    vol, gt, zs = _acdc_case()
    z = zs[1]
    from samed.engine import mask_bbox

    box = mask_bbox(gt[z] == 2, 0)
    base = Session(lite, vol, intensity="auto").predict(z, box=box)
    load_adapter(lite, resolve_adapter("acdc-cardiac-mri-prompted"))
    try:
        tuned = Session(lite, vol, intensity="auto").predict(z, box=box)
    finally:
        remove_adapter(lite)
    d_base, d_tuned = _dice(base, gt[z] == 2), _dice(tuned, gt[z] == 2)
    # measured 2026-11-23: zero-shot 0.060 (it fills the box around the ring), adapter 0.866
    assert d_tuned > 0.7 and d_tuned > d_base + 0.2, (d_base, d_tuned)


def test_abdomen_ct_adapter_segments_a_held_out_btcv_case(lite):
    """Issue #13: the BTCV-trained adapter (window, 1.5 mm canvas and back) on val slices."""
    vol = load_volume(shared_path("btcv/imagesTr/btcv_0037.nii.gz"))  # val: never trained on
    gt = np.asarray(
        load_label_map(shared_path("btcv/labelsTr/btcv_0037.nii.gz"), reference=vol).array
    )
    liver = [z for z in range(gt.shape[0]) if (gt[z] == 6).sum() > 2000]
    zs = liver[len(liver) // 2 - 1 : len(liver) // 2 + 2]
    load_adapter(lite, resolve_adapter("abdomen-ct"))
    try:
        assert lite.adapter.spacing == (1.5, 1.5)
        sess = Session(lite, vol)
        assert sess.preprocessing["intensity_source"] == "adapter"
        assert sess.intensity_name == "window:-125:275"
        lab = sess.automatic(slices=zs, postprocess="none")
    finally:
        remove_adapter(lite)
    assert lab.shape == vol.shape
    d = _dice(lab[zs] == 6, gt[zs] == 6)
    # measured 2026-12-01 on these slices: see the assertion message (0.78 over every 8th slice of the case)
    assert d > 0.6, d


def test_abdomen_mri_adapter_segments_a_held_out_chaos_case(lite):
    """Issue #13: the CHAOS-trained adapter (percentiles, 1.5 mm canvas, LAS) on val slices."""
    vol = load_volume(shared_path("chaos_t2/imagesTr/chaos_t2_01.nii.gz"))  # val: never trained on
    gt = np.asarray(
        load_label_map(shared_path("chaos_t2/labelsTr/chaos_t2_01.nii.gz"), reference=vol).array
    )
    kid = [z for z in range(gt.shape[0]) if (gt[z] == 2).sum() > 300 and (gt[z] == 3).sum() > 300]
    zs = kid[len(kid) // 2 - 1 : len(kid) // 2 + 1]
    load_adapter(lite, resolve_adapter("abdomen-mri"))
    try:
        assert lite.adapter.spacing == (1.5, 1.5) and lite.adapter.orientation == "LAS"
        sess = Session(lite, vol)
        assert sess.preprocessing["intensity_source"] == "adapter"
        assert sess.intensity_name == "percentile:0.5:99.5"
        lab = sess.automatic(slices=zs, postprocess="adapter")
    finally:
        remove_adapter(lite)
    d = {k: _dice(lab[zs] == k, gt[zs] == k) for k in (1, 2, 3)}
    # whole val volumes (samed evaluate): liver 0.76, kidneys 0.82 / 0.81 (metadata metrics)
    assert min(d.values()) > 0.6, d
