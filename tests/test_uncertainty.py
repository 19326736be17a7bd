"""samed.uncertainty: the maps' defining properties, the automatic pass with a tiny automatic
adapter, and ``samed segment --uncertainty`` (NIfTI on the source grid, summary column)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from samed.uncertainty import (
    case_score,
    disagreement_map,
    entropy_map,
    margin_map,
    rank_slices,
    roc_auc,
)


def _probs(rng, shape, c=3):
    x = rng.random((c, *shape)).astype(np.float32) + 1e-3
    return x / x.sum(0)


def test_disagreement_is_zero_exactly_where_members_agree():
    rng = np.random.default_rng(0)
    a = _probs(rng, (4, 5, 6))
    b = a.copy()
    differ = np.zeros((4, 5, 6), bool)
    differ[1, 2:4, 1:5] = True
    b[:, differ] = _probs(rng, (int(differ.sum()),))
    u = disagreement_map(np.stack([a, b, a]))
    assert u.shape == (4, 5, 6) and u.dtype == np.float32
    assert np.all(u[~differ] == 0.0) and np.all(u[differ] > 0.0)
    assert np.all((u >= 0) & (u <= 1))
    assert not disagreement_map(a[None]).any()  # one member: no disagreement
    one_hot = np.zeros((2, 2, 1), np.float32)
    one_hot[0, 0], one_hot[1, 1] = 1, 1  # members certain of different classes
    assert disagreement_map(one_hot)[0] == pytest.approx(1.0)


def test_entropy_margin_and_scores():
    p = np.zeros((4, 2), np.float32)
    p[0, 0] = 1.0
    p[:, 1] = 0.25
    assert entropy_map(p).tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert margin_map(p).tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="C >= 2"):
        entropy_map(np.ones((1, 3)))
    u = np.zeros((3, 4, 4), np.float32)
    u[2, :2, :2] = 0.5
    u[0, 0, 0] = 0.1
    assert rank_slices(u) == [(2, 2.0), (0, pytest.approx(0.1))]
    lab = np.zeros((3, 4, 4), np.int16)
    lab[2, :2, :] = 1
    assert case_score(u, lab) == pytest.approx(2.1 / 8)
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.5, 0.5], [0, 1]) == 0.5
    assert np.isnan(roc_auc([1, 2], [0, 0]))


@pytest.fixture
def auto_model(make_tiny_model):
    from samed.lora import LoraConfig, apply_lora

    model = make_tiny_model()
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    return model


def test_automatic_uncertainty_matches_the_automatic_pass(auto_model, make_tiny_volume):
    from samed.engine import Session
    from samed.uncertainty import automatic_uncertainty

    vol = make_tiny_volume(z=3)
    ref = Session(auto_model, vol).automatic(postprocess="none")
    for method in ("entropy", "flip"):
        res = automatic_uncertainty(
            Session(auto_model, vol), method, postprocess="none", keep_maps=True
        )
        np.testing.assert_array_equal(res.labels, ref)
        assert res.uncertainty.shape == vol.array.shape
        assert 0 <= res.uncertainty.min() and res.uncertainty.max() <= 1
        assert res.score == pytest.approx(case_score(res.uncertainty, res.labels))
    assert set(res.extra["maps"]) == {"entropy", "margin", "flip", "flip_entropy"}
    with pytest.raises(ValueError, match="method"):
        automatic_uncertainty(Session(auto_model, vol), "dropout")


def test_segment_uncertainty_nifti_on_the_source_grid(tmp_path, make_tiny_model, make_tiny_volume):
    import nibabel as nib

    from samed.batch import segment_batch
    from samed.io import save_nifti
    from samed.lora import LoraConfig, apply_lora, save_adapter

    m = make_tiny_model()
    apply_lora(m, LoraConfig(mode="automatic", num_classes=3))
    adapter = save_adapter(m, tmp_path / "tiny-auto", labels={0: "background", 1: "a", 2: "b"})
    vol = make_tiny_volume(z=3)
    aff = np.array([[0, 0, -2.5, 10.0], [0, 0.8, 0, -5.0], [0.7, 0, 0, 3.0], [0, 0, 0, 1]])
    vol.affine = aff
    (tmp_path / "in").mkdir()
    src = save_nifti(vol.array, vol, tmp_path / "in" / "case1.nii.gz")
    res = segment_batch(
        [src],
        tmp_path / "out",
        adapter=adapter,
        model=make_tiny_model(),
        uncertainty="entropy",
        qc=False,
    )
    row = res.results[0]
    assert row.status == "ok", row.error
    out = nib.load(tmp_path / "out" / "case1" / "uncertainty.nii.gz")
    ref = nib.load(src)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    assert "uncertainty.nii.gz" in row.outputs and row.uncertainty is not None
    with open(tmp_path / "out" / "summary.csv") as f:
        [r] = list(csv.DictReader(f))
    assert float(r["uncertainty"]) == pytest.approx(row.uncertainty, abs=1e-6)
    again = segment_batch(
        [src],
        tmp_path / "out",
        adapter=adapter,
        model=make_tiny_model(),
        uncertainty="entropy",
        qc=False,
    )
    assert again.results[0].status == "skipped"
    assert again.results[0].uncertainty == pytest.approx(row.uncertainty)


def test_propagated_uncertainty_of_a_propagated_object(make_tiny_model, make_tiny_volume):
    """The prompts propagation gave each slice are rebuilt (the recomputed probability gives
    back the propagated masks); the flip map is 0 where its two members agree and on slices
    without the object, on the volume's own (Z, Y, X) grid."""
    from samed.engine import Session
    from samed.uncertainty import propagated_uncertainty

    vol = make_tiny_volume(z=5, y=60, x=70)
    sess = Session(make_tiny_model(), vol, intensity="minmax")
    box = np.array([30.0, 20.0, 59.0, 39.0])
    seed = sess.predict(2, box=box)
    assert seed.any()
    obj = sess.propagate_volume(
        2, seed, box_margin=2.0, min_area=1, min_score=-1e9, max_intensity_shift=None
    )
    res = propagated_uncertainty(
        sess, obj, seeds=2, method="flip", prompts={2: {"box": box}}, keep_maps=True
    )
    assert res.uncertainty.shape == vol.array.shape and res.uncertainty.dtype == np.float32
    on = obj.any((1, 2))
    assert on.sum() >= 3  # propagated beyond the seed
    np.testing.assert_array_equal(res.extra["probability"][on] > 0.5, obj[on])
    assert not res.uncertainty[~on].any()
    members = res.extra["members"]
    agree = (members[0] == members[1]) & on[:, None, None]
    assert np.all(res.uncertainty[agree] == 0.0) and res.uncertainty[on].max() > 0
    split = ((members[0] > 0.5) != (members[1] > 0.5)) & on[:, None, None]
    assert np.all(res.uncertainty[split] > 0)
    assert np.all((res.uncertainty >= 0) & (res.uncertainty <= 1))
    assert res.labels.tolist() == obj.astype(np.int16).tolist() and res.score >= 0
    # entropy: the binary entropy of the recomputed probability; max_step_px zeroes the map
    # outside the previous slice's mask grown by that many pixels
    ent = propagated_uncertainty(sess, obj, 2, "entropy", prompts={2: {"box": box}})
    np.testing.assert_allclose(ent.uncertainty[on], res.extra["maps"]["entropy"][on])
    cut = propagated_uncertainty(sess, obj, 2, "entropy", max_step_px=1)
    for z in (0, 1, 3, 4):
        if on[z]:
            prev = _grow(obj[z + 1 if z < 2 else z - 1], 1)
            assert not cut.uncertainty[z][~prev].any()
    with pytest.raises(ValueError, match="seed"):
        propagated_uncertainty(sess, obj, seeds=[], prompts=None)


def _grow(mask, px):
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=px)
