"""CPU encoder backends (samed.engine.backends): each candidate against torch fp32 on real
slices, fallbacks with a notice, ``auto``'s measurement and cache, cache keys per backend."""

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
from samed.engine.backends import (  # noqa: E402
    CANDIDATES,
    EncoderBackend,
    build_candidate,
    native_bf16,
    openvino_available,
    set_encoder_backend,
    unsupported_reason,
)

needs_openvino = pytest.mark.skipif(
    not openvino_available(), reason="OpenVINO is not installed (pip install 'samed[openvino]')"
)
needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16")


def _acdc(n: int = 3) -> tuple[np.ndarray, list[list[float]]]:
    """n labelled mid-ventricular ACDC slices (a training case) and one GT box (+5 px) each."""
    import nibabel as nib

    from samed.engine import mask_bbox

    img = shared_path("acdc", "imagesTr", "patient099_frame01.nii.gz")
    lab = shared_path("acdc", "labelsTr", "patient099_frame01.nii.gz")
    vol = nib.load(img).get_fdata(dtype=np.float32).transpose(2, 1, 0)
    seg = np.asarray(nib.load(lab).dataobj).transpose(2, 1, 0).astype(int)
    zs = [z for z in range(seg.shape[0]) if (seg[z] == 3).sum() > 50][:n]
    boxes = [list(map(float, mask_bbox(seg[z] == 3, 5))) for z in zs]
    return vol[zs], boxes


def _masks(model, slices: np.ndarray, boxes: list) -> list[np.ndarray]:
    s = Session(model, slices, intensity="minmax", cache_dir=None)
    return [s.predict(z, box=b) for z, b in enumerate(boxes)]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum()) + int(b.sum()))


@pytest.fixture
def no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SAMED_BACKEND_CACHE", str(tmp_path / "backends"))
    return tmp_path / "backends"


@pytest.mark.parametrize(
    "name,min_dice",
    [
        pytest.param("openvino-fp32", 0.999, marks=needs_openvino),
        pytest.param("openvino-bf16", 0.95, marks=[needs_openvino, needs_bf16]),
        pytest.param("torch-bf16", 0.95, marks=needs_bf16),
        pytest.param("torch-mixed", 0.95, marks=needs_bf16),
    ],
)
def test_candidate_masks_match_torch_fp32_tiny(make_tiny_model, no_cache, name, min_dice):
    slices, boxes = _acdc()
    ref = make_tiny_model("tinyvit")
    model = make_tiny_model("tinyvit")
    be = set_encoder_backend(model, *name.split("-"))
    assert be.name == name and be.chosen_by == "request" and be.run is not None
    x = torch.rand(2, 3, 256, 256)
    with torch.inference_mode():
        e_ref, e = ref.encode(x), model.encode(x)
    assert e.shape == e_ref.shape and e.dtype == torch.float32
    rel = float((e - e_ref).norm() / e_ref.norm())
    assert rel < (1e-4 if name.endswith("fp32") else 0.1), rel
    for a, b in zip(_masks(ref, slices, boxes), _masks(model, slices, boxes), strict=True):
        assert _dice(a, b) >= min_dice


@pytest.mark.slow
@needs_openvino
def test_openvino_litemedsam_real_slices_and_disk_cache(no_cache):
    from samed.model import load_model

    slices, boxes = _acdc()
    ref = load_model("litemedsam", device="cpu")
    ov = load_model("litemedsam", device="cpu", backend="openvino", precision="fp32")
    assert ov.encoder_backend.name == "openvino-fp32"
    for a, b in zip(_masks(ref, slices, boxes), _masks(ov, slices, boxes), strict=True):
        assert a.sum() > 50 and _dice(a, b) >= 0.999
    # the converted IR was written once, atomically, and is read back by the next load
    xml = list(no_cache.glob("openvino/*-256-fp32/encoder.xml"))
    assert len(xml) == 1 and not list(no_cache.glob("openvino/.tmp-samed-*"))
    again = build_candidate(ov, "openvino-fp32", cache=no_cache)
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.allclose(again.run(x), ov.encode(x), atol=1e-5)


def test_missing_openvino_falls_back_with_a_notice(make_tiny_model, no_cache, monkeypatch, capsys):
    monkeypatch.setenv("SAMED_NO_OPENVINO", "1")
    model = make_tiny_model("tinyvit")
    be = set_encoder_backend(model, "openvino", "fp32")
    err = capsys.readouterr().err.strip().splitlines()
    assert be.name == "torch-fp32" and be.chosen_by == "fallback" and be.run is None
    assert len(err) == 1 and "OpenVINO is not installed" in err[0] and "torch fp32" in err[0]
    # the model still encodes, through torch
    with torch.inference_mode():
        assert model.encode(torch.rand(1, 3, 256, 256)).shape[1:] == (256, 64, 64)
    # auto on an AVX2-only CPU without OpenVINO: torch fp32 at once, no measurement, no notice
    monkeypatch.setenv("SAMED_CPU_FLAGS", "avx2,fma")
    be = set_encoder_backend(model, "auto", "auto")
    assert be.name == "torch-fp32" and be.chosen_by == "auto" and capsys.readouterr().err == ""
    assert not no_cache.exists()


def test_unsupported_precision_falls_back_with_a_notice(
    make_tiny_model, no_cache, monkeypatch, capsys
):
    monkeypatch.setenv("SAMED_CPU_FLAGS", "avx2,fma")  # an AVX2 CPU: no native bf16, no VNNI
    assert "no native bf16" in unsupported_reason("torch", "bf16")
    if openvino_available():  # int8 without VNNI: refused with what was measured on such a CPU
        assert "no int8 dot-product" in unsupported_reason("openvino", "int8")
        assert "0.80-0.94x of OpenVINO fp32" in unsupported_reason("openvino", "int8")
    model = make_tiny_model("tinyvit")
    be = set_encoder_backend(model, "torch", "bf16")
    err = capsys.readouterr().err.strip().splitlines()
    assert be.name == "torch-fp32" and be.chosen_by == "fallback"
    assert len(err) == 1 and "bf16" in err[0]
    be = set_encoder_backend(model, "torch", "int8")
    assert be.name == "torch-fp32" and "int8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="backend='onnx' must be one of"):
        set_encoder_backend(model, "onnx", "fp32")
    with pytest.raises(ValueError, match="precision='fp64' must be one of"):
        set_encoder_backend(model, "torch", "fp64")


def test_cache_keys_of_backends_never_collide(make_tiny_model):
    model = make_tiny_model("tinyvit")
    vol = np.random.default_rng(0).random((2, 40, 50)).astype(np.float32)
    plain = Session(model, vol, cache_dir=None).cache_key
    keys = {}
    for name in CANDIDATES:
        b, p = name.split("-")
        model.encoder_backend = EncoderBackend(b, p, adapter_digest=model.adapter_digest)
        s = Session(model, vol, cache_dir=None)
        keys[name] = s.cache_key
        assert s.encoder == ("fp32" if name == "torch-fp32" else name)
    assert len(set(keys.values())) == len(CANDIDATES)
    # torch fp32 keeps the key CPU embeddings always had (existing disk caches stay valid)
    assert keys["torch-fp32"] == plain


@needs_openvino
def test_auto_measures_once_caches_and_never_picks_a_slower_path(
    make_tiny_model, no_cache, monkeypatch, tmp_path, capsys
):
    # calibration from the ACDC training cases only (fast), through the documented variable
    root = tmp_path / "calib"
    root.mkdir()
    (root / "acdc").symlink_to(shared_path("acdc"))
    monkeypatch.setenv("SAMED_CALIBRATION_DATA", str(root))
    model = make_tiny_model("tinyvit")
    be = set_encoder_backend(model, "auto", "fp32")  # candidates torch-fp32, openvino-fp32
    assert "measuring encoder candidates openvino-fp32, torch-fp32" in capsys.readouterr().err
    data = json.loads((no_cache / "choices.json").read_text())
    (entry,) = data.values()
    res = entry["results"]
    assert entry["choice"] == be.name and be.chosen_by == "auto"
    assert (
        res["openvino-fp32"]["mean_dice"] >= 0.99
        and res["openvino-fp32"]["embedding_rel_err"] < 1e-4
    )
    if be.name != "torch-fp32":
        assert res[be.name]["s_per_slice"] * 1.05 <= res["torch-fp32"]["s_per_slice"]
    # second use: read from the cache, no measurement
    again = set_encoder_backend(make_tiny_model("tinyvit"), "auto", "fp32")
    assert again.name == be.name and "measuring" not in capsys.readouterr().err
    # another model (other weights: e.g. a merged adapter) has its own entry
    from samed.engine.backend_auto import _machine_key

    assert _machine_key(make_tiny_model("tinyvit", seed=1)) != _machine_key(model)


@needs_openvino
def test_adapter_change_after_build_falls_back_to_torch(make_tiny_model, no_cache, capsys):
    from samed.lora import LoraConfig, apply_lora

    model = make_tiny_model("tinyvit")
    set_encoder_backend(model, "openvino", "fp32")
    apply_lora(model, LoraConfig())  # a new (unsaved) adapter after the conversion
    with torch.inference_mode():
        model.encode(torch.rand(1, 3, 256, 256))
    assert "adapter changed" in capsys.readouterr().err and model.encoder_backend is None
    ref = make_tiny_model("tinyvit")
    apply_lora(ref, LoraConfig())
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        assert torch.allclose(model.encode(x), ref.encode(x), atol=1e-5)


@pytest.mark.parametrize("cmd", ["segment", "evaluate", "demo"])
def test_cli_backend_and_precision_options(cmd, monkeypatch):
    from samed.cli import build_parser

    extra = {"segment": ["in.nii.gz", "--out", "o"], "evaluate": ["--data", "d"], "demo": []}
    args = build_parser().parse_args([cmd, *extra[cmd]])
    assert (args.backend, args.precision) == ("torch", "auto")  # today's path unless asked
    args = build_parser().parse_args(
        [cmd, *extra[cmd], "--backend", "openvino", "--precision", "int8"]
    )
    assert (args.backend, args.precision) == ("openvino", "int8")
    with pytest.raises(SystemExit):
        build_parser().parse_args([cmd, *extra[cmd], "--backend", "onnx"])
    monkeypatch.setenv("SAMED_BACKEND", "auto")  # a machine-wide default
    assert build_parser().parse_args([cmd, *extra[cmd]]).backend == "auto"


def test_cpu_request_keeps_torch_auto_at_fp32():
    from samed.registry import cpu_request

    assert cpu_request("torch", "auto") == ("torch", "fp32")
    assert cpu_request("auto", "auto") == ("auto", "auto")
    assert cpu_request("openvino", "int8") == ("openvino", "int8")


def test_auto_candidates_follow_the_cpu_flags_and_leave_int8_to_a_request(monkeypatch):
    from samed.engine.backend_auto import auto_candidates

    monkeypatch.delenv("SAMED_NO_OPENVINO", raising=False)
    ov = openvino_available()
    # an AMX Xeon: bf16 candidates first (expected fastest), torch fp32 last, no int8 unless asked
    monkeypatch.setenv("SAMED_CPU_FLAGS", "avx2,fma,avx512f,avx512_vnni,avx512_bf16,amx_bf16")
    runnable, wanted = auto_candidates("auto", "auto")
    assert "openvino-int8" not in wanted and runnable[-1] == "torch-fp32"
    assert runnable == (
        ["openvino-bf16", "torch-bf16", "torch-mixed", "openvino-fp32", "torch-fp32"]
        if ov
        else ["torch-bf16", "torch-mixed", "torch-fp32"]
    )
    runnable, _ = auto_candidates("auto", "int8")
    assert runnable == (["openvino-int8", "torch-fp32"] if ov else ["torch-fp32"])
    # an AVX2-only CPU: never a bf16 candidate (~40x slower there), never int8 (no VNNI)
    monkeypatch.setenv("SAMED_CPU_FLAGS", "avx2,fma")
    for precision in ("auto", "bf16", "int8", "mixed"):
        runnable, _ = auto_candidates("auto", precision)
        assert not [c for c in runnable if c.endswith(("bf16", "int8", "mixed"))], runnable
    assert auto_candidates("auto", "auto")[0] == (
        ["openvino-fp32", "torch-fp32"] if ov else ["torch-fp32"]
    )


@needs_openvino
def test_auto_on_an_avx2_only_cpu_measures_no_bf16(
    make_tiny_model, no_cache, monkeypatch, tmp_path, capsys
):
    root = tmp_path / "calib"
    root.mkdir()
    (root / "acdc").symlink_to(shared_path("acdc"))
    monkeypatch.setenv("SAMED_CALIBRATION_DATA", str(root))
    monkeypatch.setenv("SAMED_CPU_FLAGS", "avx2,fma")
    be = set_encoder_backend(make_tiny_model("tinyvit"), "auto", "auto")
    err = capsys.readouterr().err
    assert "measuring encoder candidates openvino-fp32, torch-fp32 on this CPU" in err
    (entry,) = json.loads((no_cache / "choices.json").read_text()).values()
    assert set(entry["results"]) == {"openvino-fp32", "torch-fp32"}
    assert be.name in ("openvino-fp32", "torch-fp32") and be.precision == "fp32"
    assert entry["measure_s"] > 0


def test_class_dices_pool_each_class_and_leave_out_specks():
    from samed.engine.backend_auto import class_dices

    a = np.zeros((2, 20, 20), int)
    a[:, 2:12, 2:12] = 1  # 100 px per slice
    a[0, 15:17, 15:17] = 2  # a 4-px speck
    b = a.copy()
    b[1, 2:12, 2:7] = 0  # class 1 loses half of one slice
    d = class_dices(list(a), list(b))
    assert set(d) == {1} and d[1] == pytest.approx(2 * 150 / 350)
    assert class_dices(list(a), list(a), min_pixels=1) == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="same slices"):
        class_dices(list(a), list(b)[:1])


def test_auto_checks_an_automatic_adapter_on_its_automatic_output(
    make_tiny_model, monkeypatch, tmp_path
):
    """An automatic adapter is scored on its argmax class maps: a candidate as fast as wanted
    whose embeddings move the classes is rejected, an exact one is picked (issue #15)."""
    from samed.engine.backend_auto import accuracy_check, measure, pick
    from samed.lora import LoraConfig, apply_lora, remove_adapter

    root = tmp_path / "calib"
    root.mkdir()
    (root / "acdc").symlink_to(shared_path("acdc"))
    monkeypatch.setenv("SAMED_CALIBRATION_DATA", str(root))
    model = make_tiny_model("tinyvit", seed=3)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    torch.manual_seed(1)
    with torch.no_grad():  # a head that predicts classes, not only background
        for p in model.mask_decoder.output_hypernetworks_mlps.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert accuracy_check(model) == "automatic"
    encoder = model.image_encoder
    memo: dict = {}

    def fake(shift: int):
        def run(x: torch.Tensor) -> torch.Tensor:  # fast after the first pass: remembered
            key = (shift, tuple(x.shape), float(x.double().sum()))
            if key not in memo:
                memo[key] = torch.roll(encoder(x), shift, dims=-1)
            return memo[key]

        return run

    built = {
        "openvino-fp32": EncoderBackend("openvino", "fp32", run=fake(0)),  # exact
        "openvino-bf16": EncoderBackend("openvino", "bf16", run=fake(12)),  # classes moved
    }
    res = measure(model, [*built, "torch-fp32"], built=dict(built))
    for name in built:
        assert res[name]["check"] == "automatic" and res[name]["class_dice"], res[name]
    assert res["openvino-fp32"]["mean_dice"] == 1.0 and res["openvino-fp32"]["ok"]
    bad = res["openvino-bf16"]
    assert bad["mean_dice"] < 0.99 and not bad["ok"]
    assert bad["s_per_slice"] * 1.05 <= res["torch-fp32"]["s_per_slice"]  # fast, still refused
    assert pick(res) == "openvino-fp32"
    remove_adapter(model)
    assert accuracy_check(model) == "box"


@needs_bf16
def test_torch_mixed_runs_the_convolutions_in_fp32_and_the_rest_in_bf16(make_tiny_model):
    """torch-mixed: every convolution (plain or the fused conv + GELU) gives float32, the Linear
    layers bf16; torch-bf16 gives bf16 for both; the model's own encoder stays fp32 (issue #15)."""
    from samed.engine.cpu import ConvGELU, optimize_for_inference

    seen: list[tuple[str, torch.dtype]] = []

    def hook(mod, args, out):
        if isinstance(mod, (torch.nn.Conv2d, ConvGELU, torch.nn.Linear)) and torch.is_tensor(out):
            kind = "linear" if isinstance(mod, torch.nn.Linear) else "conv"
            seen.append((kind, out.dtype))

    model = optimize_for_inference(make_tiny_model("tinyvit"))
    assert any(isinstance(m, ConvGELU) for m in model.image_encoder.modules())
    x = torch.rand(1, 3, 256, 256)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        dtypes = {}
        for name in ("torch-mixed", "torch-bf16", "torch-fp32"):
            seen.clear()
            be = build_candidate(model, name)
            with torch.inference_mode():
                e = (be.run or model.image_encoder)(x)
            assert e.dtype == torch.float32
            dtypes[name] = {k: {d for kk, d in seen if kk == k} for k in ("conv", "linear")}
    finally:
        handle.remove()
    assert dtypes["torch-mixed"] == {"conv": {torch.float32}, "linear": {torch.bfloat16}}
    assert torch.bfloat16 in dtypes["torch-bf16"]["conv"]
    assert dtypes["torch-fp32"] == {"conv": {torch.float32}, "linear": {torch.float32}}


@needs_bf16
def test_auto_picks_torch_mixed_only_when_it_passes(
    make_tiny_model, no_cache, monkeypatch, tmp_path
):
    """torch-mixed is a real ``auto`` candidate on a native-bf16 CPU: measured beside the others
    on the automatic check, picked only when it meets the bar and is faster, and recorded in
    choices.json, the model's backend and the Session's cache key like any candidate."""
    from samed.engine.backend_auto import (
        MIN_CLASS_DICE_AUTOMATIC,
        MIN_GAIN,
        MIN_MEAN_DICE,
        measure,
        pick,
    )
    from samed.lora import LoraConfig, apply_lora

    root = tmp_path / "calib"
    root.mkdir()
    (root / "acdc").symlink_to(shared_path("acdc"))
    monkeypatch.setenv("SAMED_CALIBRATION_DATA", str(root))
    monkeypatch.setenv("SAMED_NO_OPENVINO", "1")  # torch candidates only: fast
    model = make_tiny_model("tinyvit", seed=3)
    apply_lora(model, LoraConfig(mode="automatic", num_classes=3))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.mask_decoder.output_hypernetworks_mlps.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    be = set_encoder_backend(model, "auto", "auto")
    (entry,) = json.loads((no_cache / "choices.json").read_text()).values()
    res = entry["results"]
    assert set(res) == {"torch-bf16", "torch-mixed", "torch-fp32"}
    assert res["torch-mixed"]["check"] == "automatic" and res["torch-mixed"]["class_dice"]
    for name, r in res.items():  # ok means: the bar and faster than torch fp32
        if name != "torch-fp32":
            assert r["ok"] == (
                r["mean_dice"] >= MIN_MEAN_DICE
                and r["min_dice"] >= MIN_CLASS_DICE_AUTOMATIC
                and r["s_per_slice"] * MIN_GAIN <= res["torch-fp32"]["s_per_slice"]
            )
    assert entry["choice"] == pick(res) == be.name and be.chosen_by == "auto"
    vol = np.random.default_rng(0).random((2, 40, 50)).astype(np.float32)
    assert Session(model, vol, cache_dir=None).encoder == be.label
    # the same candidate with embeddings that move the classes is refused, however fast
    encoder = model.image_encoder
    memo: dict = {}

    def fake(shift: int):
        def run(x: torch.Tensor) -> torch.Tensor:
            key = (shift, tuple(x.shape), float(x.double().sum()))
            if key not in memo:
                memo[key] = torch.roll(encoder(x), shift, dims=-1)
            return memo[key]

        return run

    for shift, picked in ((12, "torch-fp32"), (0, "torch-mixed")):
        built = {"torch-mixed": EncoderBackend("torch", "mixed", run=fake(shift))}
        res = measure(model, ["torch-mixed", "torch-fp32"], built=built)
        assert pick(res) == picked, res["torch-mixed"]
        assert res["torch-mixed"]["ok"] == (picked == "torch-mixed")
