"""Prompts files: parsing (JSON and CSV), validation messages, voxel and world coordinates."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from realdata import shared_path

from samed.batch.prompts import (
    ObjectPrompt,
    parse_prompt,
    prompts_by_case,
    read_prompts,
    resolve_prompt,
)

SHAPE = (30, 101, 122)  # (Z, Y, X) of example_ct_sm.nii.gz


@pytest.fixture(scope="module")
def affine() -> np.ndarray:
    """The real RAS affine of a TotalSegmentator CT (header only)."""
    return nib.load(shared_path("totalsegmentator", "ct_3mm", "example_ct_sm.nii.gz")).affine


def test_json_and_csv_give_the_same_prompts(tmp_path):
    entries = [
        {"case": "ct1", "label": 5, "name": "liver", "slice": 12, "box": [40, 20, 100, 80]},
        {
            "case": "ct1",
            "label": 1,
            "name": "spleen",
            "slice": 14,
            "points": [[20, 30], [25, 35]],
            "point_labels": [1, 0],
        },
        {"case": "ct2", "label": 5, "name": "liver", "box": [1, 2, 3, 4], "slice": 0},
    ]
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"prompts": entries}))
    cs = tmp_path / "p.csv"
    cs.write_text(
        "case,label,name,space,slice,box,points,point_labels\n"
        "ct1,5,liver,,12,40 20 100 80,,\n"
        'ct1,1,spleen,voxel,14,,"20 30; 25 35",1 0\n'
        'ct2,5,liver,,0,"1,2,3,4",,\n'
    )
    a, b = read_prompts(js), read_prompts(cs)
    assert [p.fingerprint() for p in a] == [p.fingerprint() for p in b]
    assert a[1].points == ((20.0, 30.0), (25.0, 35.0)) and a[1].point_labels == (1, 0)
    grouped = prompts_by_case(a)
    assert list(grouped) == ["ct1", "ct2"] and [p.name for p in grouped["ct1"]] == [
        "liver",
        "spleen",
    ]
    assert read_prompts(js)[0].where == "p.json entry 0" and b[2].where == "p.csv row 4"


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ({"label": 1, "slice": 0, "box": [0, 0, 1, 1]}, "'case' is required"),
        ({"case": "a", "label": 0, "slice": 0, "box": [0, 0, 1, 1]}, r"label 0 must be in \[1"),
        ({"case": "a", "label": 1.5, "slice": 0, "box": [0, 0, 1, 1]}, "must be an integer"),
        ({"case": "a", "label": 1, "slice": 0, "box": [0, 0, 1]}, r"must be \[x0, y0, x1, y1\]"),
        ({"case": "a", "label": 1, "slice": 0, "box": [5, 0, 1, 1]}, "x1 >= x0"),
        ({"case": "a", "label": 1, "slice": 0, "box": "1 2 three 4"}, "list of numbers"),
        ({"case": "a", "label": 1, "box": [0, 0, 1, 1]}, "needs 'slice'"),
        ({"case": "a", "label": 1, "slice": 0}, "give a box or points"),
        (
            {"case": "a", "label": 1, "slice": 0, "box": [0, 0, 1, 1], "space": "mm"},
            r"space 'mm' is not one of \['voxel', 'ras', 'world', 'lps'\]",
        ),
        (
            {"case": "a", "label": 1, "space": "ras", "box": [0, 0, 1, 1]},
            r"\[x0, y0, z0, x1, y1, z1\]",
        ),
        ({"case": "a", "label": 1, "space": "ras", "points": [[0, 0]]}, r"3 \(\[x, y, z\] mm\)"),
        ({"case": "a", "label": 1, "slice": 0, "points": [[1, 1]], "point_labels": [2]}, "one 1"),
        (
            {"case": "a", "label": 1, "slice": 0, "box": [0, 0, 1, 1], "colour": "red"},
            r"unknown keys \['colour'\]",
        ),
    ],
)
def test_invalid_entries_name_the_value_and_what_is_allowed(entry, match):
    with pytest.raises(ValueError, match=match):
        parse_prompt(entry, "p.json entry 3")


def test_file_level_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.json")
    bad = tmp_path / "p.yaml"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"suffix '.yaml' is not one of \['.json', '.csv'\]"):
        read_prompts(bad)
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_prompts(tmp_path / "p.json")
    (tmp_path / "p.csv").write_text("case,slice\na,1\n")
    with pytest.raises(ValueError, match=r"lacks \['label'\]"):
        read_prompts(tmp_path / "p.csv")
    (tmp_path / "q.json").write_text(
        json.dumps(
            [
                {"case": "a", "label": 1, "name": "liver", "slice": 0, "box": [0, 0, 1, 1]},
                {"case": "a", "label": 1, "name": "spleen", "slice": 0, "box": [0, 0, 1, 1]},
            ]
        )
    )
    with pytest.raises(ValueError, match="one label value has one name"):
        read_prompts(tmp_path / "q.json")


def test_voxel_prompts_resolve_and_are_checked_against_the_volume(affine):
    p = parse_prompt({"case": "a", "label": 1, "slice": 12, "box": [40, 20, 100, 80]})
    r = resolve_prompt(p, SHAPE, affine)
    assert r.z == 12 and r.box.tolist() == [40, 20, 100, 80] and r.points is None
    p3 = parse_prompt({"case": "a", "label": 1, "points": [[10, 20, 7], [11, 21, 7]]})
    r3 = resolve_prompt(p3, SHAPE, affine)
    assert (
        r3.z == 7
        and r3.points.tolist() == [[10, 20], [11, 21]]
        and r3.point_labels.tolist() == [1, 1]
    )
    with pytest.raises(ValueError, match=r"key slice 30 is outside the volume's slices \[0, 29\]"):
        resolve_prompt(
            parse_prompt({"case": "a", "label": 1, "slice": 30, "box": [0, 0, 1, 1]}), SHAPE, affine
        )
    with pytest.raises(ValueError, match=r"outside slice 0 \(x in \[0, 121\], y in \[0, 100\]\)"):
        resolve_prompt(
            parse_prompt({"case": "a", "label": 1, "slice": 0, "box": [0, 0, 130, 5]}),
            SHAPE,
            affine,
        )
    with pytest.raises(ValueError, match="all must be on one key slice"):
        resolve_prompt(
            parse_prompt({"case": "a", "label": 1, "points": [[1, 1, 2], [1, 1, 3]]}), SHAPE, affine
        )


@pytest.mark.parametrize("space", ["ras", "world", "lps"])
def test_world_prompts_map_through_the_affine(affine, space):
    box_vox = np.array([40.0, 20.0, 100.0, 80.0])
    z = 12
    c0 = affine @ [box_vox[0], box_vox[1], z, 1]
    c1 = affine @ [box_vox[2], box_vox[3], z, 1]
    pt = affine @ [55, 44, z, 1]
    flip = np.array([-1, -1, 1, 1]) if space == "lps" else np.ones(4)
    c0, c1, pt = c0 * flip, c1 * flip, pt * flip
    p = parse_prompt(
        {
            "case": "a",
            "label": 2,
            "space": space,
            "box": [*c0[:3], *c1[:3]],
            "points": [pt[:3].tolist()],
        }
    )
    assert p.space == ("ras" if space == "world" else space)
    r = resolve_prompt(p, SHAPE, affine)
    assert r.z == z
    np.testing.assert_allclose(r.box, box_vox, atol=1e-6)
    np.testing.assert_allclose(r.points, [[55, 44]], atol=1e-6)
    # corners on different slices (an oblique box) are an error, not a projection
    c1b = affine @ [box_vox[2], box_vox[3], z + 2, 1] * flip
    p = parse_prompt({"case": "a", "label": 2, "space": space, "box": [*c0[:3], *c1b[:3]]})
    with pytest.raises(ValueError, match="must lie on one axial slice"):
        resolve_prompt(p, SHAPE, affine)


def test_fingerprint_is_plain_json():
    p = ObjectPrompt(case="a", label=3, name="x", slice=1, box=(1.0, 2.0, 3.0, 4.0))
    assert json.loads(json.dumps(p.fingerprint()))["box"] == [1.0, 2.0, 3.0, 4.0]
