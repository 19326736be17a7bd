"""Issue #12 (bad input, reading and writing side), one test per item, on real files.

Every case is built in tmp_path from real files in ../shared/data (DICOM headers edited with
pydicom, NIfTI headers with nibabel); every input is hashed before and after each call and must
stay byte-identical.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from realdata import shared_path
from pydicom.data import get_testdata_file

from samed.io import (
    VolumeReadError,
    list_series,
    load_label_map,
    load_volume,
    read_dicom_seg,
    save_dicom_seg,
    save_nifti,
)
from samed.io.cli import main as convert_main
from samed.io.readers import SUPPORTED_SUFFIXES
from samed.io.seg import _verify_readback

CT_DICOM = ("totalsegmentator", "dicom_ct", "example_ct_dicom")
CT_3SLICE = ("dcmqi", "ct-3slice")
CT_NII = ("totalsegmentator", "ct_3mm", "example_ct_sm.nii.gz")
SEG_NII = ("totalsegmentator", "ct_3mm", "example_seg.nii.gz")
LIVER = 5


def _hashes(*roots):
    """sha256 of every file under the given files/folders (to prove inputs are never modified)."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


class Unchanged:
    """``with Unchanged(a, b):`` asserts that the files under a and b are byte-identical after."""

    def __init__(self, *roots):
        self.roots = roots

    def __enter__(self):
        self.before = _hashes(*self.roots)
        return self

    def __exit__(self, *exc):
        assert _hashes(*self.roots) == self.before, "an input file was modified"
        return False


def _copy_ct(dest, n, start=0, names=None):
    """Copy ``n`` real CT slices (ascending z from ``start``) into ``dest``; returns the paths."""
    src = shared_path(*CT_DICOM)
    files = sorted(
        src.iterdir(),
        key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]),
    )[start : start + n]
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(files):
        target = dest / (names[i] if names else f"slice{start + i:03d}.dcm")
        shutil.copy(f, target)
        out.append(target)
    return out


def _edit(path, delete=(), **changes):
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    for key in delete:
        delattr(ds, key)
    ds.save_as(path)


# --- 4: NIfTI geometry follows nibabel's sform/qform precedence --------------------------------


def _nifti_with(
    tmp_path, name, sform=None, sform_code=None, qform=None, qform_code=None, zooms=None
):
    """The real CT crop with its header's sform/qform/pixdim replaced (data unchanged)."""
    img = nib.load(shared_path(*CT_NII))
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), None, img.header.copy())
    if sform is not None or sform_code is not None:
        out.set_sform(img.affine if sform is None else sform, code=sform_code)
    if qform is not None or qform_code is not None:
        out.set_qform(np.eye(4) if qform is None else qform, code=qform_code)
    if zooms is not None:
        out.header.set_zooms(zooms)
    path = tmp_path / name
    nib.save(out, str(path))
    return path


def test_sform_is_kept_when_pixdim_and_qform_disagree(tmp_path):
    """Issue item 4: MONAI's header 'correction' swapped the sform for an identity qform."""
    real = nib.load(shared_path(*CT_NII))
    sform = real.affine  # 3 mm voxels, sform_code 2
    path = _nifti_with(
        tmp_path, "ct.nii.gz", sform=sform, sform_code=2, qform_code=0, zooms=(1.0, 1.0, 1.0)
    )
    labels_path = tmp_path / "seg.nii.gz"
    shutil.copy(shared_path(*SEG_NII), labels_path)
    with Unchanged(path, labels_path):
        vol = load_volume(path)
        assert vol.meta["affine_source"] == "sform" and vol.meta["sform_code"] == 2
        np.testing.assert_allclose(vol.affine, nib.load(str(path)).affine, atol=1e-6)
        np.testing.assert_allclose(vol.affine, sform, atol=1e-6)
        assert vol.spacing == pytest.approx((3.0, 3.0, 3.0))
        # The liver's volume follows from this affine (27 mm^3 voxels), not from an identity.
        seg = load_label_map(labels_path)
        out = save_nifti(seg.array, vol, tmp_path / "out_seg.nii.gz")
    written = nib.load(str(out))
    np.testing.assert_allclose(written.affine, sform, atol=1e-5)
    assert int(written.header["sform_code"]) == 2  # the source's space code is kept
    reread = load_label_map(out, reference=vol)
    liver_ml = np.count_nonzero(reread.array == LIVER) * reread.voxel_volume_mm3 / 1000
    assert reread.voxel_volume_mm3 == pytest.approx(27.0)
    assert liver_ml == pytest.approx(np.count_nonzero(seg.array == LIVER) * 27 / 1000)
    assert liver_ml > 50  # a real liver crop, not 1 mm^3 voxels
    # MONAI reads the written file with the same affine (pixdim agrees with the sform now).
    from monai.data import NibabelReader

    reader = NibabelReader()
    _, meta = reader.get_data(reader.read(str(out)))
    np.testing.assert_allclose(np.asarray(meta["affine"]), sform, atol=1e-5)


def test_sheared_sform_keeps_its_shear_through_read_and_write(tmp_path):
    real = nib.load(shared_path(*CT_NII))
    shear = real.affine.copy()
    shear[0, 1] = 0.9  # x moves with j: a sheared grid
    path = _nifti_with(tmp_path, "shear.nii.gz", sform=shear, sform_code=1, qform_code=1)
    with Unchanged(path):
        vol = load_volume(path)
        np.testing.assert_allclose(vol.affine, shear, atol=1e-6)
        assert vol.voxel_volume_mm3 == pytest.approx(abs(np.linalg.det(shear[:3, :3])))
        out = save_nifti((vol.array > 0).astype(np.uint8), vol, tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nib.load(str(out)).affine, shear, atol=1e-5)
    np.testing.assert_allclose(load_label_map(out).affine, shear, atol=1e-5)


@pytest.mark.parametrize(
    ("sform_code", "qform_code", "source"), [(0, 1, "qform"), (0, 0, "pixdim"), (1, 1, "sform")]
)
def test_geometry_rule_matches_nibabel(tmp_path, sform_code, qform_code, source):
    real = nib.load(shared_path(*CT_NII))
    qform = real.affine.copy()
    qform[:3, 3] += 10.0  # qform differs from the sform, so the choice is visible
    path = _nifti_with(
        tmp_path,
        "g.nii.gz",
        sform=real.affine,
        sform_code=sform_code,
        qform=qform,
        qform_code=qform_code,
    )
    with Unchanged(path):
        vol = load_volume(path)
    assert vol.meta["affine_source"] == source
    np.testing.assert_allclose(vol.affine, nib.load(str(path)).affine, atol=1e-6)


# --- 7: blank SeriesInstanceUIDs -----------------------------------------------------------------


def test_two_blank_uid_series_are_not_merged(tmp_path):
    folder = tmp_path / "study"
    a = _copy_ct(folder, 4, start=0)
    b = _copy_ct(folder, 4, start=4)  # contiguous with a: merged they would load silently
    for f in a:
        _edit(f, SeriesNumber=3, SeriesDescription="CT Body 3.0")
    for f in b:
        _edit(f, SeriesNumber=4, SeriesDescription="CT Body 3.0 late")
    with Unchanged(folder):
        series = list_series(folder)
        assert [(s.series_number, s.n_files, s.uid_derived) for s in series] == [
            (3, 4, True),
            (4, 4, True),
        ]
        assert "SeriesInstanceUID blank (derived)" in str(series[0])
        with pytest.raises(VolumeReadError, match="2 image series.*blank"):
            load_volume(folder)
        vol = load_volume(folder, series_uid=series[1].series_uid)
    assert vol.shape[0] == 4 and vol.meta["files"] == [str(f) for f in b]
    assert vol.meta["SeriesInstanceUID"] == series[1].series_uid
    assert any("SeriesInstanceUID is blank" in n for n in vol.meta["notes"])
    # A SEG on series b references the derived UID, so it finds b again beside a.
    labels = np.zeros(vol.shape, np.uint8)
    labels[1:3, 200:300, 200:300] = 2
    with Unchanged(folder):
        seg = save_dicom_seg(labels, vol, tmp_path / "b_seg.dcm")
        back = read_dicom_seg(seg, folder)
    assert back.meta["files"] == [str(f) for f in b]
    np.testing.assert_array_equal(back.array, labels)
    # The derived UID depends on the headers, not on where the files are.
    moved = tmp_path / "copy"
    shutil.copytree(folder, moved)
    assert [s.series_uid for s in list_series(moved)] == [s.series_uid for s in series]


def test_scout_beside_a_blank_uid_ct_is_skipped_and_said(tmp_path, capsys):
    folder = tmp_path / "exam"
    ct = _copy_ct(folder, 4)
    (scout,) = _copy_ct(folder, 1, start=10, names=["scout.dcm"])
    _edit(
        scout,
        ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
        SeriesDescription="Topogram",
    )
    with Unchanged(folder):
        vol = load_volume(folder)
    assert vol.shape[0] == 4 and vol.meta["files"] == [str(f) for f in ct]
    note = next(n for n in vol.meta["notes"] if "localizer" in n)
    assert "skipped 1 localizer" in note and "Topogram" in note
    with Unchanged(folder):
        assert convert_main(["convert", str(folder), str(tmp_path / "ct.nii.gz")]) == 0
    assert "samed convert: note: skipped 1 localizer (scout) series" in capsys.readouterr().err


# --- 8: slices are found by content, not by name ------------------------------------------------


def test_slice_with_a_temporary_name_is_read_not_dropped(tmp_path):
    folder = tmp_path / "series"
    files = _copy_ct(folder, 4)
    hidden = files[2].with_name(".tmp-x.dcm")
    files[2].rename(hidden)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(2000))  # not DICOM
    with Unchanged(folder):
        vol = load_volume(folder)
    assert vol.shape[0] == 4 and str(hidden) in vol.meta["files"]
    assert vol.meta["ignored_files"] == [str(folder / ".DS_Store")]
    assert any(".tmp-x.dcm" in n and "hidden or temporary" in n for n in vol.meta["notes"])


# --- 9 and 10: DICOM SEG writing ----------------------------------------------------------------


def _box_labels(ref):
    labels = np.zeros(ref.shape, np.uint8)
    labels[:, 200:300, 150:260] = 1
    labels[1:, 320:360, 300:340] = 7
    return labels


def test_seg_of_a_ge_ct_with_empty_specific_character_set(tmp_path):
    src = shared_path(*CT_3SLICE)
    assert pydicom.dcmread(src / "01.dcm", stop_before_pixels=True).SpecificCharacterSet == ""
    with Unchanged(src):
        ref = load_volume(src)
        labels = _box_labels(ref)
        out = save_dicom_seg(labels, ref, tmp_path / "seg.dcm", label_names={1: "liver"})
        back = read_dicom_seg(out, src)
    np.testing.assert_array_equal(back.array, labels)
    assert pydicom.dcmread(out, stop_before_pixels=True).SpecificCharacterSet == "ISO_IR 192"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]  # no temporary left


def test_series_with_one_sop_instance_uid_loads_but_gets_no_seg(tmp_path):
    folder = tmp_path / "dup"
    folder.mkdir()
    for f in sorted(shared_path(*CT_3SLICE).glob("0*.dcm")):
        shutil.copy(f, folder / f.name)
    uid = pydicom.dcmread(folder / "01.dcm", stop_before_pixels=True).SOPInstanceUID
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(f)
    out = tmp_path / "seg.dcm"
    with Unchanged(folder):
        ref = load_volume(folder)
        assert ref.shape == (3, 512, 512) and ref.meta["duplicate_sop_instance_uids"] == 2
        assert any("duplicate SOPInstanceUID" in n for n in ref.meta["notes"])
        with pytest.raises(VolumeReadError, match=r"3 slices but only 1 distinct SOPInstanceUID"):
            save_dicom_seg(_box_labels(ref), ref, out)
    assert not out.exists() and list(tmp_path.iterdir()) == [folder]


def test_seg_readback_verification_catches_a_mismatch(tmp_path):
    src = shared_path(*CT_3SLICE)
    with Unchanged(src):
        ref = load_volume(src)
        labels = _box_labels(ref)
        out = save_dicom_seg(labels, ref, tmp_path / "seg.dcm")
        _verify_readback(out, ref, labels, out)  # the real file reads back: no error
    wrong = labels.copy()
    wrong[0, 0, 0] = 1
    with pytest.raises(VolumeReadError, match="reads back differently.*1 voxels differ"):
        _verify_readback(out, ref, wrong, out)
    other = load_volume(_copy_ct(tmp_path / "other", 3)[0].parent)
    with pytest.raises(VolumeReadError, match="does not read back"):
        _verify_readback(out, other, labels, out)


# --- unclear items: refused with the file and the problem named ---------------------------------


def test_rgb_nifti_in_convert_is_a_clear_error(tmp_path, capsys):
    grey = np.asanyarray(nib.load(shared_path(*CT_NII)).dataobj)
    u8 = np.clip((grey + 200) / 2, 0, 255).astype(np.uint8)
    rgb = np.zeros(u8.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"], rgb["G"], rgb["B"] = u8, u8 // 2, 255 - u8
    path = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, nib.load(shared_path(*CT_NII)).affine), str(path))
    out = tmp_path / "out.nii.gz"
    with Unchanged(path):
        assert convert_main(["convert", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert "rgb.nii.gz is a colour image" in err and "(122, 101, 30)" in err
    assert "Traceback" not in err and not out.exists()


def test_rgb_metaimage_is_a_clear_error(tmp_path):
    import itk

    grey = load_volume(shared_path("pyradiomics", "breast1_image.nrrd")).array
    u8 = np.clip(grey / max(float(grey.max()), 1.0) * 255, 0, 255).astype(np.uint8)
    path = tmp_path / "rgb.mha"
    itk.imwrite(itk.image_from_array(np.stack([u8, u8, 255 - u8], axis=-1), is_vector=True), path)
    with Unchanged(path), pytest.raises(VolumeReadError, match=r"rgb\.mha has 3 components"):
        load_volume(path)


def _raw_nifti(path):
    with gzip.open(path) as fh:
        return bytearray(fh.read())


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_huge_header_dimension_is_named_before_allocating(tmp_path, suffix):
    raw = _raw_nifti(shared_path(*CT_NII))
    struct.pack_into("<h", raw, 40 + 2 * 3, 30000)  # dim[3]: 30 slices -> 30000
    path = tmp_path / f"huge{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    with Unchanged(path), pytest.raises(VolumeReadError, match=r"huge.*\(122, 101, 30000\)"):
        load_volume(path)


def test_huge_nrrd_dimension_is_named_before_itk_allocates(tmp_path):
    raw = shared_path("pyradiomics", "brain1_image.nrrd").read_bytes()
    assert b"sizes: 256 256 25\n" in raw
    path = tmp_path / "huge.nrrd"
    path.write_bytes(raw.replace(b"sizes: 256 256 25\n", b"sizes: 256 256 250000\n"))
    with Unchanged(path), pytest.raises(VolumeReadError, match=r"huge.*\(256, 256, 250000\)"):
        load_volume(path)


def test_complex_nifti_is_refused_naming_the_dtype(tmp_path):
    real = nib.load(shared_path(*CT_NII))
    data = np.asanyarray(real.dataobj).astype(np.complex64) * (1 + 1j)
    path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(data, real.affine), str(path))
    with Unchanged(path), pytest.raises(VolumeReadError, match=r"complex\.nii\.gz.*complex64"):
        load_volume(path)


@pytest.mark.parametrize(
    ("value", "match"),
    [("", r"RescaleSlope \(0028,1053\) is present but empty"), (0, "RescaleSlope .* is 0")],
)
def test_bad_rescale_slope_is_named(tmp_path, value, match):
    files = _copy_ct(tmp_path / "s", 3)
    _edit(files[1], RescaleSlope=value)
    with Unchanged(files[0].parent), pytest.raises(VolumeReadError, match=match) as err:
        load_volume(files[0].parent)
    assert files[1].name in str(err.value)


def test_slice_with_orientation_but_no_position_is_refused(tmp_path):
    files = _copy_ct(tmp_path / "s", 3)
    _edit(files[1], delete=["ImagePositionPatient"])
    with Unchanged(files[0].parent):
        with pytest.raises(VolumeReadError, match=f"{files[1].name}: ImagePositionPatient"):
            load_volume(files[0].parent)
        with pytest.raises(VolumeReadError, match=f"{files[1].name}: ImagePositionPatient"):
            load_volume(files[1])  # alone it is not given an assumed geometry either


def test_rtdose_is_not_read_as_an_image(tmp_path):
    dose = get_testdata_file("rtdose.dcm")
    if dose is None:
        pytest.skip("pydicom test file rtdose.dcm is not available")
    with (
        Unchanged(Path(dose)),
        pytest.raises(VolumeReadError, match="not an image: Modality RTDOSE.*RT Dose Storage"),
    ):
        load_volume(dose)
    folder = tmp_path / "plan"
    _copy_ct(folder, 3)
    shutil.copy(dose, folder / "dose.dcm")
    with Unchanged(folder):
        vol = load_volume(folder)  # the CT; the dose grid is not an image series
        assert vol.shape[0] == 3 and vol.modality == "CT"
        only = tmp_path / "dose_only"
        only.mkdir()
        shutil.copy(dose, only / "dose.dcm")
        with pytest.raises(VolumeReadError, match="no image series.*RTDOSE.*not an image series"):
            load_volume(only)


# --- issue #11 item 6: FreeSurfer .mgz ---------------------------------------------------------


def test_mgz_reads_with_the_same_geometry_and_converts(tmp_path):
    nii = shared_path(*CT_NII)
    real = nib.load(nii)
    mgz = tmp_path / "ct.mgz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nib.save(nib.MGHImage(np.asanyarray(real.dataobj).astype(np.int16), real.affine), mgz)
    assert ".mgz" in SUPPORTED_SUFFIXES and ".mgh" in SUPPORTED_SUFFIXES
    with Unchanged(mgz, nii):
        vol, ref = load_volume(mgz), load_volume(nii)
        np.testing.assert_array_equal(vol.array, ref.array)
        np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
        assert vol.meta["affine_source"] == "mgh"
        out = tmp_path / "ct.nii.gz"
        assert convert_main(["convert", str(mgz), str(out)]) == 0
    back = load_volume(out)
    np.testing.assert_array_equal(back.array, ref.array)
    np.testing.assert_allclose(back.affine, ref.affine, atol=1e-4)
    from napari_samed._reader import SUFFIXES

    assert ".mgz" in SUFFIXES
