"""samed.load_model: build + optimize_for_inference + adapter in one call, and the adapter
state it leaves on the model (SamModel.adapter)."""

from __future__ import annotations

import hashlib

import pytest
import torch

import samed
from samed.engine import optimize_for_inference
from samed.engine.cpu import ConvGELU
from samed.lora import (
    LoraConfig,
    apply_lora,
    load_adapter,
    merge_adapter,
    remove_adapter,
    save_adapter,
)
from samed.model import AdapterState, build_model, load_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory, make_tiny_model):
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(1)
    prompted = apply_lora(make_tiny_model("tinyvit"), LoraConfig(r=2))
    for prm in prompted.parameters():  # non-zero LoRA B so the adapter changes outputs
        prm.data.add_(0.01 * torch.randn_like(prm))
    auto = apply_lora(make_tiny_model("tinyvit"), LoraConfig(mode="automatic", num_classes=4))
    return {
        "prompted": save_adapter(prompted, root / "tiny-prompted", labels={1: "liver"}),
        "automatic": save_adapter(
            auto,
            root / "tiny-auto",
            labels={0: "background", 1: "a", 2: "b", 3: "c"},
            metadata={
                "postprocessing": {"largest_component": [1]},
                "preprocessing": {"intensity": "liver"},
            },
        ),
    }


def _outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, model.image_size, model.image_size, generator=g)
    box = torch.tensor([[30.0, 40.0, 150.0, 170.0]])
    with torch.no_grad():
        emb = model.encode(x)
        logits, iou = model.decode(emb, boxes=box)
    return emb, logits, iou


def test_exported_from_samed():
    assert samed.load_model is load_model and samed.AdapterState is AdapterState


def test_same_model_as_build_optimize_and_load_adapter(folders, make_tiny_model):
    folder = folders["prompted"]
    m = load_model(make_tiny_model("tinyvit"), adapter=folder)
    ref = optimize_for_inference(make_tiny_model("tinyvit"))
    load_adapter(ref, folder)
    for a, b in zip(_outputs(m), _outputs(ref), strict=True):
        assert torch.equal(a, b)
    assert any(isinstance(mod, ConvGELU) for mod in m.image_encoder.modules())  # optimised
    base = _outputs(optimize_for_inference(make_tiny_model("tinyvit")))
    assert not torch.equal(_outputs(m)[1], base[1])  # the adapter is really attached
    st = m.adapter
    assert isinstance(st, AdapterState) and st.name == "tiny-prompted" and st.mode == "prompted"
    assert st.path == folder.resolve() and not st.merged and st.labels == {1: "liver"}
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert st.digest == hashlib.sha256(weights).hexdigest() == m.adapter_digest
    assert st.config.r == 2 and m.lora_config is st.config and len(st.targets) > 0


def test_no_optimize_and_merge(folders, make_tiny_model):
    m = load_model(
        make_tiny_model("tinyvit"), adapter=folders["prompted"], optimize=False, merge=True
    )
    assert not any(isinstance(mod, ConvGELU) for mod in m.image_encoder.modules())
    assert m.adapter.merged
    ref = load_adapter(make_tiny_model("tinyvit"), folders["prompted"])
    for a, b in zip(_outputs(m), _outputs(ref), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_automatic_adapter_state_and_remove(folders, tiny_model):
    m = load_model(tiny_model, adapter=folders["automatic"])
    st = m.adapter
    assert st.mode == "automatic" and st.num_classes == 4
    assert st.postprocessing == {"largest_component": [1]} == m.adapter_postprocessing
    assert st.intensity == "liver" and m.adapter_labels == {0: "background", 1: "a", 2: "b", 3: "c"}
    assert m.num_mask_outputs == 4  # one output per class
    remove_adapter(m)
    assert m.adapter is None and m.adapter_name is None and m.adapter_digest == ""
    assert m.lora_config is None and m.adapter_labels == {} and m.lora_targets == []
    assert m.num_mask_outputs == 3  # the base prompted decoder is back


def test_apply_lora_and_merge_update_the_state(make_tiny_model):
    m = apply_lora(make_tiny_model("tinyvit"), LoraConfig(r=2))
    assert m.adapter.name == "unsaved" and m.adapter.digest == "" and m.adapter.path is None
    merge_adapter(m)
    assert m.adapter.merged
    m.adapter_labels = {1: "organ"}
    assert m.adapter.labels == {1: "organ"}
    with pytest.raises(ValueError, match="no adapter"):
        make_tiny_model("tinyvit").adapter_labels = {1: "x"}


def test_bad_arguments_are_value_errors(folders, tiny_model):
    tiny = tiny_model
    with pytest.raises(ValueError, match="checkpoint='x.pth' given with an already built model"):
        load_model(tiny, checkpoint="x.pth")
    with pytest.raises(ValueError, match="device='cpu' given with an already built model"):
        load_model(tiny, device="cpu")
    with pytest.raises(ValueError, match="adapter 'no-such-adapter' is neither a folder"):
        load_model("litemedsam", adapter="no-such-adapter")
    with pytest.raises(ValueError, match="model kind 'sam_vit_x' is not known"):
        load_model("sam_vit_x")
    with pytest.raises(ValueError, match="needs checkpoint=PATH"):
        load_model("sam_vit_b")
    with pytest.raises(ValueError, match="must be a model kind name or a SamModel"):
        load_model(3)  # type: ignore[arg-type]
    assert tiny.adapter is None  # nothing was attached by the failed calls


@pytest.mark.slow
def test_real_litemedsam_with_a_shipped_adapter():
    m = load_model("litemedsam", adapter="acdc-cardiac-mri", device="cpu")
    ref = optimize_for_inference(build_model("litemedsam", device="cpu"))
    load_adapter(ref, samed.resolve_adapter("acdc-cardiac-mri"))
    st = m.adapter
    assert st.name == "acdc-cardiac-mri" and st.mode == "automatic" and not st.merged
    assert st.labels[1] and st.postprocessing["largest_component"] == [1, 2, 3]
    assert st.intensity == "auto" and st.digest == ref.adapter_digest
    assert m.checkpoint_sha256 == ref.checkpoint_sha256 and m.device.type == "cpu"
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, _ = m.decode(m.encode(x), multimask_output=True)
        b, _ = ref.decode(ref.encode(x), multimask_output=True)
    assert a.shape == (1, 4, 256, 256) and torch.equal(a, b)
