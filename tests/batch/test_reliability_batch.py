"""Issue #12, batch and adapters: bad or unusual input to `samed segment` and adapter folders.

Each test builds its inputs in tmp_path from TotalSegmentator's real CT crop (4 slices), runs
what a user runs (``python -m samed ...`` in a subprocess where the refusal comes before any
model work; :func:`segment_batch` with the tiny random model where a case is segmented), checks
the clear error or the correct handling, and that every input file is byte-identical afterwards.
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
from realdata import shared_path

from samed.batch import segment_batch
from samed.model import build_tiny_model

REPO = Path(__file__).resolve().parents[2]
SEED = 2
BOX = {"slice": 1, "box": [20, 30, 70, 80]}


def _hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _crop(path: Path, z0: int) -> Path:
    """A 4-slice crop of the real TotalSegmentator CT, starting at slice z0."""
    ct = nib.load(shared_path("totalsegmentator", "ct_3mm", "example_ct_sm.nii.gz"))
    data = np.asarray(ct.dataobj)[:, :, z0 : z0 + 4]
    affine = ct.affine.copy()
    affine[:3, 3] = (ct.affine @ [0, 0, z0, 1])[:3]
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _prompts(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


def _samed(
    *args: str, env: dict | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "plugins")]))
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "samed", *args],
        capture_output=True,
        text=True,
        env=e,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model("tinyvit", seed=SEED)


# ------------------------------------------------------------------ item 2: output = an input
def test_output_path_equal_to_an_input_file_is_refused(tmp_path):
    x = tmp_path / "X"
    src = _crop(x / "labels" / "labels.nii.gz", 10)  # case id "labels" -> X/labels/labels.nii.gz
    prompts = _prompts(tmp_path / "p.json", [{"case": "labels", "label": 1, **BOX}])
    before = _hashes(tmp_path)
    res = _samed("segment", str(src), "-o", str(x), "--prompts", str(prompts), "--quiet")
    assert res.returncode == 2, res.stderr
    assert "would overwrite the input" in res.stderr and str(src) in res.stderr
    assert "Traceback" not in res.stderr
    assert _hashes(tmp_path) == before
    assert sorted(p.name for p in x.iterdir()) == ["labels"]  # no summary was written either


def test_output_reaching_an_input_through_a_symlink_is_refused(tmp_path, tiny):
    src = _crop(tmp_path / "data" / "ct.nii.gz", 10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "ct").symlink_to(src.parent)  # OUT/ct is the input's folder
    prompts = _prompts(tmp_path / "p.json", [{"case": "ct", "label": 1, **BOX}])
    before = _hashes(src)
    with pytest.raises(ValueError, match="would overwrite the input"):
        segment_batch([src], out, prompts=prompts, model=tiny)
    assert _hashes(src) == before


# ------------------------------------------------------------------ unclear: unwritable -o
def test_unwritable_output_is_one_clear_line(tmp_path):
    src = _crop(tmp_path / "in" / "ct.nii.gz", 10)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    prompts = _prompts(tmp_path / "p.json", [{"case": "ct", "label": 1, **BOX}])
    before = _hashes(tmp_path)
    res = _samed(
        "segment",
        str(src),
        "-o",
        str(blocker / "out"),
        "--prompts",
        str(prompts),
        "--quiet",
        "--device",
        "cpu",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "is not writable" in res.stderr and str(blocker / "out") in res.stderr
    assert _hashes(tmp_path) == before


# ------------------------------------------------------------------ unclear: summary.csv.nii.gz
def test_input_named_like_the_summary_does_not_collide(tmp_path, tiny):
    src = _crop(tmp_path / "in" / "summary.csv.nii.gz", 10)
    prompts = _prompts(tmp_path / "p.json", [{"case": "summary.csv_case", "label": 1, **BOX}])
    before = _hashes(src)
    res = segment_batch([src], tmp_path / "out", prompts=prompts, model=tiny, qc=False)
    assert [r.case for r in res.results] == ["summary.csv_case"]
    assert res.results[0].status == "ok", res.results[0].error
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert (tmp_path / "out" / "summary.csv_case" / "labels.nii.gz").is_file()
    assert _hashes(src) == before


# ------------------------------------------------------------------ item 3: resume fingerprint
def test_resume_does_not_trust_the_case_id(tmp_path, tiny):
    a = _crop(tmp_path / "siteA" / "ct.nii.gz", 10)
    b = _crop(tmp_path / "siteB" / "ct.nii.gz", 20)  # another scan, same file name
    prompts = _prompts(tmp_path / "p.json", [{"case": "ct", "label": 1, **BOX}])
    before = _hashes(a, b)
    out = tmp_path / "out"
    first = segment_batch([a], out, prompts=prompts, model=tiny, qc=False)
    assert first.results[0].status == "ok"
    marker = json.loads((out / "ct" / "case.json").read_text())
    assert marker["input"]["sha256"] == hashlib.sha256(b"ct.nii.gz\0" + a.read_bytes()).hexdigest()
    assert marker["input"]["files"][0]["path"] == str(a.resolve())
    labels_a = (out / "ct" / "labels.nii.gz").read_bytes()
    second = segment_batch([b], out, prompts=prompts, model=tiny, qc=False)
    row = second.results[0]
    assert row.status == "error" and "another input" in row.error and str(a.resolve()) in row.error
    assert row.volumes_ml == {} and second.exit_code == 1
    assert (out / "ct" / "labels.nii.gz").read_bytes() == labels_a  # siteA's result untouched
    # the same content moved elsewhere is the same input: skipped
    moved = tmp_path / "moved" / "ct.nii.gz"
    moved.parent.mkdir()
    moved.write_bytes(a.read_bytes())
    again = segment_batch([moved], out, prompts=prompts, model=tiny, qc=False)
    assert again.results[0].status == "skipped"
    redo = segment_batch([b], out, prompts=prompts, model=tiny, qc=False, overwrite=True)
    assert redo.results[0].status == "ok"
    marker = json.loads((out / "ct" / "case.json").read_text())
    assert marker["input"]["files"][0]["path"] == str(b.resolve())
    assert _hashes(a, b) == before


def test_two_inputs_with_one_case_id_in_one_batch_get_distinct_folders(tmp_path, tiny):
    a = _crop(tmp_path / "siteA" / "ct.nii.gz", 10)
    b = _crop(tmp_path / "siteB" / "CT.nii.gz", 20)  # differs only in case: one folder on macOS
    res = segment_batch(
        [a, b], tmp_path / "out", prompts=_prompts(tmp_path / "p.json", []), model=tiny, qc=False
    )
    ids = [r.case for r in res.results]
    assert (
        len({i.lower() for i in ids}) == 2 and ids[0].startswith("ct_") and ids[1].startswith("CT_")
    )


# ------------------------------------------------------------------ leftovers after failures
def test_failed_case_leaves_only_its_error_row_and_failed_overwrite_keeps_the_old_case(
    tmp_path, tiny
):
    src = _crop(tmp_path / "in" / "ct.nii.gz", 10)
    out = tmp_path / "out"
    bad = _prompts(
        tmp_path / "bad.json", [{"case": "ct", "label": 1, "slice": 9, "box": [1, 1, 5, 5]}]
    )
    res = segment_batch([src], out, prompts=bad, model=tiny, qc=False)
    assert res.results[0].status == "error" and "outside the volume" in res.results[0].error
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.json"]
    good = _prompts(tmp_path / "good.json", [{"case": "ct", "label": 1, **BOX}])
    assert segment_batch([src], out, prompts=good, model=tiny, qc=False).results[0].status == "ok"
    kept = _hashes(out / "ct")
    res = segment_batch([src], out, prompts=bad, model=tiny, qc=False, overwrite=True)
    assert res.results[0].status == "error" and "kept unchanged" in res.results[0].error
    assert _hashes(out / "ct") == kept  # labels.nii.gz and case.json, both the old ones
    assert not [p for p in out.rglob(".tmp-*")]


def test_temporaries_of_a_killed_run_are_cleaned_on_the_next_run(tmp_path, tiny):
    src = _crop(tmp_path / "in" / "ct.nii.gz", 10)
    out = tmp_path / "out"
    (out / "ct").mkdir(parents=True)
    (out / ".tmp-samed-0123456789ab-summary.json").write_text("{")
    (out / "ct" / ".tmp-samed-0123456789ab-labels.nii.gz").write_bytes(b"partial")
    (out / ".tmp-samed-ct-abcd").mkdir()
    (out / ".tmp-samed-ct-abcd" / "labels.nii.gz").write_bytes(b"partial")
    (out / ".tmp-notes").mkdir()  # the user's own: not a name samed writes, never removed
    (out / ".tmp-notes" / "todo.txt").write_text("mine")
    (out / "ct" / "labels.nii.gz").write_bytes(b"left by a killed run, no case.json")
    prompts = _prompts(tmp_path / "p.json", [{"case": "ct", "label": 1, **BOX}])
    res = segment_batch([src], out, prompts=prompts, model=tiny, qc=False)
    assert res.results[0].status == "ok"
    assert not [p for p in out.rglob(".tmp-samed-*")]
    assert (out / ".tmp-notes" / "todo.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "ct").iterdir()) == ["case.json", "labels.nii.gz"]
    assert nib.load(out / "ct" / "labels.nii.gz").shape == (nib.load(src).shape)


# ------------------------------------------------------------------ item 12 and prompts files
def test_two_labels_with_one_name_are_refused_naming_the_prompts_file(tmp_path, tiny):
    src = _crop(tmp_path / "in" / "ct.nii.gz", 10)
    prompts = _prompts(
        tmp_path / "dup.json",
        [
            {"case": "ct", "label": 1, "name": "liver", **BOX},
            {"case": "ct", "label": 2, "name": "liver", "slice": 2, "box": [80, 40, 110, 70]},
        ],
    )
    with pytest.raises(ValueError, match=r"dup\.json.*'liver'.*label 2.*label 1"):
        segment_batch([src], tmp_path / "out", prompts=prompts, model=tiny)
    assert not (tmp_path / "out").exists()


def test_excel_csv_with_a_bom_is_read(tmp_path, tiny):
    src = _crop(tmp_path / "in" / "ct.nii.gz", 10)
    csv_file = tmp_path / "p.csv"
    csv_file.write_bytes(
        "case,label,name,slice,box\r\nct,1,liver,1,20 30 70 80\r\n".encode("utf-8-sig")
    )
    before = _hashes(src, csv_file)
    res = segment_batch([src], tmp_path / "out", prompts=csv_file, model=tiny, qc=False)
    assert res.results[0].status == "ok", res.results[0].error
    assert res.results[0].labels == {1: "liver"}
    assert _hashes(src, csv_file) == before


def test_prompts_for_cases_not_in_the_batch_are_warned_in_the_summary(tmp_path, tiny):
    src = _crop(tmp_path / "in" / "ct.nii.gz", 10)
    prompts = _prompts(
        tmp_path / "p.json",
        [
            {"case": "ct", "label": 1, **BOX},
            {"case": "ct_typo", "label": 1, **BOX},
        ],
    )
    res = segment_batch([src], tmp_path / "out", prompts=prompts, model=tiny, qc=False)
    assert res.results[0].status == "ok"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(saved["warnings"]) == 1 and "ct_typo" in saved["warnings"][0]


# ------------------------------------------------------------------ item 11: NaN adapter weight
def _automatic_adapter(folder: Path) -> Path:
    from samed.lora import LoraConfig, apply_lora, save_adapter

    model = build_tiny_model("tinyvit", seed=SEED)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    return save_adapter(model, folder, labels={0: "background", 1: "liver", 2: "spleen"})


def test_adapter_with_a_nan_weight_is_refused_naming_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from samed.lora import AdapterError

    folder = _automatic_adapter(tmp_path / "adapters" / "nan-auto")
    weights = folder / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = sorted(k for k in state if ".lora_A." in k)[0]
    state[key][0, 0] = float("nan")
    save_file(state, str(weights))
    src = _crop(tmp_path / "in" / "ct.nii.gz", 10)
    before = _hashes(src, folder)
    with pytest.raises(
        AdapterError, match=rf"adapter_model\.safetensors: tensor '{key}' holds 1 NaN"
    ):
        segment_batch(
            [src], tmp_path / "out", adapter=folder, model=build_tiny_model("tinyvit", seed=SEED)
        )
    assert _hashes(src, folder) == before


# ------------------------------------------------------------------ unclear: broken adapter folders
def test_broken_adapter_folders_are_listed_as_unusable_and_break_nothing_else(
    tmp_path, monkeypatch
):
    from samed.registry import find_adapters, resolve_adapter

    root = tmp_path / "adapters"
    good = _automatic_adapter(root / "good")
    for name, cfg in (("list-config", "[]"), ("bad-key", None)):
        bad = root / name
        bad.mkdir()
        (bad / "adapter_model.safetensors").write_bytes(
            (good / "adapter_model.safetensors").read_bytes()
        )
        if cfg is None:
            data = json.loads((good / "adapter_config.json").read_text())
            data["labels"] = {"liver": "1"}
            cfg = json.dumps(data)
        (bad / "adapter_config.json").write_text(cfg)
    before = _hashes(root)
    env = {"SAMED_ADAPTERS": str(root)}
    res = _samed("info", env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = {
        ln.split()[0]: ln for ln in res.stdout.splitlines() if ln.startswith("  ") and ln.split()
    }
    assert "UNUSABLE" in lines["list-config"] and "holds a list" in lines["list-config"]
    assert "UNUSABLE" in lines["bad-key"] and "'labels'" in lines["bad-key"]
    assert "UNUSABLE" not in lines["good"] and "automatic" in lines["good"]
    listed = _samed("adapters", "list", "--json", env=env, cwd=tmp_path)
    rows = {a["name"]: a for a in json.loads(listed.stdout)}
    assert "unusable" not in rows["good"] and "unusable" in rows["bad-key"]
    monkeypatch.setenv("SAMED_ADAPTERS", str(root))
    assert resolve_adapter("good") == good.resolve()
    assert [a.name for a in find_adapters() if a.path.parent == root] == ["good"]
    with pytest.raises(ValueError, match="'list-config'.*cannot be used.*holds a list"):
        resolve_adapter("list-config")
    assert _hashes(root) == before
