"""Reader, writer, sample data and manifest of the napari plugin (no display needed)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from realdata import shared_path

npe2 = pytest.importorskip("npe2")

from napari_samed._reader import get_reader  # noqa: E402
from napari_samed._writer import write_labels  # noqa: E402

CT = ("totalsegmentator", "ct_3mm", "example_ct.nii.gz")
SEG = ("totalsegmentator", "ct_3mm", "example_seg_fast_force_split.nii.gz")
DICOM = ("totalsegmentator", "dicom_ct", "example_ct_dicom")


def test_manifest_is_valid_and_discovered():
    from importlib.resources import files

    mf = npe2.PluginManifest.from_file(files("napari_samed") / "napari.yaml")
    assert mf.name == "samed"
    ids = {c.id for c in mf.contributions.commands}
    assert {"samed.get_reader", "samed.write_labels", "samed.widget"} <= ids
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert "samed" in pm._manifests, "installed package not discovered: pip install -e ."


def test_reader_nifti_keeps_geometry():
    path = shared_path(*CT)
    reader = get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image" and data.shape == (112, 101, 122)
    assert kwargs["scale"] == pytest.approx((3.0, 3.0, 3.0))
    vol = kwargs["metadata"]["samed_volume"]
    ref = nib.load(str(path))
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    assert vol.array is data  # the layer data is the volume's array, not a copy
    assert kwargs["contrast_limits"] == (-160.0, 240.0)


def test_reader_reads_a_label_map_as_labels():
    [(data, _kwargs, kind)] = get_reader(str(shared_path(*SEG)))(str(shared_path(*SEG)))
    assert kind == "labels" and np.issubdtype(data.dtype, np.integer) and 5 in data


def test_reader_dicom_folder():
    folder = shared_path(*DICOM)
    reader = get_reader(str(folder))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(folder))
    assert kind == "image" and data.shape == (20, 512, 512)
    sz, sy, sx = kwargs["scale"]
    assert sy == pytest.approx(sx) and 0.9 < sx < 1.0
    assert kwargs["metadata"]["samed_volume"].meta.get("SeriesInstanceUID")


@pytest.mark.parametrize(
    "name", ["notes.txt", "missing.nii.gz", "image.png", ["a.nii", "b.nii"], "empty_dir"]
)
def test_reader_returns_none_for_what_it_cannot_read(tmp_path, name):
    if name == "notes.txt":
        (tmp_path / name).write_text("hello")
    if name == "image.png":
        (tmp_path / name).write_bytes(b"\x89PNG\r\n")
    if name == "empty_dir":
        (tmp_path / name).mkdir()
        (tmp_path / name / "readme.txt").write_text("not dicom")
    path = [str(tmp_path / n) for n in name] if isinstance(name, list) else str(tmp_path / name)
    assert get_reader(path) is None


def test_reader_refuses_a_dicom_seg(tmp_path):
    pytest.importorskip("highdicom")
    seg = shared_path("dcmqi", "liver.dcm")
    assert get_reader(str(seg)) is None


def test_writer_nifti_on_source_grid(tmp_path):
    path = shared_path(*CT)
    [(data, kwargs, _)] = get_reader(str(path))(str(path))
    labels = np.zeros(data.shape, np.uint16)
    labels[50:60, 20:40, 30:70] = 5
    out = tmp_path / "labels.nii.gz"
    assert write_labels(str(out), labels, {"metadata": kwargs["metadata"]}) == [str(out)]
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, nib.load(str(path)).affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, labels)


def test_writer_without_source_uses_scale(tmp_path):
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 2, 3] = 1
    out = tmp_path / "x.nii"
    write_labels(str(out), labels, {"metadata": {}, "scale": (3.0, 2.0, 1.0)})
    img = nib.load(str(out))
    np.testing.assert_allclose(np.diag(img.affine)[:3], (1.0, 2.0, 3.0))


def test_writer_rejects_seg_for_non_dicom_and_bad_suffix(tmp_path):
    labels = np.zeros((2, 3, 4), np.uint8)
    with pytest.raises(ValueError, match="not a DICOM series"):
        write_labels(str(tmp_path / "x.dcm"), labels, {"metadata": {}})
    with pytest.raises(ValueError, match=r"\.nii"):
        write_labels(str(tmp_path / "x.png"), labels, {"metadata": {}})


def test_writer_dicom_seg_for_dicom_source(tmp_path):
    pytest.importorskip("highdicom")
    folder = shared_path(*DICOM)
    [(data, kwargs, _)] = get_reader(str(folder))(str(folder))
    labels = np.zeros(data.shape, np.uint8)
    labels[5:8, 200:260, 200:260] = 1
    labels[9, 100:120, 100:140] = 3
    meta = dict(kwargs["metadata"], samed_label_names={1: "liver", 3: "spleen"})
    out = tmp_path / "seg.dcm"
    write_labels(str(out), labels, {"metadata": meta})
    from samed.io import read_dicom_seg

    back = read_dicom_seg(out, folder)
    np.testing.assert_array_equal(np.asarray(back.array), labels)


def test_sample_data():
    pytest.importorskip("pydicom")
    from napari_samed._sample_data import sample_ct

    [(data, kwargs, kind)] = sample_ct()
    assert kind == "image" and data.shape == (1, 128, 128)
    assert kwargs["metadata"]["samed_volume"].modality == "CT"


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ("RAS", ("up", "left")),
        ("LPS", ("down", "right")),
        ("LAS", ("up", "right")),
        ("RPI", ("down", "left")),
        ("ASR", None),
        ("RSA", None),
        ("XYZ", None),
    ],
)
def test_radiological_orientation_for_axial_volumes_only(codes, expected):
    from napari_samed._layers import radiological_orientation2d

    assert radiological_orientation2d(codes) == expected
