"""The click-aware adapter: decoder-LoRA adapters (exact fast decoder, loader checks, embedding
cache kept), the simulated-session training on a tiny model, and the registry's interactive
default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samed.lora import (
    AdapterError,
    LoraConfig,
    apply_lora,
    load_adapter,
    remove_adapter,
    save_adapter,
)
from samed.lora_decoder import LoRALinear
from samed.train.interactive import DECODER_FULL, DECODER_TARGETS

DEC = LoraConfig(
    target_modules="",
    train_decoder=False,
    train_prompt_encoder=True,
    decoder_r=4,
    decoder_alpha=4.0,
    decoder_target_modules=DECODER_TARGETS,
    decoder_full_parameters=DECODER_FULL,
)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_decoder_lora_leaves_the_encoder_and_starts_equal_to_the_base(tiny_model):
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb0 = tiny_model.encode(x)
        box = torch.tensor([[40.0, 50.0, 160.0, 170.0]])
        ref, _ = tiny_model.decode(emb0, boxes=box)
    apply_lora(tiny_model, DEC)
    assert tiny_model.adapter.targets == ()  # no encoder layer wrapped
    wrapped = [n for n, m in tiny_model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(n.startswith("mask_decoder.transformer.") for n in wrapped)
    assert not any(p.requires_grad for p in tiny_model.image_encoder.parameters())
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.encode(x), emb0)
        out, _ = tiny_model.decode(emb0, boxes=box)
    torch.testing.assert_close(out, ref)  # B starts at zero


def test_fast_decoder_equals_sams_module_with_a_trained_decoder_lora(tiny_model):
    apply_lora(tiny_model, DEC)
    _randomize(tiny_model)
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    pts = (torch.tensor([[[80.0, 90.0], [120.0, 60.0]]]), torch.tensor([[1, 0]]))
    box = torch.tensor([[40.0, 50.0, 160.0, 170.0]])
    with torch.no_grad():
        fast, fiou = tiny_model.decode(emb, boxes=box, points=pts)
        tiny_model.fast_decoder = False
        slow, siou = tiny_model.decode(emb, boxes=box, points=pts)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fiou, siou, atol=1e-4, rtol=1e-4)


def test_decoder_adapter_round_trip_keeps_the_embedding_cache_and_checks_its_file(
    tmp_path, make_tiny_model, tiny_volume
):
    from safetensors.torch import load_file, save_file

    from samed.engine import Session

    m = make_tiny_model()
    apply_lora(m, DEC)
    _randomize(m)
    folder = save_adapter(m, tmp_path / "clicky", metadata={"interactive_default": True})
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(2))
    box = torch.tensor([[40.0, 50.0, 160.0, 170.0]])
    with torch.no_grad():
        want, _ = m.decode(emb, boxes=box)
    m2 = make_tiny_model()
    s = Session(m2, tiny_volume)
    key = s.cache_key
    s.embed([0])
    load_adapter(m2, folder)
    assert m2.adapter.digest and s.cache_key == key  # encoder unchanged: cache still valid
    assert s.is_embedded(0)
    with torch.no_grad():
        got, _ = m2.decode(emb, boxes=box)
    torch.testing.assert_close(got, want)
    remove_adapter(m2)
    assert not any(isinstance(x, LoRALinear) for x in m2.modules())
    # an encoder adapter still changes the key
    apply_lora(m2, LoraConfig())
    m2.adapter.digest = "x"
    assert s.cache_key != key
    remove_adapter(m2)
    # the checks: wrong shape, NaN, missing key
    w = folder / "adapter_model.safetensors"
    state = load_file(str(w))
    k = next(k for k in state if "lora_A" in k)
    for bad in (
        {**state, k: torch.zeros(3, 3)},
        {**state, k: torch.full_like(state[k], float("nan"))},
        {kk: v for kk, v in state.items() if kk != k},
    ):
        save_file(bad, str(w))
        with pytest.raises(AdapterError):
            load_adapter(make_tiny_model(), folder)
    save_file(state, str(w))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_sha256"] = "0" * 64
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="SHA-256"):
        load_adapter(make_tiny_model(), folder)


def test_a_decoder_lora_config_names_what_is_wrong():
    with pytest.raises(ValueError, match="decoder_target_modules"):
        LoraConfig(target_modules="", decoder_r=4)
    with pytest.raises(ValueError, match="decoder_r"):
        LoraConfig(decoder_r=-1)
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora_on_nothing = LoraConfig(target_modules="")
        from samed.model import build_tiny_model

        apply_lora(build_tiny_model(), apply_lora_on_nothing)


def _synthetic_cases(tmp_path):
    import nibabel as nib

    from samed.train.interactive_data import TrainCase

    rng = np.random.default_rng(0)
    vol = rng.normal(0, 0.1, (6, 40, 48)).astype(np.float32)
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:5, 10:25, 12:30] = 1
    lab[2:4, 28:36, 30:40] = 2
    vol[lab == 1] += 1
    vol[lab == 2] += 2
    for n, a in (("img", vol), ("lab", lab)):
        nib.save(nib.Nifti1Image(np.transpose(a, (2, 1, 0)), np.eye(4)), tmp_path / f"{n}.nii.gz")
    img, labp = str(tmp_path / "img.nii.gz"), str(tmp_path / "lab.nii.gz")
    return [
        TrainCase("syn", "a", img, labp, (1, 2), 1, "train"),
        TrainCase("syn", "b", img, labp, (1, 2), 2, "val"),
    ], lab


def test_interactive_training_runs_and_exports_a_listed_loadable_adapter(
    tmp_path, make_tiny_model, monkeypatch
):
    from samed.registry import find_adapters, interactive_adapter
    from samed.train.interactive import load_interactive_config, train_interactive
    from samed.train.interactive_data import build_slice_cache, open_slice_cache

    cases, lab = _synthetic_cases(tmp_path)
    model = make_tiny_model()
    cache = build_slice_cache(model, cases, tmp_path / "cache")
    assert len(cache) == 6 and cache.embeddings.dtype == np.float16
    # the model-frame label map: the 40 x 48 slice is scaled by 256 / 48 into the padded frame
    e = cache.index[0]
    assert e["z"] == 1 and e["values"] == [1] and e["scale"] == pytest.approx(256 / 48)
    assert set(np.unique(cache.labels[0])) == {0, 1}
    assert not cache.labels[0][214:].any()  # zero padding below the resized rows (40 * 5.33)
    assert len(open_slice_cache(tmp_path / "cache")) == 6
    cfg = load_interactive_config(None, iterations=2, batch_size=2, val_interval=1, val_samples=3)
    before = {k: v.clone() for k, v in model.mask_decoder.state_dict().items()}
    m = train_interactive(cfg, tmp_path / "run", model=model, cache=cache, log=lambda s: None)
    assert m["steps_run"] == 2 and len(m["history"]) == 3
    assert len(m["validation_base"]["curve"]) == 4  # box + 3 clicks
    folder = tmp_path / "run" / cfg.name
    meta = json.loads((folder / "metadata.json").read_text())
    # not the interactive default until the 3D loop shows it beats the base model
    assert meta["interactive_default"] is False and meta["training"]["best_step"] in (0, 1, 2)
    from safetensors.torch import load_file

    state = load_file(str(folder / "adapter_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in state.values())
    assert not any(k.startswith("image_encoder.") for k in state)
    m2 = make_tiny_model()
    load_adapter(m2, folder)
    assert m2.adapter.name == cfg.name and m2.adapter.targets == ()
    if m["best_step"]:  # the trained weights, not the base decoder's
        changed = any(
            not torch.equal(p, before[k])
            for k, p in m2.mask_decoder.state_dict().items()
            if k in before and ".lora_" not in k and ".base." not in k
        )
        assert changed or any(".lora_B" in k and v.abs().sum() > 0 for k, v in state.items())
    monkeypatch.setenv("SAMED_ADAPTERS", str(tmp_path / "run"))
    listed = {a.name: a for a in find_adapters()}
    assert cfg.name in listed and not listed[cfg.name].interactive_default
    # once the 3D loop shows it beats the base model, the metadata flag makes it the default
    meta["interactive_default"] = True
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert {a.name: a for a in find_adapters()}[cfg.name].interactive_default
    assert interactive_adapter().name == cfg.name


def test_training_cases_never_include_the_benchmarks_held_out_cases(shared_data):
    from samed.train.interactive_data import BTCV_VAL, HELD_OUT, training_cases

    cases = training_cases(shared_data)
    names = {c.case for c in cases}
    assert names and not names & HELD_OUT and not names & BTCV_VAL
    val = set(json.loads((shared_data / "acdc" / "dataset.json").read_text())["splits"]["val"])
    assert not {c.case.split("_frame")[0] for c in cases if c.dataset == "acdc"} & val
    assert {"chaos_t2_01", "hippocampus_001", "btcv_0034"}.isdisjoint(names)
    assert {c.dataset for c in cases if c.role == "val"} >= {"acdc", "btcv"}


def test_the_shipped_click_adapter_config_loads():
    from pathlib import Path

    from samed.train.interactive import load_interactive_config

    path = Path(__file__).resolve().parents[2] / "configs" / "interactive" / "click-adapter.yaml"
    cfg = load_interactive_config(path)
    assert cfg.name == "click-aware-litemedsam" and cfg.box_slack == (0.0, 8.0)
    with pytest.raises(ValueError, match="unknown config keys"):
        load_interactive_config(path, iteratoins=3)
    with pytest.raises(ValueError, match="rounds"):
        load_interactive_config(path, rounds=[3, 1])
