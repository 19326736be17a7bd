"""The helpers behind a positive click's fallback and an extension's taper (issue #17):
``tapered`` shrinks a mask by raising the logit threshold, keeping the clicked component."""

from __future__ import annotations

import numpy as np

from samed.engine.refine import tapered


def _cone(h: int = 40, w: int = 40, cx: float = 20, cy: float = 20) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return 10.0 - np.hypot(xx - cx, yy - cy)  # logit falls with the distance from (cx, cy)


def test_tapered_keeps_what_the_logits_are_surest_of_up_to_the_cap():
    logits = _cone()
    mask = logits > 0  # a disc of radius 10 (~314 px)
    out = tapered(mask, logits, cap=100)
    assert 0 < out.sum() <= 100
    assert not (out & ~mask).any()  # never grows
    # what is kept is surer than what is dropped
    assert logits[out].min() >= logits[mask & ~out].max()
    # a mask already small enough is returned as it is
    assert np.array_equal(tapered(mask, logits, cap=int(mask.sum())), mask)


def test_tapered_at_a_pixel_keeps_its_component_and_the_pixel():
    logits = np.maximum(_cone(cx=10, cy=20), _cone(cx=30, cy=20) - 2.0)
    mask = logits > 0  # two touching discs; the right one less sure
    out = tapered(mask, logits, cap=120, at=(30, 20))
    assert out[20, 30] and out.sum() <= 120
    assert not out[20, 10]  # the other lobe is not what was clicked
