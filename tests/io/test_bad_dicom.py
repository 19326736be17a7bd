"""The bad-input corpus for DICOM series, and the transfer syntaxes that must decode.

Broken series are built in tmp_path from real slices (../shared/data is never modified) and from
pydicom's own test files.
"""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from realdata import shared_path

from samed.io import VolumeReadError, list_series, load_volume

CT_DICOM = ("totalsegmentator", "dicom_ct", "example_ct_dicom")


def _copy_series(dest, n=None):
    """Copy the real CT series (sorted by position along +z, i.e. ascending) into ``dest``."""
    src = shared_path(*CT_DICOM)
    files = sorted(
        src.iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files[:n] if n else files):
        target = dest / f"slice{i:03d}.dcm"
        shutil.copy(f, target)
        out.append(target)
    return out


def _edit(path, **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path)


def _testdata(name):
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return path


def test_empty_folder(tmp_path):
    with pytest.raises(VolumeReadError, match="no DICOM files found.*no files"):
        load_volume(tmp_path)
    assert list_series(tmp_path) == []


def test_folder_with_only_non_dicom_files(tmp_path):
    (tmp_path / "notes.txt").write_text("patient notes")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VolumeReadError, match="no DICOM files found.*2 non-DICOM files"):
        load_volume(tmp_path)


def test_corrupt_dicom_header_is_named(tmp_path):
    files = _copy_series(tmp_path, 3)
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[:132] + b"\xff" * 64)  # DICM marker, then garbage
    with pytest.raises(VolumeReadError, match=f"corrupt DICOM file .*{files[1].name}"):
        load_volume(tmp_path)


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"])
def test_truncated_pixel_data_is_named(tmp_path, name):
    target = tmp_path / name
    shutil.copy(_testdata(name), target)
    with pytest.raises(VolumeReadError, match=name) as err:
        load_volume(tmp_path)
    assert "cannot decode the pixels" in str(err.value) or "multi-frame" in str(err.value)


def test_truncated_file_in_a_series(tmp_path):
    files = _copy_series(tmp_path, 3)
    files[1].write_bytes(files[1].read_bytes()[:5000])  # header intact, pixel data cut
    with pytest.raises(VolumeReadError, match=files[1].name):
        load_volume(tmp_path)


def test_missing_slice_gap(tmp_path):
    files = _copy_series(tmp_path)
    files[10].unlink()
    with pytest.raises(
        VolumeReadError,
        match=r"missing slice.*4\.000 mm between slice009.dcm and slice011.dcm.*2\.000 mm",
    ):
        load_volume(tmp_path)


def test_non_uniform_slice_spacing(tmp_path):
    files = _copy_series(tmp_path, 8)
    for f in files[4:]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(f, ImagePositionPatient=[x, y, z + 0.5])
    with pytest.raises(VolumeReadError, match=r"non-uniform slice spacing.*\[2\.0, 2\.5\] mm"):
        load_volume(tmp_path)


def test_gantry_tilt(tmp_path):
    files = _copy_series(tmp_path, 5)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(f, ImagePositionPatient=[x, y + 0.35 * i, z], GantryDetectorTilt=10.0)
    with pytest.raises(
        VolumeReadError, match=r"gantry tilt.*0\.350 mm in-plane.*GantryDetectorTilt=10"
    ):
        load_volume(tmp_path)


def test_mixed_orientations(tmp_path):
    files = _copy_series(tmp_path, 4)
    _edit(files[2], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(VolumeReadError, match="mixed slice orientations"):
        load_volume(tmp_path)


def test_4d_series_with_repeated_positions(tmp_path):
    files = _copy_series(tmp_path / "t0", 3)
    for i, f in enumerate(files):
        twin = tmp_path / "t1" / f.name
        twin.parent.mkdir(exist_ok=True)
        shutil.copy(f, twin)
        _edit(twin, SOPInstanceUID=generate_uid(), InstanceNumber=100 + i)
    with pytest.raises(VolumeReadError, match="share a position.*4D"):
        load_volume(tmp_path)


def test_multiframe_object_is_rejected(tmp_path):
    shutil.copy(_testdata("emri_small.dcm"), tmp_path / "mf.dcm")
    with pytest.raises(VolumeReadError, match="multi-frame"):
        load_volume(tmp_path)


def test_single_slice_loads_as_z1(tmp_path):
    (f,) = _copy_series(tmp_path, 1)
    vol = load_volume(tmp_path)
    assert vol.shape == (1, 512, 512)
    assert vol.spacing[0] == pytest.approx(3.0)  # SliceThickness when there is no neighbour
    single = load_volume(f)  # a single file as input
    np.testing.assert_array_equal(single.array, vol.array)


def test_nothing_is_modified(tmp_path):
    src = shared_path(*CT_DICOM)
    before = {f.name: f.stat().st_mtime_ns for f in src.iterdir()}
    _copy_series(tmp_path, 2)
    load_volume(tmp_path)
    assert {f.name: f.stat().st_mtime_ns for f in src.iterdir()} == before


LOSSLESS = [
    ("MR_small_RLE.dcm", "RLE"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000"),
    ("MR_small_bigendian.dcm", "big endian"),
]


@pytest.mark.parametrize(("name", "what"), LOSSLESS)
def test_lossless_transfer_syntaxes_decode_identically(name, what):
    ref = load_volume(_testdata("MR_small.dcm"))
    vol = load_volume(_testdata(name))
    assert vol.shape == ref.shape == (1, 64, 64), what
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.affine, ref.affine)


@pytest.mark.parametrize(
    "name", ["JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG2000.dcm", "JPEG-LL.dcm", "693_J2KR.dcm"]
)
def test_jpeg_family_decodes(name):
    ds = pydicom.dcmread(_testdata(name), stop_before_pixels=True)
    vol = load_volume(_testdata(name))
    assert vol.shape == (1, int(ds.Rows), int(ds.Columns)) and np.isfinite(vol.array).all()
    assert vol.array.std() > 0
    if "ImagePositionPatient" not in ds:
        assert vol.meta["geometry"] == "assumed"


def test_colour_images_are_rejected(tmp_path):
    with pytest.raises(VolumeReadError, match="colour"):
        load_volume(_testdata("SC_rgb_jpeg_dcmtk.dcm"))
