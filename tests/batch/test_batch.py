"""Batch segmentation (`samed segment`) on small real files with a tiny random model.

One prompted batch over a 3-slice DICOM CT series, a 4-slice NIfTI CT crop and a broken file is
run once per module (encoders are the slow part); the tests then check its outputs, the summary,
resuming, overwriting, the CLI, automatic mode with a tiny automatic adapter, and the CUDA
out-of-memory fallback with an encoder that raises it.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from realdata import shared_path

from samed.batch import add_parser, discover_cases, run_segment, segment_batch
from samed.batch.run import _OomFallbackModel, _propagate
from samed.engine import Prediction, Session
from samed.io import load_volume

SEED = 2  # a tiny random model whose box masks are neither empty nor the whole slice here


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small real inputs: 3 DICOM slices, a 4-slice NIfTI crop, a broken .nii.gz."""
    root = tmp_path_factory.mktemp("inputs")
    series = shared_path("totalsegmentator", "dicom_ct", "example_ct_dicom")
    files = sorted(p for p in series.iterdir() if p.is_file())
    zpos = [
        float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files
    ]
    ordered = [f for _, f in sorted(zip(zpos, files, strict=True))]
    dicom = root / "dicom" / "study1"
    dicom.mkdir(parents=True)
    for f in ordered[9:12]:
        shutil.copy(f, dicom / f.name)
    ct = nib.load(shared_path("totalsegmentator", "ct_3mm", "example_ct_sm.nii.gz"))
    data = np.asarray(ct.dataobj)[:, :, 10:14]
    affine = ct.affine.copy()
    affine[:3, 3] = (ct.affine @ [0, 0, 10, 1])[:3]
    nifti = root / "nifti" / "ct_crop.nii.gz"
    nifti.parent.mkdir()
    nib.save(nib.Nifti1Image(data, affine), nifti)
    broken = root / "broken" / "broken.nii.gz"
    broken.parent.mkdir()
    broken.write_bytes(b"\x1f\x8b this is not a NIfTI file" * 10)
    return {"root": root, "dicom": root / "dicom", "nifti": nifti, "broken": broken}


@pytest.fixture(scope="module")
def tiny(make_tiny_model) -> object:
    return make_tiny_model("tinyvit", seed=SEED)


@pytest.fixture(scope="module")
def prompts_file(inputs: dict[str, Path]) -> Path:
    cases = {
        c.path.name if not c.is_dicom else "dicom": c for c in discover_cases([inputs["dicom"]])
    }
    dicom_id = cases["dicom"].case_id
    entries = [
        {"case": "ct_crop", "label": 5, "name": "liver", "slice": 1, "box": [20, 30, 70, 80]},
        {"case": "ct_crop", "label": 1, "name": "spleen", "slice": 2, "box": [80, 40, 110, 70]},
        {"case": dicom_id, "label": 5, "name": "liver", "slice": 1, "box": [60, 150, 260, 380]},
    ]
    path = inputs["root"] / "prompts.json"
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def first_run(inputs, tiny, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    before = _snapshot(inputs["root"])
    events = []
    summary = segment_batch(
        [inputs["dicom"], inputs["nifti"], inputs["broken"]],
        out,
        prompts=prompts_file,
        model=tiny,
        progress=events.append,
    )
    return {"out": out, "summary": summary, "events": events, "before": before}


def test_discover_cases_ids_are_stable_and_unique(inputs, tmp_path):
    cases = discover_cases([inputs["dicom"], inputs["nifti"], inputs["broken"]])
    assert [c.case_id for c in cases][1:] == ["ct_crop", "broken"]
    dicom = cases[0]
    assert dicom.is_dicom and dicom.path == inputs["dicom"].resolve()
    # <PatientID>_<SeriesDescription>_<8 hex of sha1(SeriesInstanceUID)>, sanitized
    assert dicom.case_id.rsplit("_", 1)[1].isalnum() and len(dicom.case_id.rsplit("_", 1)[1]) == 8
    assert all(ch.isalnum() or ch in "._-" for ch in dicom.case_id)
    assert discover_cases([inputs["dicom"]])[0].case_id == dicom.case_id  # stable
    # two files with one stem: both get a path hash, independent of the order
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        shutil.copy(inputs["nifti"], tmp_path / sub / "ct.nii.gz")
    ids = [c.case_id for c in discover_cases([tmp_path / "a", tmp_path / "b"])]
    ids_rev = [c.case_id for c in discover_cases([tmp_path / "b", tmp_path / "a"])]
    assert len(set(ids)) == 2 and all(i.startswith("ct_") for i in ids)
    assert sorted(ids) == sorted(ids_rev)
    # a folder holding image files and the same file named twice: one case each
    assert len(discover_cases([tmp_path / "a", tmp_path / "a" / "ct.nii.gz"])) == 1
    missing = discover_cases([tmp_path / "nope.nii.gz"])[0]
    assert missing.case_id == "nope" and "does not exist" in missing.error


def test_outputs_for_good_cases(first_run, inputs):
    out, summary = first_run["out"], first_run["summary"]
    rows = {r.case: r for r in summary.results}
    dicom_id = next(c for c in rows if c not in ("ct_crop", "broken"))
    assert rows["ct_crop"].status == "ok" and rows[dicom_id].status == "ok"
    for case in ("ct_crop", dicom_id):
        folder = out / case
        for name in ("labels.nii.gz", "qc.png", "case.json"):
            assert (folder / name).is_file(), name
    # NIfTI label map on the exact source grid
    src = load_volume(inputs["nifti"])
    lab = nib.load(out / "ct_crop" / "labels.nii.gz")
    assert lab.shape == src.array.T.shape
    np.testing.assert_allclose(lab.affine, src.affine, atol=1e-4)
    values = set(np.unique(np.asarray(lab.dataobj)).tolist())
    assert values <= {0, 1, 5} and values & {1, 5}
    assert rows["ct_crop"].labels == {5: "liver", 1: "spleen"}
    # DICOM SEG only for the DICOM case, readable by highdicom, referencing the source series
    assert not (out / "ct_crop" / "seg.dcm").exists()
    import highdicom as hd

    seg = hd.seg.segread(out / dicom_id / "seg.dcm")
    ref = load_volume(inputs["dicom"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ref.meta["SeriesInstanceUID"]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver"]
    dlab = nib.load(out / dicom_id / "labels.nii.gz")
    np.testing.assert_allclose(dlab.affine, ref.affine, atol=1e-4)
    from PIL import Image

    with Image.open(out / "ct_crop" / "qc.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_broken_file_is_an_error_row_and_summary_is_complete(first_run):
    out, summary = first_run["out"], first_run["summary"]
    assert [r.case for r in summary.results][1:] == ["ct_crop", "broken"]
    broken = summary.results[2]
    assert broken.status == "error" and "broken.nii.gz" in broken.error
    assert summary.exit_code == 1
    assert not (out / "broken" / "case.json").exists()
    data = json.loads((out / "summary.json").read_text())
    assert data["counts"] == {"ok": 2, "skipped": 0, "error": 1}
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["ok", "ok", "error"]
    assert {"case", "source", "status", "seconds", "error", "volume_ml_liver"} <= set(rows[0])
    crop = rows[1]
    liver_ml = float(crop["volume_ml_liver"])
    labels = np.asarray(nib.load(out / "ct_crop" / "labels.nii.gz").dataobj)
    zooms = nib.load(out / "ct_crop" / "labels.nii.gz").header.get_zooms()
    voxel_ml = float(np.prod(zooms)) / 1000.0
    assert liver_ml == pytest.approx((labels == 5).sum() * voxel_ml, rel=1e-3)
    assert float(crop["seconds"]) > 0 and rows[2]["error"]


def test_progress_events_per_case_and_overall(first_run):
    events = first_run["events"]
    assert {e.n_cases for e in events} == {3}
    ends = [e for e in events if e.stage == "end"]
    assert [e.case_index for e in ends] == [0, 1, 2]
    seg = [e for e in events if e.stage == "segment" and e.case_id == "ct_crop"]
    assert seg and seg[-1].done == seg[-1].total


def test_nothing_written_inside_inputs_and_no_temporary_files(first_run, inputs):
    assert _snapshot(inputs["root"]) == first_run["before"]
    assert not [p for p in first_run["out"].rglob("*") if p.name.startswith(".tmp")]
    with pytest.raises(ValueError, match="inside the input folder"):
        segment_batch([inputs["dicom"]], inputs["dicom"] / "out", prompts="x.json")


def test_second_run_skips_finished_cases_then_overwrite_redoes(
    first_run, inputs, tiny, prompts_file
):
    out = first_run["out"]
    mtimes = _snapshot(out / "ct_crop")
    again = segment_batch(
        [inputs["dicom"], inputs["nifti"], inputs["broken"]], out, prompts=prompts_file, model=tiny
    )
    assert [r.status for r in again.results] == ["skipped", "skipped", "error"]
    assert again.results[1].volumes_ml == first_run["summary"].results[1].volumes_ml
    assert _snapshot(out / "ct_crop") == mtimes
    assert json.loads((out / "summary.json").read_text())["counts"]["skipped"] == 2
    redo = segment_batch([inputs["nifti"]], out, prompts=prompts_file, model=tiny, overwrite=True)
    assert [r.status for r in redo.results] == ["ok"] and redo.exit_code == 0
    assert redo.results[0].volumes_ml == first_run["summary"].results[1].volumes_ml


def test_changed_settings_are_reported_not_silently_kept(first_run, inputs, tiny, prompts_file):
    entries = json.loads(prompts_file.read_text())
    entries[0]["box"] = [25, 30, 70, 80]
    changed = prompts_file.with_name("changed.json")
    changed.write_text(json.dumps(entries))
    res = segment_batch([inputs["nifti"]], first_run["out"], prompts=changed, model=tiny)
    assert res.results[0].status == "error" and "--overwrite" in res.results[0].error
    assert "prompts" in res.results[0].error


def test_cli_parser_and_exit_codes(inputs, tiny, prompts_file, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="samed")
    add_parser(parser.add_subparsers())
    monkeypatch.setattr("samed.model.build_model", lambda *a, **k: tiny)
    out = tmp_path / "cli"
    args = parser.parse_args(
        [
            "segment",
            str(inputs["nifti"]),
            "-o",
            str(out),
            "--prompts",
            str(prompts_file),
            "--format",
            "nifti",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--quiet",
            "--no-qc",
        ]
    )
    assert args.func is run_segment
    assert run_segment(args) == 0
    printed = capsys.readouterr().out
    assert "ct_crop" in printed and "1 segmented" in printed
    assert sorted(p.name for p in (out / "ct_crop").iterdir()) == ["case.json", "labels.nii.gz"]
    args = parser.parse_args(
        [
            "segment",
            str(inputs["broken"]),
            "-o",
            str(out),
            "--prompts",
            str(prompts_file),
            "--quiet",
        ]
    )
    assert run_segment(args) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "nothing to do"),
        ({"prompts": "p.json", "formats": "nifti,png"}, "not in the allowed"),
        ({"prompts": "p.json", "window": "lungs"}, "window 'lungs' is not one of"),
        ({"prompts": "p.json", "batch_size": 0}, "batch_size=0"),
        ({"prompts": "p.json", "min_slice_iou": 1.5}, r"min_slice_iou=1.5 must be in \[0, 1\)"),
    ],
)
def test_bad_options_raise_value_errors(kwargs, match, tiny, tmp_path, inputs):
    (tmp_path / "p.json").write_text("[]")
    kwargs = {k: (str(tmp_path / v) if k == "prompts" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        segment_batch([inputs["nifti"]], tmp_path / "out", model=tiny, **kwargs)


def test_case_without_prompts_is_an_error_row(inputs, tiny, tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("case,label,name,slice,box\nother,1,liver,0,1 1 5 5\n")
    res = segment_batch([inputs["nifti"]], tmp_path / "out", prompts=p, model=tiny)
    assert (
        res.results[0].status == "error" and "no prompts for case 'ct_crop'" in res.results[0].error
    )


@pytest.fixture(scope="module")
def automatic_adapter(tmp_path_factory, make_tiny_model) -> Path:
    from samed.lora import LoraConfig, apply_lora, save_adapter

    model = make_tiny_model("tinyvit", seed=SEED)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    folder = tmp_path_factory.mktemp("adapters") / "tiny-auto"
    return save_adapter(model, folder, labels={0: "background", 1: "liver", 2: "spleen"})


def test_automatic_mode_with_a_tiny_automatic_adapter(
    inputs, automatic_adapter, tmp_path, make_tiny_model
):
    model = make_tiny_model("tinyvit", seed=SEED)
    res = segment_batch(
        [inputs["nifti"]], tmp_path / "out", adapter=automatic_adapter, model=model, batch_size=4
    )
    row = res.results[0]
    assert res.mode == "automatic" and row.status == "ok", row.error
    assert row.labels == {1: "liver", 2: "spleen"} and set(row.volumes_ml) == {"liver", "spleen"}
    lab = np.asarray(nib.load(tmp_path / "out" / "ct_crop" / "labels.nii.gz").dataobj)
    assert set(np.unique(lab).tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="automatic"):
        segment_batch(
            [inputs["nifti"]],
            tmp_path / "o2",
            adapter=automatic_adapter,
            model=make_tiny_model("tinyvit", seed=SEED),
            prompts=tmp_path / "x.json",
        )


class _OomEncoder:
    """A test double of one failure mode: an encoder that raises CUDA OOM above ``limit`` slices."""

    def __init__(self, encode, limit: int) -> None:
        self.encode, self.limit, self.calls = encode, limit, []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(images.shape[0]))
        if images.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.encode(images)


def test_oom_fallback_halves_the_batch_and_gives_the_same_embeddings(tiny):
    x = torch.rand(4, 3, 256, 256)
    with torch.inference_mode():
        want = tiny.encode(x)
        fake = _OomEncoder(tiny.encode, limit=2)
        wrapped = _OomFallbackModel(SimpleNamespace(encode=fake))
        got = wrapped.encode(x)
    torch.testing.assert_close(got, want)
    assert fake.calls == [4, 2, 2] and wrapped.max_batch == 2 and wrapped.oom_events == 1
    single = _OomFallbackModel(SimpleNamespace(encode=_OomEncoder(tiny.encode, limit=0)))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        single.encode(x[:1])  # one slice that does not fit is a real failure


def test_oom_fallback_inside_a_session(inputs, monkeypatch, make_tiny_model):
    model = make_tiny_model("tinyvit", seed=SEED)
    vol = load_volume(inputs["nifti"]).array[:3]
    ref = Session(model, vol, intensity="abdomen", batch_size=4)
    ref.embed()
    fake = _OomEncoder(model.encode, limit=1)
    monkeypatch.setattr(model, "encode", fake)
    proxy = _OomFallbackModel(model)
    ses = Session(proxy, vol, intensity="abdomen", batch_size=4)
    ses.embed()
    # 3 slices: OOM at 3 -> halves to 1 -> then one slice at a time
    assert proxy.max_batch == 1 and fake.calls == [3, 1, 1, 1]
    for z in range(vol.shape[0]):
        torch.testing.assert_close(ses.embedding(z), ref.embedding(z))


def _drifting_square(z: int) -> np.ndarray:
    """A square that drifts 1 px per slice away from z=2, then jumps sideways at z=6."""
    m = np.zeros((32, 32), dtype=bool)
    x = 4 + abs(z - 2) if z < 6 else 20
    m[8:18, x : x + 10] = True
    return m


def test_propagation_stops_where_the_object_jumps(tiny, monkeypatch):
    # the engine's own walk and stop rules; only the decoder's answer per slice is scripted
    vol = np.random.default_rng(0).random((10, 32, 32)).astype(np.float32)
    s = Session(tiny, vol, intensity="minmax")
    monkeypatch.setattr(
        s,
        "predict_full",
        lambda z, **kw: Prediction(
            mask=_drifting_square(z), score=0.9, low_res_logits=torch.zeros(256, 256)
        ),
    )
    visited: list[int] = []
    out = _propagate(s, 2, _drifting_square(2), 0.7, visited.append)
    assert np.nonzero(out.any(axis=(1, 2)))[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert visited == list(range(1, 7))  # z 3..6 forward (6 stops it), 1..0 backward
    everything = _propagate(s, 2, _drifting_square(2), 0.0, lambda done: None)
    assert everything.any(axis=(1, 2)).all()
