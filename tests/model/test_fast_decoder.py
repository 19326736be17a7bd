"""The re-associated mask decoder (samed.model.fast_decoder) equals SAM's MaskDecoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samed.engine import Session
from samed.lora import make_automatic_decoder
from samed.model import build_model
from samed.model.fast_decoder import fast_mask_decoder


def _both(model, emb, **kw):
    """(reference, fast) decoder outputs for the same inputs."""
    with torch.inference_mode():
        model.fast_decoder = False
        ref = model.decode(emb, **kw)
        model.fast_decoder = True
        fast = model.decode(emb, **kw)
    return ref, fast


@pytest.fixture(scope="module")
def lite():
    return build_model("litemedsam", device="cpu")


def _prompts(s: int) -> list[dict]:
    boxes = torch.tensor(
        [[0.2 * s, 0.2 * s, 0.6 * s, 0.5 * s], [0.1 * s, 0.3 * s, 0.9 * s, 0.8 * s]]
    )
    pts = (
        torch.tensor([[[0.5 * s, 0.5 * s], [0.1 * s, 0.2 * s], [0.0, 0.0]]]),
        torch.tensor([[1, 0, -1]]),
    )
    return [
        {"boxes": boxes[:1]},
        {"boxes": boxes},  # two objects on one slice
        {"points": pts},
        {"boxes": boxes[:1], "points": (pts[0][:, :2], pts[1][:, :2])},
        {"boxes": boxes[:1], "mask_inputs": torch.randn(1, 1, 256, 256)},
    ]


@pytest.mark.slow
@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("case", range(5))
def test_fast_decoder_equals_sam_on_the_real_weights(lite, case, multimask):
    torch.manual_seed(case)
    emb = torch.randn(1, 256, 64, 64)
    kw = _prompts(lite.image_size)[case]
    (ref_l, ref_iou), (fast_l, iou) = _both(lite, emb, multimask_output=multimask, **kw)
    assert fast_l.shape == ref_l.shape and iou.shape == ref_iou.shape
    assert (fast_l - ref_l).abs().max().item() < 1e-4
    assert (iou - ref_iou).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["tinyvit", "vit"])
def test_fast_decoder_equals_sam_on_other_shapes_and_automatic_decoders(make_tiny_model, family):
    torch.manual_seed(1)
    model = make_tiny_model(family)
    emb = torch.randn(1, 256, *model.embedding_size)
    for kw in _prompts(model.image_size)[:4]:
        (ref, _), (fast, _) = _both(model, emb, multimask_output=True, **kw)
        assert (fast - ref).abs().max().item() < 1e-4
    model.mask_decoder = make_automatic_decoder(model.mask_decoder, 4)
    (ref, ref_iou), (fast, iou) = _both(model, emb, multimask_output=True)
    assert (
        fast.shape == ref.shape == (1, 4, 4 * model.embedding_size[0], 4 * model.embedding_size[1])
    )
    assert (fast - ref).abs().max().item() < 1e-4


@pytest.mark.slow
def test_state_from_other_weights_is_refused(lite):
    emb = torch.randn(1, 256, 64, 64)
    with torch.inference_mode():
        state = lite.image_state(emb)
        sparse, _ = lite.prompt_encoder(
            points=None, boxes=torch.tensor([[[10.0, 10, 90, 90]]]), masks=None
        )
        dec = make_automatic_decoder(lite.mask_decoder, 3)
        with pytest.raises(ValueError, match="different decoder weights"):
            fast_mask_decoder(dec, state, sparse, True)


def test_session_clicks_reuse_the_slice_state_and_notice_new_weights(make_tiny_model):
    torch.manual_seed(2)
    model = make_tiny_model("tinyvit")
    vol = np.random.default_rng(0).random((3, 40, 50)).astype(np.float32)
    s = Session(model, vol, intensity="minmax")
    box = [5, 5, 30, 25]
    first = s.predict_full(1, box=box)
    assert list(s._states) == [1]
    again = s.predict_full(1, box=box, points=[[10, 10]], point_labels=[0])
    assert list(s._states) == [1]
    model.fast_decoder = False
    ref = s.predict_full(1, box=box, points=[[10, 10]], point_labels=[0])
    model.fast_decoder = True
    assert np.array_equal(ref.mask, again.mask) and abs(ref.score - again.score) < 1e-5
    # weights changed in place (as a training step would): the cached state must not be used
    with torch.no_grad():
        model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.k_proj.weight.mul_(3.0)
    changed = s.predict_full(1, box=box)
    model.fast_decoder = False
    ref = s.predict_full(1, box=box)
    model.fast_decoder = True
    assert (changed.low_res_logits - ref.low_res_logits).abs().max().item() < 1e-4
    assert (changed.low_res_logits - first.low_res_logits).abs().max().item() > 1e-3
