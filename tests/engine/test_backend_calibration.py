"""``auto``'s automatic check sees the calibration slices as the adapter does (issue #15,
session 9): a Session prepares them with the adapter's recorded intensity, spacing / canvas and
orientation, on training volumes of the adapter's modality; the choices.json key of the
automatic check changed with it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from realdata import shared_path  # noqa: E402

from samed.engine import Session  # noqa: E402
from samed.engine.backend_calibration import AUTOMATIC_CHECK_VERSION  # noqa: E402
from samed.engine.backends import native_bf16, set_encoder_backend  # noqa: E402

WINDOW = ["window", -125, 275]


@pytest.fixture
def calib_root(tmp_path, monkeypatch) -> Path:
    """A calibration folder with BTCV (CT) and ACDC (MR), through the documented variable."""
    root = tmp_path / "calib"
    root.mkdir()
    for name in ("btcv", "acdc"):
        (root / name).symlink_to(shared_path(name))
    monkeypatch.setenv("SAMED_CALIBRATION_DATA", str(root))
    return root


def _automatic_model(make_tiny_model, tmp_path: Path, preprocessing: dict | None):
    """A tiny automatic model (14 classes, a head that predicts classes), saved with
    ``preprocessing`` in its metadata.json and loaded back (None: left unsaved)."""
    from samed.lora import LoraConfig, apply_lora, load_adapter, save_adapter

    model = make_tiny_model("tinyvit", seed=3)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=14))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.mask_decoder.output_hypernetworks_mlps.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    if preprocessing is None:
        return model
    folder = save_adapter(
        model,
        tmp_path / "adapter",
        labels={i: f"c{i}" for i in range(14)},
        metadata={"preprocessing": preprocessing},
    )
    return load_adapter(make_tiny_model("tinyvit", seed=3), folder)


def test_ct_adapter_check_input_is_what_session_automatic_feeds_the_encoder(
    make_tiny_model, tmp_path, calib_root
):
    """For an adapter recording CT, a HU window, 1.5 mm and LAS, the check's slices are BTCV
    training slices, and its encoder input and class maps are exactly those of
    ``Session.automatic`` on the same volume and slices, not the generic preparation."""
    from samed.engine.backend_auto import _encoder_input, calibration_data_root
    from samed.engine.backend_calibration import automatic_cases, automatic_outputs
    from samed.engine.preprocess import resolve_intensity
    from samed.io import load_volume
    from samed.train.interactive_data import BTCV_VAL

    pre = {"intensity": WINDOW, "modality": "CT", "spacing": [1.5, 1.5], "orientation": "LAS"}
    model = _automatic_model(make_tiny_model, tmp_path, pre)
    assert model.adapter.intensity == WINDOW and model.adapter.spacing == (1.5, 1.5)
    cases = automatic_cases(model, 6, calibration_data_root())
    assert {c.dataset for c in cases} == {"btcv"} and len(cases) == 2
    assert not {c.case_id for c in cases} & BTCV_VAL
    assert sum(len(c.slices) for c in cases) == 6
    labels, x, emb = automatic_outputs(model, cases)
    assert x.shape == (6, 3, 256, 256) and emb.shape[0] == 6 and len(labels) == 6

    # what Session.automatic itself feeds the encoder for the first case's slices
    case = cases[0]
    seen: list[torch.Tensor] = []
    handle = model.image_encoder.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].detach().clone())
    )
    try:
        vol = load_volume(shared_path("btcv", "imagesTr", f"{case.case_id}.nii.gz"))
        session = Session(model, vol, modality="CT", cache_dir=None)
        out = session.automatic(slices=case.slices, postprocess="none")
    finally:
        handle.remove()
    assert session.preprocessing["intensity_source"] == "adapter"
    k = len(case.slices)
    fed = torch.cat(seen)
    assert fed.shape == x[:k].shape and torch.equal(fed, x[:k])
    for i, z in enumerate(case.slices):
        np.testing.assert_array_equal(labels[i], out[z])

    # the generic preparation of the old check (intensity "auto" on the slice's own grid) is
    # another input: the window and the 1.5 mm canvas change what the encoder sees
    arr = np.asarray(vol.array, np.float32)
    _, fn = resolve_intensity("auto", arr, "CT")
    generic = _encoder_input(model, [fn(arr)[z] for z in case.slices])
    assert float((generic - x[:k]).abs().max()) > 0.1


def test_check_slices_follow_the_adapter_modality(make_tiny_model, tmp_path, calib_root):
    """MR adapter: ACDC (MR) training slices only; an adapter recording no modality: CT and MR
    in turn; never a validation case."""
    from samed.datasets import load_dataset
    from samed.engine.backend_auto import calibration_data_root
    from samed.engine.backend_calibration import adapter_modality, automatic_cases

    mr = _automatic_model(make_tiny_model, tmp_path, {"intensity": "auto", "modality": "MR"})
    assert adapter_modality(mr) == "MR"
    cases = automatic_cases(mr, 6, calibration_data_root())
    val = {c.case_id for c in load_dataset(shared_path("acdc")).split("val")}
    assert {c.dataset for c in cases} == {"acdc"} and not {c.case_id for c in cases} & val
    assert sum(len(c.slices) for c in cases) == 6
    unsaved = _automatic_model(make_tiny_model, tmp_path, None)
    assert adapter_modality(unsaved) is None
    both = automatic_cases(unsaved, 6, calibration_data_root())
    assert [c.dataset for c in both] == ["btcv", "acdc"]


def test_covering_slices_show_a_class_that_lives_on_one_slice():
    """A small class present on a single slice, away from the evenly spread positions, is on
    one of the chosen slices; the other picks are spread; ``seen`` classes need no slice."""
    from samed.engine.backend_calibration import _spread, covering_slices

    lab = np.zeros((20, 32, 32), np.uint8)
    lab[2:18, 4:28, 4:28] = 1  # a large organ on every labelled slice
    lab[3, 10:18, 10:18] = 2  # a small organ (64 px) on slice 3 only
    assert 3 not in _spread(list(range(2, 18)), 3)  # the old choice never sees class 2
    zs = covering_slices(lab, 3)
    assert 3 in zs and len(zs) == 3
    assert covering_slices(lab, 3, seen={1, 2}) == _spread(list(range(2, 18)), 3)
    assert covering_slices(lab, 1) == [3]  # the slice showing both classes comes first


def test_btcv_check_slices_show_every_organ(make_tiny_model, tmp_path, calib_root):
    """CT adapter: on each BTCV calibration volume the chosen slices show all 13 organs with at
    least MIN_PIXELS each (session 9's even spread showed no adrenal on btcv_0005, and abdomen-ct's
    left adrenal then moved by 0.020 on BTCV val under the backend auto had passed)."""
    from samed.datasets import load_dataset
    from samed.engine.backend_auto import calibration_data_root
    from samed.engine.backend_calibration import MIN_PIXELS, automatic_cases
    from samed.io import load_label_map

    btcv = load_dataset(shared_path("btcv"))
    ct = _automatic_model(make_tiny_model, tmp_path, {"intensity": WINDOW, "modality": "CT"})
    cases = automatic_cases(ct, 6, calibration_data_root())
    assert [c.case_id for c in cases] == ["btcv_0005", "btcv_0006"]
    for c in cases:
        label = next(k.label for k in btcv.cases if k.case_id == c.case_id)
        lab = np.asarray(load_label_map(label, reference=c.volume).array)
        shown = set()
        for z in c.slices:
            vals, counts = np.unique(lab[z], return_counts=True)
            shown |= {int(v) for v, n in zip(vals, counts, strict=True) if v and n >= MIN_PIXELS}
        assert shown == set(range(1, 14)), (c.case_id, c.slices, sorted(shown))


def test_automatic_check_key_differs_from_the_old_check(make_tiny_model, tmp_path):
    """The automatic check's choices.json key is not the session-8 one (so its refusals are not
    reused); the box check's key is unchanged (base-model choices keep their entries)."""
    from samed.engine.backend_auto import _BAR_VERSION, _machine_key, choice_key

    runnable = ["torch-bf16", "torch-fp32"]
    base = make_tiny_model("tinyvit")
    old_box = {**_machine_key(base), "candidates": runnable, "bar": _BAR_VERSION}
    assert choice_key(base, runnable) == json.dumps(old_box, sort_keys=True)
    model = _automatic_model(make_tiny_model, tmp_path, None)
    old = {**_machine_key(model), "candidates": runnable, "bar": _BAR_VERSION}
    old["check"] = f"automatic {model.adapter_digest}"
    assert choice_key(model, runnable) != json.dumps(old, sort_keys=True)


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16")
def test_an_old_automatic_choice_is_measured_again(
    make_tiny_model, tmp_path, calib_root, monkeypatch, capsys
):
    """A choices.json entry of the session-8 automatic check (here: torch-bf16 chosen) is not
    reused: ``auto`` measures again with the new check and records both entries."""
    from samed.engine.backend_auto import _BAR_VERSION, _machine_key, auto_candidates

    cache = tmp_path / "backends"
    monkeypatch.setenv("SAMED_BACKEND_CACHE", str(cache))
    monkeypatch.setenv("SAMED_NO_OPENVINO", "1")  # torch candidates only: fast
    model = _automatic_model(make_tiny_model, tmp_path, None)
    runnable, _ = auto_candidates("auto", "auto")
    old = {**_machine_key(model), "candidates": runnable, "bar": _BAR_VERSION}
    old["check"] = f"automatic {model.adapter_digest}"
    cache.mkdir()
    stale = {"choice": "torch-bf16", "results": {"torch-bf16": {"ok": True, "speedup": 9.0}}}
    (cache / "choices.json").write_text(json.dumps({json.dumps(old, sort_keys=True): stale}))
    be = set_encoder_backend(model, "auto", "auto")
    assert "measuring encoder candidates" in capsys.readouterr().err
    data = json.loads((cache / "choices.json").read_text())
    assert len(data) == 2
    (new,) = (
        v
        for k, v in data.items()
        if json.loads(k).get("automatic_check") == AUTOMATIC_CHECK_VERSION
    )
    assert new["choice"] == be.name
    ref = new["results"]["torch-fp32"]
    assert ref["inputs"] == "session" and len(ref["slices"]) == 6
