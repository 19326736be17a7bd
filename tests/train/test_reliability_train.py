"""Issue #12, fine-tuning: unsafe adapter names and exports, labels off the image grid, label
values not declared in dataset.json.

Datasets are built in tmp_path from TotalSegmentator's real CT crop (4 slices); the label maps are
thresholds of it on the same grid (or deliberately on another one). Each test checks the clear
error or the correct handling and that every input file is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from realdata import shared_path

from samed.io import GeometryError
from samed.paths import safe_name
from samed.train import config_from_dict
from samed.train.data import load_cases
from samed.train.export import check_export, export_adapter

REPO = Path(__file__).resolve().parents[2]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _dataset(
    root: Path,
    label_values: tuple[int, ...] = (1,),
    flip_label: bool = False,
    declared: dict | None = None,
) -> Path:
    """An MSD dataset of one real 4-slice CT crop; the label is the CT above 100 HU, valued
    ``label_values[i]`` on slice i (cycled)."""
    ct = nib.load(shared_path("totalsegmentator", "ct_3mm", "example_ct_sm.nii.gz"))
    data = np.asarray(ct.dataobj)[:, :, 10:14].astype(np.int16)
    affine = ct.affine.copy()
    affine[:3, 3] = (ct.affine @ [0, 0, 10, 1])[:3]
    lab = np.zeros(data.shape, np.int16)
    for z in range(data.shape[2]):
        lab[:, :, z][data[:, :, z] > 100] = label_values[z % len(label_values)]
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    nib.save(nib.Nifti1Image(data, affine), root / "imagesTr" / "c0.nii.gz")
    lab_affine = affine.copy()
    if flip_label:  # same shape, x axis reversed: the labels lie mirrored on the patient
        lab_affine[:3, 0] *= -1
        lab_affine[:3, 3] = (affine @ [data.shape[0] - 1, 0, 0, 1])[:3]
        lab = lab[::-1]
    nib.save(nib.Nifti1Image(lab, lab_affine), root / "labelsTr" / "c0.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "realcrop",
                "labels": declared or {"0": "background", "1": "bone"},
                "training": [{"image": "imagesTr/c0.nii.gz", "label": "labelsTr/c0.nii.gz"}],
            }
        )
    )
    return root


def _data_section(root: Path):
    return config_from_dict(
        {"name": "x", "data": {"root": str(root), "train_split": "all", "val_split": None}}
    ).data


# ------------------------------------------------------------------ item 1: names and export
@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "",
        "a/b",
        "a\\b",
        "-rf",
        "nul",
        "CON",
        "x\x00y",
        "tab\tname",
        "x" * 200,
        "trailing.",
    ],
)
def test_unsafe_adapter_names_are_refused(name):
    with pytest.raises(ValueError, match="config name"):
        config_from_dict({"name": name, "data": {"root": "."}})
    with pytest.raises(ValueError, match="allowed: a single folder/file name"):
        safe_name(name, "adapter name")


@pytest.mark.parametrize("name", ["..", "."])
def test_finetune_export_with_dot_names_deletes_nothing(tmp_path, name):
    export = tmp_path / "user" / "adapters"
    export.mkdir(parents=True)
    (export / "keep.txt").write_text("mine")
    (tmp_path / "user" / "thesis.docx").write_text("also mine")
    ds = _dataset(tmp_path / "ds")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump({"name": name, "model": {"kind": "tiny"}, "data": {"root": str(ds)}})
    )
    before = _hashes(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins")]))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "samed",
            "finetune",
            "--config",
            str(cfg),
            "--export",
            str(export),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "config name" in res.stderr and repr(name) in res.stderr
    assert _hashes(tmp_path) == before
    assert not (tmp_path / "run").exists()


def _fake_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"format": "samed-lora"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / "metadata.json").write_text("{}")
    return folder


def test_export_never_replaces_a_folder_that_is_not_an_adapter(tmp_path):
    src = _fake_adapter(tmp_path / "run" / "adapter")
    dest = tmp_path / "adapters"
    (dest / "liver").mkdir(parents=True)
    (dest / "liver" / "notes.txt").write_text("not an adapter")
    before = _hashes(tmp_path)
    with pytest.raises(ValueError, match="is not replaced because it holds files that are not"):
        check_export(dest, "liver")
    with pytest.raises(ValueError, match="is not replaced"):
        export_adapter(src, dest, "liver")
    assert _hashes(tmp_path) == before
    # an adapter there is replaced atomically, and a killed export's temporary is cleaned
    _fake_adapter(dest / "old-one")
    (dest / ".tmp-export-x-123").mkdir()
    (dest / ".tmp-export-x-123" / "adapter_model.safetensors").write_bytes(b"partial")
    out = export_adapter(src, dest, "old-one")
    assert _hashes(out) and (out / "adapter_model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in dest.iterdir()) == ["liver", "old-one"]
    assert (dest / "liver" / "notes.txt").read_text() == "not an adapter"


# ------------------------------------------------------------------ item 5: grid
def test_training_refuses_labels_off_the_image_grid(tmp_path):
    ds = _dataset(tmp_path / "ds", flip_label=True)
    before = _hashes(ds)
    with pytest.raises(
        GeometryError, match=r"labelsTr/c0\.nii\.gz is not on the grid of .*imagesTr/c0"
    ):
        load_cases(_data_section(ds), "all")
    assert _hashes(ds) == before


def test_training_accepts_labels_on_the_image_grid(tmp_path):
    cases, labels, _ = load_cases(_data_section(_dataset(tmp_path / "ds")), "all")
    assert labels == {0: "background", 1: "bone"} and set(np.unique(cases[0].label)) == {0, 1}


# ------------------------------------------------------------------ item 6: label values
def test_undeclared_label_value_is_refused_naming_file_values_and_map(tmp_path):
    ds = _dataset(tmp_path / "ds", label_values=(1, 255))
    before = _hashes(ds)
    with pytest.raises(
        ValueError,
        match=r"c0\.nii\.gz: label values \[255\] are not declared in "
        r".*dataset\.json 'labels' \(values found: \[0, 1, 255\]; declared: \[0, 1\]\)",
    ):
        load_cases(_data_section(ds), "all")
    assert _hashes(ds) == before


def test_negative_label_value_is_a_clear_error_not_a_traceback(tmp_path):
    ds = _dataset(tmp_path / "ds", label_values=(1, -1))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "neg",
                "model": {"kind": "tiny"},
                "data": {"root": str(ds), "train_split": "all", "val_split": None},
                "train": {"iterations": 1, "device": "cpu"},
            }
        )
    )
    before = _hashes(ds)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins")]))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "samed",
            "finetune",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "label values [-1] are not declared" in res.stderr and "c0.nii.gz" in res.stderr
    assert _hashes(ds) == before


def test_folder_without_declared_labels_needs_values_without_gaps(tmp_path):
    ds = _dataset(tmp_path / "ds", label_values=(1, 255))
    (ds / "dataset.json").unlink()  # imagesTr/labelsTr pairing: no label map is declared
    with pytest.raises(ValueError, match=r"values \[0, 1, 255\], which are not 0..K without gaps"):
        load_cases(_data_section(ds), "all")


def test_finetune_export_replaces_only_its_own_adapter(tmp_path, capsys):
    from samed.cli import main

    ds = _dataset(tmp_path / "ds")
    export = tmp_path / "adapters"
    _fake_adapter(export / "bone-test")  # an earlier export of this adapter: replaced
    (export / "other.txt").write_text("user file")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "name": "bone-test",
                "model": {"kind": "tiny"},
                "data": {"root": str(ds), "train_split": "all", "val_split": None},
                "lora": {
                    "r": 2,
                    "alpha": 2,
                    "target_modules": r"image_encoder\.layers\.3\..*\.attn\.qkv",
                },
                "augment": {"enabled": False},
                "train": {
                    "iterations": 2,
                    "batch_size": 1,
                    "device": "cpu",
                    "log_interval": 100,
                    "checkpoint_interval": 100,
                },
            }
        )
    )
    before = _hashes(ds)
    rc = main(
        ["finetune", "--config", str(cfg), "--out", str(tmp_path / "run"), "--export", str(export)]
    )
    assert rc == 0, capsys.readouterr().err
    assert sorted(p.name for p in export.iterdir()) == ["bone-test", "other.txt"]
    got = export / "bone-test" / "adapter_model.safetensors"
    assert (
        got.read_bytes()
        == (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    assert (export / "other.txt").read_text() == "user file"
    assert _hashes(ds) == before


def test_save_adapter_overwrite_replaces_only_an_adapter_folder(tmp_path):
    from samed.lora import LoraConfig, apply_lora, save_adapter
    from samed.model import build_tiny_model

    model = apply_lora(build_tiny_model("tinyvit", seed=0), LoraConfig(r=2))
    user = tmp_path / "adapter"
    user.mkdir()
    (user / "results.xlsx").write_text("user data")
    (tmp_path / ".adapter.old").mkdir()  # the old fixed backup name: never touched
    (tmp_path / ".adapter.old" / "keep.txt").write_text("mine")
    before = _hashes(tmp_path)
    with pytest.raises(FileExistsError, match="not an adapter folder"):
        save_adapter(model, user, overwrite=True)
    assert _hashes(tmp_path) == before
    first = save_adapter(model, tmp_path / "good")
    again = save_adapter(model, first, overwrite=True)
    assert sorted(p.name for p in again.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metadata.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".adapter.old", "adapter", "good"]
