"""The shipped click-aware adapter (issue #17): listed, loads strictly on the bundled model, leaves
the encoder (and so the embedding cache) as it is, small, and its decoder follows a corrective
click on a held-out cardiac slice at least as well as the base decoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from realdata import shared_path

from samed.engine import Session, mask_bbox
from samed.io import load_label_map, load_volume
from samed.lora import load_adapter, remove_adapter
from samed.model import build_model
from samed.registry import find_adapters, resolve_adapter

pytestmark = pytest.mark.slow  # the real LiteMedSAM

NAME = "click-aware-litemedsam"


@pytest.fixture(scope="module")
def lite():
    return build_model("litemedsam", device="cpu")


def test_click_adapter_is_listed_loads_strictly_and_keeps_the_embedding_cache(lite):
    info = {a.name: a for a in find_adapters()}[NAME]
    assert info.mode == "prompted" and info.base_model == "litemedsam"
    folder = resolve_adapter(NAME)
    assert (folder / "adapter_model.safetensors").stat().st_size < 2_000_000
    meta = json.loads((folder / "metadata.json").read_text())
    assert info.interactive_default == (meta.get("interactive_default") is True)
    vol = load_volume(shared_path("acdc/imagesTr/patient028_frame01.nii.gz"))
    s = Session(lite, vol)
    key = s.cache_key
    base_emb = s.embedding(3).clone()
    load_adapter(lite, folder)  # base kind + SHA-256 + strict keys/shapes + finite weights
    try:
        assert lite.adapter_name == NAME and lite.adapter.targets == ()
        assert s.cache_key == key and s.is_embedded(3)
        s2 = Session(lite, vol)
        np.testing.assert_array_equal(s2.embedding(3).numpy(), base_emb.numpy())
    finally:
        remove_adapter(lite)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_click_adapter_follows_a_corrective_click_on_a_held_out_slice(lite):
    """ACDC val patient028 (never trained on): box + one click at the centre of the error, as
    refine_slice asks the decoder (box, points, previous logits); summed over RV, MYO, LV on the
    middle slice."""
    from samed.train.interactive import _centre

    vol = load_volume(shared_path("acdc/imagesTr/patient028_frame01.nii.gz"))
    gt = load_label_map(shared_path("acdc/labelsTr/patient028_frame01.nii.gz")).array
    z = int(np.argmax((gt == 2).sum((1, 2))))

    def run() -> float:
        s = Session(lite, vol)
        total = 0.0
        for c in (1, 2, 3):
            truth = gt[z] == c
            box = mask_bbox(truth, 4)
            first = s.predict_full(z, box=box)
            err = first.mask ^ truth
            x, y = _centre(err)
            p = s.predict_full(
                z,
                box=box,
                points=[[x, y]],
                point_labels=[int(truth[y, x])],
                mask_input=first.low_res_logits,
            )
            total += _dice(p.mask, truth)
        return total / 3

    base = run()
    load_adapter(lite, resolve_adapter(NAME))
    try:
        tuned = run()
    finally:
        remove_adapter(lite)
    assert tuned >= base - 0.01, (base, tuned)
