"""The numpy intensity functions of the one intensity path (:mod:`samed.intensity`).

The MONAI-style transforms that used to live in ``samed.transforms`` (and were used only by
this file's tests) were removed in favour of the single path; the grammar is tested in
``test_intensity.py``. The model-input geometry is the engine's (``test_engine.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

from samed.intensity import apply_window, percentile_scale
from samed.registry import CT_WINDOWS, WindowPreset


@pytest.mark.parametrize("name", sorted(CT_WINDOWS))
def test_apply_window_presets_map_the_window_to_0_1(name):
    p = CT_WINDOWS[name]
    hu = np.array([p.low - 100, p.low, p.center, p.high, p.high + 100], dtype=np.int16)
    out = apply_window(hu, name)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1], atol=1e-6)


def test_apply_window_accepts_preset_objects_and_pairs_and_rejects_bad_ones():
    hu = np.linspace(-1000, 1000, 11)
    np.testing.assert_allclose(apply_window(hu, (-1000, 1000)), np.linspace(0, 1, 11), atol=1e-6)
    np.testing.assert_allclose(
        apply_window(hu, WindowPreset("x", 0, 2000)), np.linspace(0, 1, 11), atol=1e-6
    )
    with pytest.raises(ValueError, match="allowed"):
        apply_window(hu, "spleen")
    with pytest.raises(ValueError, match="below high"):
        apply_window(hu, (10, 10))


def test_percentile_scale():
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, size=(4, 32, 32)).astype(np.float32)
    out = percentile_scale(mr)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    lo, hi = np.percentile(mr, [0.5, 99.5])
    np.testing.assert_allclose(
        out[1, 2, 3], np.clip((mr[1, 2, 3] - lo) / (hi - lo), 0, 1), rtol=1e-5
    )
    assert not percentile_scale(np.full((2, 3, 3), 7.0)).any()
    mr[0, 0, 0] = np.nan
    assert np.isfinite(percentile_scale(mr)).all()
    with pytest.raises(ValueError, match="percentiles"):
        percentile_scale(mr, 60, 40)
