"""intensity="auto" knows a CT when it sees one (issue #13): DICOM modality, then the values;
an adapter's recorded preprocessing wins; the Session records what it applied and why.

Real slices: BTCV (window-clipped HU, min -125), CHAOS T2 (int16 0..~1300), TotalSegmentator CT
(real HU) and MR, ACDC ([0, 1]).
"""

from __future__ import annotations

import numpy as np
import pytest
from realdata import shared_path

from samed.intensity import decide_intensity, looks_like_ct


def _slab(*parts: str, z: slice | None = None) -> np.ndarray:
    from samed.io import load_volume

    vol = load_volume(shared_path(*parts))
    a = np.asarray(vol.array)
    return a if z is None else a[z]


def test_window_clipped_btcv_is_ct():
    for case in ("btcv_0034", "btcv_0005"):
        a = _slab("btcv", "imagesTr", f"{case}.nii.gz", z=slice(30, 50))
        assert a.min() == pytest.approx(-125.0, abs=0.01)  # no air below -500: the old rule failed
        ct, why = looks_like_ct(a)
        assert ct, why
        spec, reason = decide_intensity(a)
        assert spec.name == "ct:abdomen" and "window-clipped" in reason


def test_real_hu_ct_is_ct():
    a = _slab("totalsegmentator", "ct_3mm", "example_ct.nii.gz")
    spec, reason = decide_intensity(a)
    assert spec.name == "ct:abdomen" and "-500" in reason


@pytest.mark.parametrize(
    "parts",
    [
        ("chaos_t2", "imagesTr", "chaos_t2_01.nii.gz"),
        ("chaos_t2", "imagesTr", "chaos_t2_10.nii.gz"),
        ("totalsegmentator", "mr_3mm", "example_mr_sm.nii.gz"),
    ],
)
def test_mr_is_not_ct(parts):
    a = _slab(*parts)
    assert not looks_like_ct(a)[0]
    spec, reason = decide_intensity(a)
    assert spec.name == "percentile:0.5:99.5", reason
    # z-scored MR (negative values, a few units wide) is not CT either
    z = (a - a.mean()) / a.std()
    assert not looks_like_ct(z)[0]
    assert decide_intensity(z)[0].kind == "percentile"


def test_acdc_unit_range_is_left_unchanged():
    a = _slab("acdc", "imagesTr", "patient002_frame01.nii.gz")
    spec, reason = decide_intensity(a)
    assert spec.name == "minmax" and "[0, 1]" in reason


def test_dicom_modality_decides_before_the_values():
    ct_values = _slab("btcv", "imagesTr", "btcv_0034.nii.gz", z=slice(30, 40))
    assert decide_intensity(ct_values, "MR")[0].kind == "percentile"
    mr = _slab("chaos_t2", "imagesTr", "chaos_t2_01.nii.gz")
    assert decide_intensity(mr, "CT")[0].name == "ct:abdomen"
    assert "modality CT" in decide_intensity(mr, "CT")[1]


def test_a_negative_floor_without_hu_statistics_is_not_ct():
    rng = np.random.default_rng(0)
    # uniform values in [-100, 900]: a floor, but almost nothing sits on it
    a = rng.uniform(-100, 900, (4, 32, 32)).astype(np.float32)
    assert not looks_like_ct(a)[0]


def _adapter(tmp_path, model, intensity, spacing=None):
    from samed.lora import LoraConfig, apply_lora, load_adapter, save_adapter

    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    pre = {"intensity": intensity, "modality": "CT"}
    if spacing is not None:
        pre["spacing"] = spacing
    folder = save_adapter(
        model,
        tmp_path / "ad",
        labels={0: "background", 1: "a", 2: "b"},
        metadata={"preprocessing": pre},
    )
    from samed.lora import remove_adapter

    remove_adapter(model)
    return load_adapter(model, folder)


def test_session_records_the_decision_and_the_adapter_wins(tmp_path, make_tiny_model):
    from samed.engine import Session

    a = _slab("btcv", "imagesTr", "btcv_0034.nii.gz", z=slice(40, 42))
    plain = Session(make_tiny_model(), a)
    assert plain.intensity_name == "ct:abdomen"
    rec = plain.preprocessing
    assert rec["intensity_source"] == "auto" and "window-clipped" in rec["reason"]
    assert rec["resampling"].startswith("none")

    model = _adapter(tmp_path, make_tiny_model(), ["window", -125, 275], spacing=1.5)
    assert model.adapter.spacing == (1.5, 1.5)
    sess = Session(model, a)
    assert sess.intensity_name == "window:-125:275"
    assert sess.preprocessing["intensity_source"] == "adapter"
    np.testing.assert_allclose(sess.image, np.clip((a + 125) / 400, 0, 1), atol=1e-6)
    # an explicit argument is used as given and recorded as such
    explicit = Session(model, a, intensity="liver")
    assert explicit.intensity_name == "ct:liver"
    assert explicit.preprocessing["intensity_source"] == "argument"


def test_a_bad_recorded_intensity_is_named(tmp_path, make_tiny_model):
    from samed.engine import Session

    model = _adapter(tmp_path, make_tiny_model(), "not-a-window")
    with pytest.raises(ValueError, match="records preprocessing.intensity 'not-a-window'"):
        Session(model, np.zeros((1, 8, 8), np.float32))
