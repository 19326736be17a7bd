"""``samed evaluate --config``: a fine-tuning config's cases, splits and classes, no dataset.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import yaml
from realdata import REPO, shared_path

from samed.evaluate.data import dataset_from_config


def _btcv_config(tmp_path, z_range=(40, 43)):
    img_dir, lab_dir = shared_path("btcv", "imagesTr"), shared_path("btcv", "labelsTr")
    cases = [
        {
            "id": cid,
            "image": str(img_dir / f"{cid}.nii.gz"),
            "label": str(lab_dir / f"{cid}.nii.gz"),
            "split": split,
            "z_range": list(z_range),
        }
        for cid, split in (("btcv_0005", "train"), ("btcv_0034", "val"), ("btcv_0037", "val"))
    ]
    raw = yaml.safe_load((REPO / "configs" / "abdomen-ct.yaml").read_text())
    raw["data"]["cases"] = cases
    path = tmp_path / "btcv.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_config_cases_become_a_dataset_with_its_splits_and_classes(tmp_path):
    ds = dataset_from_config(_btcv_config(tmp_path))
    assert [c.case_id for c in ds.split("val")] == ["btcv_0034", "btcv_0037"]
    assert [c.case_id for c in ds.split("train")] == ["btcv_0005"]
    assert ds.split("val")[0].z_range == (40, 43)
    assert ds.labels[6] == "liver" and ds.labels[3] == "kidney_left" and len(ds.labels) == 14
    picked = ds.select(ds.split("val"), ["btcv_0037"])
    assert [c.case_id for c in picked] == ["btcv_0037"]
    with pytest.raises(ValueError, match=r"btcv_0005.*known: \['btcv_0034', 'btcv_0037'\]"):
        ds.select(ds.split("val"), ["btcv_0005"])  # a train case is not in val
    with pytest.raises(ValueError, match="known splits"):
        ds.split("test")


def test_config_label_sources_remap_the_label_files(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "abdomen-ct.yaml").read_text())
    raw["data"]["labels"] = {
        1: {"name": "kidney", "source": [2, 3]},
        2: {"name": "liver", "source": [6]},
    }
    path = tmp_path / "merged.yaml"
    path.write_text(yaml.safe_dump(raw))
    ds = dataset_from_config(path)
    assert ds.labels == {0: "background", 1: "kidney", 2: "liver"}
    lab = np.array([[0, 1, 2], [3, 6, 7]])
    assert ds.remap_labels(lab).tolist() == [[0, 0, 1], [1, 2, 0]]


def test_pairs_config_without_labels_is_refused(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "abdomen-ct.yaml").read_text())
    del raw["data"]["labels"]
    path = tmp_path / "nolabels.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="needs data.labels"):
        dataset_from_config(path)


@pytest.mark.slow
def test_installed_cli_scores_the_config_val_split_on_real_btcv_slices(tmp_path):
    """The installed ``samed evaluate`` on 3 slices (liver, spleen, kidneys) of one BTCV val case."""
    cfg, out = _btcv_config(tmp_path, z_range=(64, 67)), tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "samed", "evaluate", "--config", str(cfg), "--split", "val"]
    cmd += ["--cases", "btcv_0034", "--adapter", "abdomen-ct", "--device", "cpu"]
    res = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    last = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"mean_dice=0\.\d{4}", last)
    rep = json.loads(out.read_text())
    assert rep["settings"]["split"] == "val" and rep["settings"]["cases"] == ["btcv_0034"]
    assert rep["settings"]["data"] == str(cfg)
    assert {r["case"] for r in rep["cases"]} == {"btcv_0034"}
    per = {k: v["dice"] for k, v in rep["per_class"].items()}
    # the shipped adapter finds the liver in the middle of the abdomen (whole volume: 0.93)
    assert per["liver"] > 0.7
    # an unknown case id is a usage error (exit 2) that names the known ones
    bad = subprocess.run(
        cmd[:-4] + ["--cases", "btcv_9999"], capture_output=True, text=True, cwd=REPO
    )
    assert bad.returncode == 2 and "btcv_9999" in bad.stderr and "btcv_0037" in bad.stderr
