"""Loaders and writers on the real files in ../shared/data (skipped only when it is absent)."""

from __future__ import annotations

import re
import shutil

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from realdata import shared_path

from samed.io import (
    GeometryError,
    VolumeReadError,
    align_to,
    list_series,
    load_label_map,
    load_volume,
    read_dicom_seg,
    read_rtstruct,
    reorient,
    save_dicom_seg,
    save_nifti,
    save_rtstruct,
)

TS = ("totalsegmentator",)
CT_DICOM = (*TS, "dicom_ct", "example_ct_dicom")
CT_TWIN = (*TS, "dicom_ct", "example_seg_dicom.nii.gz")
LIVER = 5  # TotalSegmentator class map


@pytest.fixture(scope="module")
def ct():
    return load_volume(shared_path(*CT_DICOM))


@pytest.fixture(scope="module")
def twin():
    return load_label_map(shared_path(*CT_TWIN))


def test_jpeg2000_ct_series_loads_on_the_grid_of_its_nifti_twin(ct, twin):
    assert ct.shape == (20, 512, 512) and ct.modality == "CT"
    assert ct.meta["transfer_syntaxes"] == ["1.2.840.10008.1.2.4.90"]  # JPEG 2000 lossless
    assert ct.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))  # not SliceThickness (3.0)
    assert ct.orientation == "LPS" and twin.orientation == "LAS"  # twin stores rows bottom-up
    assert twin.shape == ct.shape
    on_twin = reorient(ct, twin.orientation)
    np.testing.assert_allclose(on_twin.affine, twin.affine, atol=1e-4)
    assert len(ct.meta["sop_instance_uids"]) == 20 and ct.meta["SeriesInstanceUID"]
    # This anonymised series has blank study/series UIDs: stable ones are derived.
    assert ct.meta["derived_uids"] == ["StudyInstanceUID", "SeriesInstanceUID"]
    assert (
        load_volume(shared_path(*CT_DICOM)).meta["SeriesInstanceUID"]
        == ct.meta["SeriesInstanceUID"]
    )
    # z increases along the slice normal (+S here): first slice is the lowest.
    positions = [
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        for f in ct.meta["files"]
    ]
    assert positions == sorted(positions)


def test_liver_voxels_of_the_twin_are_in_a_liver_hu_range(ct, twin):
    hu = reorient(ct, twin.orientation).array[twin.array == LIVER]
    assert hu.size > 100_000
    assert 40 < float(np.median(hu)) < 160  # enhanced liver parenchyma
    assert -1024 <= ct.array.min() and ct.array.max() < 4000 and ct.array.dtype == np.float32


def test_dcmqi_seg_reads_back_on_ct3slice_equal_to_nrrd():
    ref_dir = shared_path("dcmqi", "ct-3slice")
    labels = read_dicom_seg(shared_path("dcmqi", "liver.dcm"), ref_dir)
    nrrd = load_label_map(shared_path("dcmqi", "liver_seg.nrrd"))
    assert labels.shape == nrrd.shape == (3, 512, 512)
    nrrd = align_to(nrrd, labels)
    np.testing.assert_array_equal(labels.array, nrrd.array)
    assert int(labels.array.sum()) == 107098 and labels.meta["label_names"] == {1: "Liver"}


def test_overlapping_seg_is_a_clear_error():
    with pytest.raises(VolumeReadError, match="overlap"):
        read_dicom_seg(
            shared_path("dcmqi", "partial_overlaps.dcm"), shared_path("dcmqi", "ct-3slice")
        )


def test_seg_against_the_wrong_series_is_an_error():
    with pytest.raises(VolumeReadError, match="references none"):
        read_dicom_seg(shared_path("dcmqi", "liver.dcm"), shared_path(*CT_DICOM))


def test_label_map_written_as_dicom_seg_reads_back_equal(ct, twin, tmp_path):
    labels = align_to(twin, ct)
    out = save_dicom_seg(
        labels.array,
        ct,
        tmp_path / "seg.dcm",
        label_names={LIVER: "liver"},
        colors={LIVER: (200, 30, 30)},
    )
    seg = hd.seg.segread(out)
    values = [int(v) for v in np.unique(labels.array) if v]
    assert seg.number_of_segments == len(values)
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == ct.meta["SeriesInstanceUID"]
    pixels = seg.get_pixels_by_source_instance(
        ct.meta["sop_instance_uids"],
        combine_segments=True,
        relabel=False,
    )
    expected = np.searchsorted(values, labels.array) + 1
    expected[labels.array == 0] = 0
    np.testing.assert_array_equal(pixels, expected)  # segment numbers 1..N in label order
    liver_seg = values.index(LIVER) + 1
    desc = seg.get_segment_description(liver_seg)
    assert (
        desc.segment_label == "liver"
        and desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    )
    assert hd.color.CIELabColor.from_dicom_value(
        desc.RecommendedDisplayCIELabValue
    ).to_rgb() == pytest.approx((200, 30, 30), abs=2)
    back = read_dicom_seg(out, shared_path(*CT_DICOM))
    np.testing.assert_array_equal(back.array, labels.array)  # original label values restored
    np.testing.assert_allclose(back.affine, ct.affine, atol=1e-4)


def test_label_map_written_as_nifti_reloads_with_the_source_affine(ct, twin, tmp_path):
    labels = align_to(twin, ct)
    path = save_nifti(labels.array, ct, tmp_path / "labels.nii.gz")
    back = load_label_map(path, reference=ct)
    np.testing.assert_array_equal(back.array, labels.array)
    assert np.abs(back.affine - ct.affine).max() <= 1e-4


def test_label_map_on_another_grid_is_rejected(ct):
    with pytest.raises(GeometryError, match=r"\(3, 512, 512\) vs \(20, 512, 512\)"):
        load_label_map(shared_path("dcmqi", "liver_seg.nrrd"), reference=ct)
    with pytest.raises(GeometryError):
        save_dicom_seg(np.ones((3, 512, 512), np.uint8), ct, "/nonexistent/never.dcm")


def test_rtstruct_phantom_and_round_trip(ct, twin, tmp_path):
    phantom = read_rtstruct(
        shared_path("rtutils_phantom", "rt.dcm"), shared_path("rtutils_phantom")
    )
    assert phantom.shape[0] == 2 and phantom.array.max() >= 1 and phantom.meta["label_names"]
    liver = align_to(twin, ct).array == LIVER
    out = save_rtstruct(liver, ct, tmp_path / "rt.dcm", label_names={1: "liver"})
    back = read_rtstruct(out, shared_path(*CT_DICOM))
    got = back.array == 1
    dice = 2 * (got & liver).sum() / (got.sum() + liver.sum())
    assert dice > 0.97 and back.meta["label_names"] == {1: "liver"}


def _nrrd_header(path):
    text = path.read_bytes().split(b"\n\n", 1)[0].decode()
    fields = dict(line.split(": ", 1) for line in text.splitlines()[1:] if ": " in line)
    vectors = [
        [float(v) for v in vec.split(",")]
        for vec in re.findall(r"\(([^)]*)\)", fields["space directions"])
    ]
    origin = [float(v) for v in re.findall(r"\(([^)]*)\)", fields["space origin"])[0].split(",")]
    return fields["space"], np.array(vectors), np.array(origin)


@pytest.mark.parametrize("name", ["brain1_image.nrrd", "breast1_image.nrrd"])
def test_nrrd_spacing_and_orientation_match_its_header(name):
    path = shared_path("pyradiomics", name)
    vol = load_volume(path)
    space, dirs, origin = _nrrd_header(path)
    assert space == "left-posterior-superior"
    lps = np.eye(4)
    lps[:3, :3] = dirs.T  # columns are the axis vectors
    lps[:3, 3] = origin
    np.testing.assert_allclose(vol.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)
    assert vol.spacing == pytest.approx(tuple(np.linalg.norm(dirs, axis=1))[::-1])
    if name.startswith("brain1"):
        assert vol.shape == (25, 256, 256) and vol.spacing == pytest.approx((6.5, 0.78125, 0.78125))
        assert vol.orientation == "LAS"  # LPS space with a negative y direction


def test_lps_mr_nifti_loads_with_its_orientation():
    path = shared_path(*TS, "mr_3mm", "example_mr_sm.nii.gz")
    vol = load_volume(path)
    img = nib.load(path)
    assert vol.shape == (20, 91, 117) and vol.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert vol.orientation == "LPS"
    np.testing.assert_allclose(vol.affine, img.affine, atol=1e-5)
    np.testing.assert_array_equal(vol.array, np.asarray(img.dataobj).T)
    seg = load_label_map(shared_path(*TS, "mr_3mm", "example_seg_mr.nii.gz"), reference=vol)
    assert seg.array.dtype == np.uint8 and seg.array.max() > 1


def test_medsam_npz_loads_with_spacing_and_direction():
    path = shared_path("medsam2_deeplesion", "CT_Lesion_000001_02_01_008-023.npz")
    vol = load_volume(path)
    gts = load_label_map(path, reference=vol)
    with np.load(path) as z:
        spacing, direction = z["spacing"], z["direction"].reshape(3, 3)
        np.testing.assert_array_equal(vol.array, z["imgs"])
    assert vol.shape == (16, 512, 512)
    assert vol.spacing == pytest.approx((spacing[2], spacing[1], spacing[0]))  # (z, y, x)
    np.testing.assert_allclose(
        vol.affine[:3, :3], np.diag([-1, -1, 1]) @ direction @ np.diag(spacing)
    )
    assert vol.orientation == "PLI"  # as its SimpleITK direction says
    assert set(np.unique(gts.array)) == {0, 1}


def test_several_series_in_nested_folders_are_listed_and_chosen(tmp_path):
    ts = sorted(shared_path(*CT_DICOM).iterdir())[:3]
    for i, f in enumerate(ts):
        dest = tmp_path / "a" / "deep" / f"s{i}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    shutil.copytree(shared_path("dcmqi", "ct-3slice"), tmp_path / "b")
    shutil.copy(shared_path("dcmqi", "liver.dcm"), tmp_path / "b" / "seg.dcm")
    (tmp_path / "README.txt").write_text("not dicom")
    (tmp_path / "b" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    series = list_series(tmp_path)
    assert [s.n_files for s in series if s.is_image] == sorted([3, 3]) and len(series) == 3
    assert {s.modality for s in series} == {"CT", "SEG"}
    with pytest.raises(VolumeReadError, match="2 image series.*series_uid"):
        load_volume(tmp_path)
    dcmqi = next(s for s in series if s.is_image and s.folder.name == "b")
    vol = load_volume(tmp_path, series_uid=dcmqi.series_uid)
    assert vol.shape == (3, 512, 512) and len(vol.meta["ignored_files"]) == 2
    with pytest.raises(VolumeReadError, match="not in"):
        load_volume(tmp_path, series_uid="1.2.3")
