"""``samed convert`` through the argparse wiring the lead uses (add_parser + func)."""

from __future__ import annotations

import argparse
import shutil

import nibabel as nib
import numpy as np
import pytest
from realdata import shared_path

from samed.io import align_to, load_label_map, load_volume, read_dicom_seg
from samed.io.cli import add_parser

CT_DICOM = ("totalsegmentator", "dicom_ct", "example_ct_dicom")
CT_TWIN = ("totalsegmentator", "dicom_ct", "example_seg_dicom.nii.gz")


def _run(*argv) -> int:
    parser = argparse.ArgumentParser(prog="samed")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *map(str, argv)])
    return args.func(args)


def test_dicom_series_to_nifti_has_the_grid_of_the_twin(tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert _run(shared_path(*CT_DICOM), out) == 0
    assert "wrote" in capsys.readouterr().out
    img, twin = nib.load(out), nib.load(shared_path(*CT_TWIN))
    assert img.shape == twin.shape == (512, 512, 20)
    np.testing.assert_allclose(img.affine, twin.affine, atol=1e-4)  # dcm2niix's voxel order
    assert img.get_data_dtype() == np.int16  # integral HU stored compactly
    hu = np.asarray(img.dataobj)[np.asarray(twin.dataobj) == 5]
    assert 40 < np.median(hu) < 160
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_native_orientation_option(tmp_path):
    out = tmp_path / "ct.nii"
    assert _run(shared_path(*CT_DICOM), out, "--orientation", "native") == 0
    assert "".join(nib.aff2axcodes(nib.load(out).affine)) == "LPS"


def test_dicom_seg_to_nifti_gives_the_liver_voxels_of_the_nrrd(tmp_path):
    out = tmp_path / "liver.nii.gz"
    code = _run(
        shared_path("dcmqi", "liver.dcm"), out, "--reference", shared_path("dcmqi", "ct-3slice")
    )
    assert code == 0
    got = load_label_map(out)
    nrrd = align_to(load_label_map(shared_path("dcmqi", "liver_seg.nrrd")), got)
    np.testing.assert_array_equal(got.array, nrrd.array)
    assert int(got.array.sum()) == 107098


def test_label_map_to_dicom_seg_and_back(tmp_path):
    out = tmp_path / "seg.dcm"
    assert _run(shared_path(*CT_TWIN), out, "--reference", shared_path(*CT_DICOM)) == 0
    back = read_dicom_seg(out, shared_path(*CT_DICOM))
    twin = align_to(load_label_map(shared_path(*CT_TWIN)), back)
    np.testing.assert_array_equal(back.array, twin.array)


def test_rtstruct_to_nifti(tmp_path):
    out = tmp_path / "rt.nii.gz"
    ref = shared_path("rtutils_phantom")
    assert _run(shared_path("rtutils_phantom", "rt.dcm"), out, "--reference", ref) == 0
    assert load_label_map(out).array.max() >= 1


def _gap_series(tmp_path):
    src = sorted(shared_path(*CT_DICOM).iterdir())
    folder = tmp_path / "gap"
    folder.mkdir()
    for f in src[:5] + src[6:]:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no DICOM files found"),
        ("gap", "missing slice"),
        ("seg_without_reference", "--reference"),
        ("dcm_without_reference", "--reference"),
        ("wrong_grid", "not on the grid"),
        ("bad_suffix", "must end in"),
        ("missing_input", "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.nii.gz"
    extra: list = []
    if case == "empty":
        (tmp_path / "empty").mkdir()
        src = tmp_path / "empty"
    elif case == "gap":
        src = _gap_series(tmp_path)
    elif case == "seg_without_reference":
        src = shared_path("dcmqi", "liver.dcm")
    elif case == "dcm_without_reference":
        src, out = shared_path("dcmqi", "liver_seg.nrrd"), out_dir / "x.dcm"
    elif case == "wrong_grid":
        src, out = shared_path("dcmqi", "liver_seg.nrrd"), out_dir / "x.dcm"
        extra = ["--reference", shared_path(*CT_DICOM)]
    elif case == "bad_suffix":
        src, out = shared_path("dcmqi", "liver_seg.nrrd"), out_dir / "x.png"
    else:
        src = tmp_path / "nothing.nii.gz"
    assert _run(src, out, *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("samed convert: error:") and message in err
    assert err.strip().count("\n") == 0
    assert list(out_dir.iterdir()) == []


def test_inputs_are_never_overwritten(tmp_path):
    src = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), str(src))
    before = src.read_bytes()
    assert _run(src, src) == 2
    assert src.read_bytes() == before
    vol = load_volume(src)
    assert vol.shape == (3, 3, 3)
