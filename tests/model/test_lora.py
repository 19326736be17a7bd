"""LoRA adapters: exactness, merge, round trips, tampering, parameter counts, switching."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from samed.lora import (
    AdapterError,
    LoraConfig,
    LoRAQKV,
    apply_lora,
    load_adapter,
    merge_adapter,
    remove_adapter,
    save_adapter,
    trainable_parameters,
    unmerge_adapter,
)
from samed.model import build_model

X = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _outputs(model):
    with torch.no_grad():
        emb = model.encode(X)
        auto = (
            getattr(model, "lora_config", None) is not None
            and model.lora_config.mode == "automatic"
        )
        if auto:
            logits, _ = model.decode(emb, multimask_output=True)
        else:
            logits, _ = model.decode(emb, boxes=torch.tensor([[20.0, 30, 150, 160]]))
    return emb, logits


@pytest.mark.parametrize("family", ["tinyvit", "vit"])
def test_zero_b_leaves_outputs_identical(make_tiny_model, family):
    m = make_tiny_model(family)
    emb0, log0 = _outputs(m)
    apply_lora(m, LoraConfig(r=4))
    emb1, log1 = _outputs(m)
    assert torch.equal(emb0, emb1) and torch.equal(log0, log1)


@pytest.mark.parametrize("family", ["tinyvit", "vit"])
def test_merged_equals_unmerged(make_tiny_model, family):
    m = apply_lora(make_tiny_model(family), LoraConfig(r=4, projections=("q", "k", "v")))
    _randomize_lora(m)
    emb_u, log_u = _outputs(m)
    merge_adapter(m)
    emb_m, log_m = _outputs(m)
    assert (emb_u - emb_m).abs().max() < 1e-5
    assert (log_u - log_m).abs().max() < 1e-4
    unmerge_adapter(m)
    emb_b, _ = _outputs(m)
    assert (emb_u - emb_b).abs().max() < 1e-5


def test_tinyvit_layout_touches_only_the_chosen_projection(tiny_model):
    m = tiny_model
    apply_lora(m, LoraConfig(r=2, projections=("v",)))
    _randomize_lora(m)
    layer = next(mod for mod in m.modules() if isinstance(mod, LoRAQKV))
    x = torch.rand(3, 49, layer.base.in_features)
    with torch.no_grad():
        changed = (layer(x) - layer.base(x)).abs().amax(dim=(0, 1)) > 0
    attn = next(mod for mod in m.modules() if hasattr(mod, "qkv") and mod.qkv is layer)
    # TinyViT splits each head's slice into [q key_dim | k key_dim | v d]
    expect = torch.zeros_like(changed)
    per_head = 2 * attn.key_dim + attn.d
    for h in range(attn.num_heads):
        expect[h * per_head + 2 * attn.key_dim : (h + 1) * per_head] = True
    assert torch.equal(changed, expect)


@pytest.mark.parametrize("mode", ["prompted", "automatic"])
def test_save_load_round_trip_is_bit_exact(tmp_path, mode, make_tiny_model):
    cfg = LoraConfig(r=4, mode=mode, num_classes=3 if mode == "automatic" else 0)
    m = apply_lora(make_tiny_model("tinyvit"), cfg)
    _randomize_lora(m)
    ref = _outputs(m)
    labels = {0: "background", 1: "a", 2: "b"} if mode == "automatic" else {1: "organ"}
    folder = save_adapter(m, tmp_path / "ad", labels=labels, metadata={"description": "test"})
    cfg_json = json.loads((folder / "adapter_config.json").read_text())
    assert cfg_json["base_model"] == "litemedsam" and cfg_json["r"] == 4
    assert cfg_json["mode"] == mode and cfg_json["projections"] == ["q", "v"]
    assert cfg_json["targets"]
    fresh = make_tiny_model("tinyvit")
    load_adapter(fresh, folder)
    out = _outputs(fresh)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])
    if mode == "automatic":
        assert out[1].shape[1] == 3


def _saved(tmp_path, make_tiny_model):
    m = apply_lora(make_tiny_model("tinyvit"), LoraConfig(r=2))
    return save_adapter(m, tmp_path / "ad")


def test_base_model_mismatch_is_refused(tmp_path, make_tiny_model):
    folder = _saved(tmp_path, make_tiny_model)
    with pytest.raises(AdapterError, match="trained on base model 'litemedsam'"):
        load_adapter(make_tiny_model("vit"), folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_sha256"] = "0" * 64
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="SHA-256"):
        load_adapter(make_tiny_model("tinyvit"), folder)


def test_unknown_keys_and_wrong_shapes_are_refused(tmp_path, make_tiny_model):
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path, make_tiny_model)
    path = folder / "adapter_model.safetensors"
    state = load_file(str(path))
    save_file({**state, "image_encoder.evil": torch.zeros(1)}, str(path))
    with pytest.raises(AdapterError, match="unknown keys"):
        load_adapter(make_tiny_model("tinyvit"), folder)
    key = next(k for k in state if ".lora_A." in k)
    save_file({**state, key: torch.zeros(3, 3)}, str(path))
    m = make_tiny_model("tinyvit")
    with pytest.raises(AdapterError, match="shape mismatches"):
        load_adapter(m, folder)
    assert getattr(m, "lora_config", None) is None  # a failed load leaves the base model


def test_pickle_is_refused(tmp_path, make_tiny_model):
    folder = _saved(tmp_path, make_tiny_model)
    with open(folder / "adapter_model.safetensors", "wb") as fh:
        pickle.dump({"x": 1}, fh)
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        load_adapter(make_tiny_model("tinyvit"), folder)


def test_missing_files_and_bad_json(tmp_path, make_tiny_model):
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapter(make_tiny_model("tinyvit"), tmp_path)
    folder = _saved(tmp_path, make_tiny_model)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(make_tiny_model("tinyvit"), folder)


def test_switching_adapters_without_reloading_the_base(tmp_path, make_tiny_model):
    m = make_tiny_model("tinyvit")
    base = _outputs(m)
    a = apply_lora(make_tiny_model("tinyvit"), LoraConfig(r=2))
    _randomize_lora(a, 1)
    fa = save_adapter(a, tmp_path / "a")
    b = apply_lora(make_tiny_model("tinyvit"), LoraConfig(r=4, mode="automatic", num_classes=4))
    _randomize_lora(b, 2)
    fb = save_adapter(b, tmp_path / "b")
    load_adapter(m, fa)
    assert torch.equal(_outputs(m)[1], _outputs(a)[1])
    load_adapter(m, fb, merge=True)
    assert (_outputs(m)[1] - _outputs(b)[1]).abs().max() < 1e-4
    remove_adapter(m)
    assert torch.equal(_outputs(m)[0], base[0]) and torch.equal(_outputs(m)[1], base[1])


def test_config_validation(make_tiny_model):
    with pytest.raises(ValueError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match="projections"):
        LoraConfig(projections=("x",))
    with pytest.raises(ValueError, match="num_classes"):
        LoraConfig(mode="automatic", num_classes=1)
    with pytest.raises(ValueError, match="matches no Linear"):
        apply_lora(make_tiny_model("vit"), LoraConfig(target_modules=r"nothing\.here"))


@pytest.mark.slow
def test_trainable_parameter_counts_on_litemedsam():
    m = build_model("litemedsam", device="cpu")
    apply_lora(m, LoraConfig(r=4, train_decoder=False))
    counts = trainable_parameters(m)
    # 10 qkv layers; per layer r*(in) per projection for A and r*|q| + r*|v| for B
    expected = 0
    for mod in m.modules():
        if isinstance(mod, LoRAQKV):
            expected += sum(
                4 * mod.base.in_features + 4 * len(getattr(mod, f"index_{p}")) for p in ("q", "v")
            )
    assert counts["lora"] == expected == 29_696
    assert counts["total"] == counts["lora"]
    remove_adapter(m)
    apply_lora(m, LoraConfig(r=4))
    assert trainable_parameters(m)["mask_decoder"] == 4_058_340
