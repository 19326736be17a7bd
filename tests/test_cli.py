"""The ``samed`` command: ``info``, ``evaluate`` (issue 4's CLI contract) and ``python -m samed``."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from realdata import shared_path

from samed.cli import main


def test_python_m_samed_info_lists_versions_device_models_and_adapters():
    out = subprocess.run(
        [sys.executable, "-m", "samed", "info"], capture_output=True, text=True, check=True
    ).stdout
    for key in ("samed:", "torch:", "device:", "monai:", "highdicom:"):
        assert key in out
    models = out.split("models:")[1].split("adapters:")[0]
    assert {"litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"} <= set(
        models.split()
    )
    adapters = out.split("adapters:")[1]
    for name in ("acdc-cardiac-mri", "acdc-cardiac-mri-prompted", "abdomen-ct"):
        assert re.search(
            rf"^\s+{re.escape(name)}\s+(automatic|prompted)\s+litemedsam", adapters, re.M
        )


@pytest.mark.slow
def test_evaluate_box_protocol_on_one_real_acdc_volume(tmp_path, capsys):
    data = shared_path("acdc")
    out = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--data",
            str(data),
            "--split",
            "val",
            "--prompt",
            "box",
            "--limit",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"mean_dice=0\.\d{4}", lines[-1])
    rep = json.loads(out.read_text())
    assert rep["settings"]["split"] == "val" and rep["settings"]["limit"] == 1
    # --device auto: fp16 autocast on a GPU, float32 on the CPU
    assert rep["settings"]["precision"] == ("fp16" if torch.cuda.is_available() else "fp32")
    per = {k: v["dice"] for k, v in rep["per_class"].items()}
    assert set(per) == {"RV", "MYO", "LV"}
    # zero-shot LiteMedSAM with GT boxes: ventricles right, the myocardial ring not (domain gap)
    assert per["RV"] > 0.9 and per["LV"] > 0.9 and per["MYO"] < 0.5
    assert float(lines[-1].split("=")[1]) == pytest.approx(rep["mean_dice"], abs=5e-5)
    # the per-volume table: one line per case with the 3D Dice of each class and their mean
    row = next(ln for ln in lines if ln.startswith("patient028_frame01"))
    vals = [float(v) for v in row.split()[1:]]
    assert vals == pytest.approx(
        [per["RV"], per["MYO"], per["LV"], sum(per.values()) / 3], abs=5e-5
    )
    assert {r["case"] for r in rep["cases"]} == {"patient028_frame01"}
    assert out.with_suffix(".csv").is_file()


def test_bad_precision_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--data", "x", "--precision", "half"])
    assert e.value.code == 2
    assert "invalid choice: 'half'" in capsys.readouterr().err
