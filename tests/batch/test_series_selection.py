"""Series selection in real multi-series studies (TCIA Brain-Tumor-Progression, folder names with
spaces): non-image objects and localizers are skipped, ``--series-filter`` rules pick the image
series, and the summary says what was skipped and why."""

from __future__ import annotations

import json

import pydicom
import pytest
from pydicom.uid import generate_uid
from realdata import shared_path

from samed.batch import discover_cases, segment_batch
from samed.batch.series import parse_series_filter
from samed.cli import main

STUDY = "04-02-1992-FH-HEADBrain Protocols-79896"


@pytest.fixture(scope="module")
def study(tmp_path_factory, copy_slices):
    """A copy of one real study, 3 slices per series (T1post, FLAIR_reg, Mask_Tumor), plus a
    localizer, a series whose description names a scout, and a SEG-modality object."""
    src = shared_path("tcia_btp", "PGBM-001", STUDY)
    root = tmp_path_factory.mktemp("btp") / "PGBM 001" / STUDY
    for sub in ("11-T1post-80644", "35623-FLAIRreg-79237", "5388-MaskTumor-63335"):
        copy_slices(src / sub, root / sub, 3, start=10)
    t1 = sorted((root / "11-T1post-80644").iterdir())
    for name, change in (
        ("loc", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "SeriesDescription": "AX"}),
        ("scout", {"SeriesDescription": "3-plane loc SCOUT"}),
        ("seg", {"Modality": "SEG", "SeriesDescription": "tumour SEG"}),
    ):
        ds = pydicom.dcmread(t1[0])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, "sop"])
        for k, v in change.items():
            setattr(ds, k, v)
        (root / name).mkdir()
        ds.save_as(root / name / "1.dcm")
    return root


def _skipped(skipped):
    return {s.description: s.reason for s in skipped}


def test_non_images_and_localizers_are_skipped_with_a_reason(study):
    skipped: list = []
    cases = discover_cases([study], skipped=skipped)
    assert sorted(c.case_id.split("_")[1] for c in cases) == ["FLAIR", "Mask", "T1post"]
    reasons = _skipped(skipped)
    assert set(reasons) == {"AX", "3-plane loc SCOUT", "tumour SEG"}
    assert reasons["AX"] == "localizer (ImageType LOCALIZER)"
    assert "names a scout" in reasons["3-plane loc SCOUT"]
    assert "not an image series (Modality SEG" in reasons["tumour SEG"]


def test_series_filter_rules(study):
    skipped: list = []
    rules = parse_series_filter(["description=^t1", "modality=MR|CT", "min-slices=3"])
    cases = discover_cases([study], rules, skipped)
    assert [c.case_id.split("_")[1] for c in cases] == ["T1post"]
    reasons = _skipped(skipped)
    assert "description=^t1: SeriesDescription is 'FLAIR_reg'" in reasons["FLAIR_reg"]
    assert len(skipped) == 5
    derived = discover_cases([study], parse_series_filter(["image-type=^ORIGINAL"]), skipped := [])
    assert "Mask" not in [c.case_id.split("_")[1] for c in derived]
    assert "ImageType is 'DERIVED" in _skipped(skipped)["Mask_Tumor"]
    too_few = discover_cases([study], parse_series_filter(["min-slices=4"]), skipped := [])
    assert too_few == [] and "min-slices=4: 3 slice(s)" in _skipped(skipped)["T1post"]
    ct = discover_cases([study], parse_series_filter(["modality=CT"]), [])
    assert ct == []


@pytest.mark.parametrize(
    "rule, message",
    [
        ("description", "expected KEY=VALUE"),
        ("colour=red", "expected KEY=VALUE with KEY one of"),
        ("description=(", "not a valid regular expression"),
        ("min-slices=0", "must be an integer >= 1"),
        ("modality=|", "names no modality"),
    ],
)
def test_bad_rules_are_refused(rule, message):
    with pytest.raises(ValueError, match=message):
        parse_series_filter([rule])


def test_summary_lists_the_skipped_series(study, tmp_path, tiny_automatic_adapter, make_tiny_model):
    res = segment_batch(
        [study.parent.parent],
        tmp_path / "out",
        adapter=tiny_automatic_adapter,
        model=make_tiny_model("tinyvit", seed=2),
        series_filter=["description=T1post"],
        qc=False,
    )
    assert [r.status for r in res.results] == ["ok"], res.results
    assert "T1post" in res.results[0].case
    data = json.loads((tmp_path / "out" / "summary.json").read_text())
    got = {s["description"]: s["reason"] for s in data["skipped_series"]}
    assert set(got) == {"FLAIR_reg", "Mask_Tumor", "AX", "3-plane loc SCOUT", "tumour SEG"}
    assert got["AX"] == "localizer (ImageType LOCALIZER)"
    assert all(s["series_uid"] and s["source"] for s in data["skipped_series"])


def test_cli_bad_series_filter_exits_2(study, tmp_path, capsys):
    code = main(["segment", str(study), "-o", str(tmp_path / "o"), "--series-filter", "x=1"])
    assert code == 2 and "--series-filter 'x=1'" in capsys.readouterr().err
