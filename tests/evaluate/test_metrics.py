"""The one Dice and its empty-mask rule, per-volume scores, evaluation options and reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from samed.evaluate import EvalOptions, EvalReport, dice, score_case


def test_dice_values_and_empty_ground_truth_rule() -> None:
    gt = np.zeros((2, 6, 6), bool)
    gt[0, 1:4, 1:4] = True  # 9 voxels
    pred = np.zeros_like(gt)
    pred[0, 1:4, 1:3] = True  # 6 voxels inside
    pred[1, 0, 0] = True  # 1 voxel outside
    assert dice(pred, gt) == pytest.approx(2 * 6 / (7 + 9))
    assert dice(gt, gt) == 1.0
    assert dice(np.zeros_like(gt), gt) == 0.0
    # a structure absent from the ground truth is not scored, whatever is predicted
    assert math.isnan(dice(pred, np.zeros_like(gt)))
    assert math.isnan(dice(np.zeros_like(gt), np.zeros_like(gt)))
    # label maps work as masks (nonzero = foreground)
    assert dice(pred.astype(np.uint8) * 3, gt.astype(np.int64)) == pytest.approx(0.75)


def test_dice_refuses_different_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_score_case_uses_the_same_dice_and_skips_absent_classes() -> None:
    gt = np.zeros((3, 16, 16), np.int64)
    gt[:, 2:8, 2:8] = 1
    gt[1, 10:14, 10:14] = 2
    pred = gt.copy()
    pred[:, 2:8, 7] = 0  # class 1: one column lost
    pred[0, 12:14, 0:2] = 3  # class 3 only predicted
    labels = {0: "bg", 1: "a", 2: "b", 3: "c", 4: "d"}
    s = score_case(pred, gt, labels)
    assert s[1]["dice"] == pytest.approx(dice(pred == 1, gt == 1))
    assert 0.9 < s[1]["dice"] < 1.0 and s[1]["hd95"] == pytest.approx(1.0)
    assert s[2] == {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    assert math.isnan(s[3]["dice"]) and math.isnan(s[3]["hd95"]) and s[3]["nsd"] == 0.0
    assert all(math.isnan(v) for v in s[4].values())
    # the (C, Z, Y, X) per-class form of the prompted protocol scores the same
    stack = np.stack([pred == c for c in range(5)])
    assert score_case(stack, gt, labels)[1]["dice"] == s[1]["dice"]


def test_score_case_dice_matches_monai() -> None:
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    gt = rng.random((4, 20, 20)) > 0.6
    pred = rng.random((4, 20, 20)) > 0.5
    one_hot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (pred, gt)]
    ref = float(compute_dice(*one_hot, include_background=False)[0, 0])
    got = score_case(pred.astype(np.int64), gt.astype(np.int64), {0: "bg", 1: "x"})[1]["dice"]
    assert got == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize(
    ("kw", "needle"), [({"prompt": "points"}, "prompt"), ({"limit": 0}, "limit")]
)
def test_eval_options_name_the_bad_value(kw: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        EvalOptions(**kw)


def test_report_means_skip_unscored_cases() -> None:
    rows = [
        {"case": "p1", "label": 1, "name": "a", "dice": 0.5, "hd95": 2.0, "nsd": 0.9, "seconds": 1},
        {
            "case": "p1",
            "label": 2,
            "name": "b",
            "dice": None,
            "hd95": None,
            "nsd": None,
            "seconds": 1,
        },
        {"case": "p2", "label": 1, "name": "a", "dice": 0.7, "hd95": 4.0, "nsd": 0.7, "seconds": 1},
        {"case": "p2", "label": 2, "name": "b", "dice": 0.9, "hd95": 1.0, "nsd": 1.0, "seconds": 1},
    ]
    rep = EvalReport(rows=rows, labels={0: "bg", 1: "a", 2: "b"})
    per = rep.per_class()
    assert per["a"]["dice"] == pytest.approx(0.6) and per["a"]["n"] == 2
    assert per["b"]["dice"] == pytest.approx(0.9) and per["b"]["n"] == 1
    assert rep.mean_dice == pytest.approx(0.75)
    lines = rep.case_table().splitlines()
    assert lines[1].split() == ["p1", "0.5000", "-", "0.5000"]
    assert lines[2].split() == ["p2", "0.7000", "0.9000", "0.8000"]
