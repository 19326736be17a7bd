"""configs/abdomen-mri.yaml: the fixed CHAOS split and MR intensity that ignores a scanner's scale."""

from __future__ import annotations

import numpy as np
from realdata import REPO, shared_path

from samed.engine.preprocess import resolve_intensity
from samed.evaluate.data import dataset_from_config
from samed.io import load_volume
from samed.train.config import load_config


def test_val_cases_are_the_interactive_benchmarks_held_out_ones_and_never_train():
    shared_path("chaos_t2")
    cfg = load_config(REPO / "configs" / "abdomen-mri.yaml")
    splits = {c["id"]: c["split"] for c in cfg.data.cases}
    assert [k for k, v in splits.items() if v == "val"] == [f"chaos_t2_0{i}" for i in (1, 2, 3)]
    assert len([v for v in splits.values() if v == "train"]) == 7
    assert cfg.data.val_split is None and cfg.data.train_split == "train"
    assert cfg.augment.flip_prob == 0.0  # a flip would swap the kidneys' sides
    ds = dataset_from_config(REPO / "configs" / "abdomen-mri.yaml")
    assert ds.labels == {
        0: "background",
        1: "liver",
        2: "kidney_right",
        3: "kidney_left",
        4: "spleen",
    }


def test_percentile_intensity_gives_the_same_input_whatever_the_scanners_scale():
    vol = load_volume(shared_path("chaos_t2/imagesTr/chaos_t2_05.nii.gz"))
    cfg = load_config(REPO / "configs" / "abdomen-mri.yaml")
    a = vol.array.astype(np.float32)
    _, fn = resolve_intensity(cfg.data.intensity, a, "MR")
    ref = fn(a)
    for scale, offset in ((0.37, 0.0), (4.0, 250.0)):  # another scanner's units and offset
        other = a * scale + offset
        _, fn2 = resolve_intensity(cfg.data.intensity, other, "MR")
        assert np.allclose(fn2(other), ref, atol=1e-4)
    assert ref.min() == 0.0 and ref.max() == 1.0
