"""GUI-free annotation state: label editor (preserve, replace, exact undo) and the annotator."""

from __future__ import annotations

import numpy as np
import pytest

from samed.annotation import Annotator, LabelEditor, SlicePrompts


class FakeEngine:
    """Predicts the box (or a 3x3 square around each positive point) as the mask; propagation
    shrinks the mask by one pixel per slice until it vanishes."""

    def __init__(self, shape=(6, 20, 24)):
        self.shape = shape
        self.calls = 0

    def predict(self, z, box=None, points=None, point_labels=None):
        self.calls += 1
        m = np.zeros(self.shape[1:], bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            m[y0 : y1 + 1, x0 : x1 + 1] = True
        if points is not None:
            for (x, y), lab in zip(points, point_labels, strict=True):
                x, y = int(x), int(y)
                m[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = bool(lab)
        return m

    def propagate(self, z, mask, direction="both", **kwargs):
        from types import SimpleNamespace

        dirs = {"both": (1, -1), "forward": (1,), "backward": (-1,)}[direction]
        for d in dirs:
            prev, zz = mask, z
            while 0 <= zz + d < self.shape[0]:
                zz += d
                ys, xs = np.nonzero(prev)
                new = np.zeros_like(prev)
                if ys.size:
                    new[ys.min() + 1 : ys.max(), xs.min() + 1 : xs.max()] = True
                stopped = not new.any()
                yield SimpleNamespace(z=zz, mask=new, stopped=stopped, direction=d)
                if stopped:
                    break
                prev = new


def _labels(shape=(6, 20, 24)):
    return np.zeros(shape, dtype=np.uint16)


# ---------------------------------------------------------------------------------- LabelEditor
def test_paint_preserves_other_labels_and_undo_is_exact():
    lab = _labels()
    lab[2, 5:10, 5:10] = 3
    before = lab.copy()
    ed = LabelEditor(lab)
    mask = np.zeros(lab.shape[1:], bool)
    mask[0:8, 0:8] = True
    edit = ed.paint(mask, 7, z=2)
    assert edit is not None and edit.size == 64 - 9
    assert (lab[2, 5:8, 5:8] == 3).all()  # the other label survived
    assert (lab[2][mask & (before[2] == 0)] == 7).all()
    assert lab is ed.labels  # edited in place
    ed.undo()
    np.testing.assert_array_equal(lab, before)
    ed.redo()
    assert (lab[2, 0:5, 0:5] == 7).all()


def test_paint_overwrite_and_replace():
    lab = _labels()
    lab[1, 0:4, 0:4] = 2
    lab[1, 10:12, 10:12] = 5
    ed = LabelEditor(lab)
    mask = np.zeros(lab.shape[1:], bool)
    mask[2:6, 2:6] = True
    ed.paint(mask, 5, z=1, preserve=False, replace=True)
    assert (lab[1, 2:6, 2:6] == 5).all()  # overwrote label 2 there
    assert (lab[1, 10:12, 10:12] == 0).all()  # replace cleared label 5 outside the mask
    assert (lab[1, 0:2, 0:2] == 2).all()


@pytest.mark.parametrize(
    ("labels", "kwargs", "match"),
    [
        (np.zeros((2, 3), np.uint8), {}, "Z, Y, X"),
        (np.zeros((2, 3, 4), np.float32), {}, "integer"),
    ],
)
def test_editor_rejects_bad_label_maps(labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelEditor(labels, **kwargs)


@pytest.mark.parametrize("label", [0, -1, 256, 1.5])
def test_paint_rejects_bad_label_values(label):
    ed = LabelEditor(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(ValueError, match="label"):
        ed.paint(np.ones((3, 4), bool), label, z=0)


def test_paint_rejects_wrong_shapes():
    ed = LabelEditor(_labels())
    with pytest.raises(ValueError, match="slice mask shape"):
        ed.paint(np.ones((3, 3), bool), 1, z=0)
    with pytest.raises(ValueError, match="outside"):
        ed.paint(np.ones((20, 24), bool), 1, z=99)
    with pytest.raises(ValueError, match="mask shape"):
        ed.paint(np.ones((20, 24), bool), 1)


def test_fill_preserve_and_erase():
    lab = _labels()
    lab[0, :2, :2] = 9
    ed = LabelEditor(lab)
    auto = np.zeros_like(lab)
    auto[0, :4, :4] = 1
    ed.fill(auto, preserve=True)
    assert (lab[0, :2, :2] == 9).all() and lab[0, 3, 3] == 1
    ed.erase(9)
    assert not (lab == 9).any()
    ed.undo()
    ed.undo()
    assert (lab[0, :2, :2] == 9).all() and lab[0, 3, 3] == 0


def test_no_change_records_nothing():
    ed = LabelEditor(_labels())
    assert ed.paint(np.zeros((20, 24), bool), 1, z=0) is None
    assert not ed.can_undo


# ---------------------------------------------------------------------------------- Annotator
def test_prompt_steps_accept_and_unified_undo():
    eng = FakeEngine()
    lab = _labels()
    lab[3, 0:3, 0:3] = 2
    ann = Annotator(eng, lab)
    m = ann.add_box(3, (1, 1, 8, 6))
    assert m.sum() == 8 * 6
    ann.add_point(3, (15, 15), positive=True)
    assert ann.masks[3][15, 15]
    assert ann.prompts[3] == SlicePrompts((1.0, 1.0, 8.0, 6.0), ((15.0, 15.0),), (1,))
    snapshot = lab.copy()
    edit = ann.accept(4)
    assert edit is not None
    assert (lab[3, 0:3, 0:3] == 2).all()  # preserved
    assert lab[3, 5, 5] == 4 and lab[3, 15, 15] == 4
    assert ann.masks == {} and ann.prompts == {}
    ann.undo()  # undo accept: labels back exactly, object back
    np.testing.assert_array_equal(lab, snapshot)
    assert 3 in ann.masks and ann.prompts[3].points
    ann.undo()  # undo the point
    assert not ann.prompts[3].points and not ann.masks[3][15, 15]
    ann.redo()
    ann.redo()
    assert lab[3, 15, 15] == 4
    assert ann.history == ["box on slice 3", "box + 1+/0- points on slice 3", "accept label 4"]


def test_same_prompts_do_not_repredict_or_record():
    eng = FakeEngine()
    ann = Annotator(eng, _labels())
    ann.add_box(2, (0, 0, 5, 5))
    n, h = eng.calls, len(ann.history)
    ann.set_prompts(2, SlicePrompts((0.0, 0.0, 5.0, 5.0)))
    assert eng.calls == n and len(ann.history) == h


def test_empty_prompts_remove_the_slice():
    ann = Annotator(FakeEngine(), _labels())
    ann.add_box(2, (0, 0, 5, 5))
    assert ann.set_prompts(2, SlicePrompts()) is None
    assert ann.masks == {}
    ann.undo()
    assert 2 in ann.masks


def test_second_object_under_another_label_leaves_first_alone():
    ann = Annotator(FakeEngine(), _labels())
    ann.add_box(1, (2, 2, 10, 10))
    ann.accept(1)
    first = ann.labels == 1
    ann.add_box(1, (6, 6, 15, 15))
    ann.accept(2)
    np.testing.assert_array_equal(ann.labels == 1, first)
    assert (ann.labels == 2).sum() == 10 * 10 - 5 * 5


def test_propagate_is_one_step_and_keeps_prompted_slices():
    ann = Annotator(FakeEngine(), _labels())
    ann.add_box(2, (2, 2, 12, 12))
    n = ann.propagate()
    zs = sorted(ann.masks)
    assert n == len(zs) and zs == [0, 1, 2, 3, 4, 5]
    assert ann.masks[3].sum() == 9 * 9 and ann.masks[5].sum() == 5 * 5
    assert ann.history[-1].startswith("propagate from slice 2")
    ann.undo()
    assert sorted(ann.masks) == [2]


def test_propagate_closed_early_records_partial_result():
    ann = Annotator(FakeEngine(), _labels())
    ann.add_box(2, (2, 2, 12, 12))
    it = ann.propagate_iter(direction="forward")
    next(it)
    it.close()
    assert sorted(ann.masks) == [2, 3]
    assert ann.history[-1].startswith("propagate from slice 2 (forward, 1 slices)")


def test_propagate_without_object_raises():
    ann = Annotator(FakeEngine(), _labels())
    with pytest.raises(ValueError, match="nothing to propagate"):
        ann.propagate()


def test_clear_object_and_fill_are_undoable():
    ann = Annotator(FakeEngine(), _labels())
    ann.add_box(0, (0, 0, 3, 3))
    assert ann.clear_object() and ann.masks == {}
    assert not ann.clear_object()
    ann.undo()
    assert 0 in ann.masks
    auto = np.ones(ann.shape, np.int16)
    ann.fill(auto)
    assert (ann.labels == 1).all()
    ann.undo()
    assert not ann.labels.any()


def test_shape_mismatch_and_bad_prompts():
    with pytest.raises(ValueError, match="does not match"):
        Annotator(FakeEngine((6, 20, 24)), np.zeros((5, 20, 24), np.uint8))
    with pytest.raises(ValueError, match="point labels"):
        SlicePrompts(None, ((1.0, 2.0),), (2,))
    with pytest.raises(ValueError, match="one each"):
        SlicePrompts(None, ((1.0, 2.0),), ())
    ann = Annotator(FakeEngine(), _labels())
    with pytest.raises(ValueError, match="slice index"):
        ann.add_box(17, (0, 0, 1, 1))


def test_with_real_engine_session_and_tiny_model(make_tiny_model):
    pytest.importorskip("torch")
    from samed.engine import Session

    rng = np.random.default_rng(0)
    vol = rng.normal(size=(3, 32, 40)).astype(np.float32)
    vol[:, 10:20, 12:25] += 4
    eng = Session(make_tiny_model("tinyvit", seed=0), vol, intensity="minmax")
    ann = Annotator(eng, np.zeros(vol.shape, np.uint8))
    m = ann.add_box(1, (12, 10, 24, 19))
    assert m.shape == (32, 40) and m.dtype == bool
    ann.add_point(1, (5, 5), positive=False)
    assert ann.prompts[1].labels == (0,)


def test_history_is_bounded_and_a_new_step_drops_the_redo_stack():
    from samed.annotation import History

    undone, redone = [], []
    h: History[int] = History(max_history=3)
    for i in range(5):
        h.push(i)
    assert h.steps == [2, 3, 4]  # the two oldest dropped
    assert h.undo(undone.append) == 4 and h.undo(undone.append) == 3 and undone == [4, 3]
    assert h.can_redo and h.redo(redone.append) == 3 and redone == [3]
    h.push(9)  # a new step after an undo: what was undone cannot be redone any more
    assert not h.can_redo and h.redo(redone.append) is None and h.steps == [2, 3, 9]
    while h.undo(undone.append) is not None:
        pass
    assert not h.can_undo and undone[-3:] == [9, 3, 2]
    none: History[int] = History(max_history=0)  # keeps nothing to undo
    none.push(1)
    assert not none.can_undo and none.undo(undone.append) is None
    with pytest.raises(ValueError, match="max_history=-1 must be >= 0"):
        History(-1)


def test_history_merge_last_folds_steps_into_one_undo():
    from samed.annotation import History

    h: History[tuple[int, ...]] = History(max_history=4)
    for i in range(3):
        h.push((i,))
    assert h.pushed == 3
    merged = h.merge_last(2, lambda steps: sum(steps, ()))
    assert merged == (1, 2) and h.steps == [(0,), (1, 2)] and h.pushed == 3
    assert h.merge_last(1, lambda steps: steps[0]) is None and h.steps == [(0,), (1, 2)]
    assert h.merge_last(9, lambda steps: sum(steps, ())) == (0, 1, 2)  # all that is kept
    undone: list[tuple[int, ...]] = []
    assert h.undo(undone.append) == (0, 1, 2) and not h.can_undo
    with pytest.raises(ValueError, match="count=-1 must be >= 0"):
        h.merge_last(-1, lambda steps: steps[0])
