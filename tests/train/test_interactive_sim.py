"""Session-7 training of the click-aware adapter on a tiny model: every decoder output the
refinement reads is supervised (SAM's min-loss rule on the multimask outputs), the base model is
the teacher, the sampler balances datasets, caches join, and a chunked run resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samed.lora import LoraConfig, apply_lora
from samed.train.interactive import (
    DECODER_FULL,
    DECODER_TARGETS,
    load_interactive_config,
    sample_weights,
)
from samed.train.interactive_sim import _round_loss, decode_all, simulate_batch

DEC = LoraConfig(
    target_modules="",
    train_decoder=False,
    train_prompt_encoder=True,
    decoder_r=4,
    decoder_alpha=4.0,
    decoder_target_modules=DECODER_TARGETS,
    decoder_full_parameters=DECODER_FULL,
)


def _prompts():
    box = torch.tensor([[40.0, 50.0, 160.0, 170.0], [20.0, 30.0, 90.0, 120.0]])
    pts = (torch.tensor([[[80.0, 90.0]], [[50.0, 60.0]]]), torch.tensor([[1], [0]]))
    return box, pts


def test_decode_all_gives_the_single_and_the_multimask_outputs_of_decode(tiny_model):
    emb = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    box, pts = _prompts()
    tiny_model.fast_decoder = False
    with torch.no_grad():
        single, s_iou = tiny_model.decode(emb, boxes=box, points=pts)
        multi, m_iou = tiny_model.decode(emb, boxes=box, points=pts, multimask_output=True)
        logits, iou = decode_all(tiny_model, emb, boxes=box, points=pts)
    assert logits.shape[1] == 1 + tiny_model.num_mask_outputs == 4
    torch.testing.assert_close(logits[:, :1], single)
    torch.testing.assert_close(logits[:, 1:], multi)
    torch.testing.assert_close(iou, torch.cat([s_iou, m_iou], 1))


def test_the_teacher_is_the_unadapted_model(tiny_model):
    emb = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    box, pts = _prompts()
    with torch.no_grad():
        before, _ = decode_all(tiny_model, emb, box, pts)
    apply_lora(tiny_model, DEC)
    with torch.no_grad():
        for p in tiny_model.parameters():
            if p.requires_grad:
                p.add_(0.05)
        student, _ = decode_all(tiny_model, emb, box, pts)
        teacher, _ = decode_all(tiny_model, emb, box, pts, base=True)
    torch.testing.assert_close(teacher, before)
    assert not torch.allclose(student, teacher)


def _targets(b=2, size=16):
    t = torch.zeros(b, size, size)
    t[:, 4:12, 4:12] = 1.0
    return t, t >= 0.5


def test_multimask_loss_reaches_only_the_best_fitting_output_without_a_teacher():
    cfg = load_interactive_config(None, multimask_distill_weight=0.0, box_distill_weight=0.0)
    target, tb = _targets()
    logits = torch.full((2, 4, 16, 16), -4.0)
    logits[0, 2, 4:12, 4:12] = 4.0  # sample 0: output 2 fits; sample 1: output 3 fits
    logits[1, 3, 4:12, 4:12] = 4.0
    logits.requires_grad_(True)
    iou = torch.full((2, 4), 0.5, requires_grad=True)
    _round_loss(logits, iou, target, tb, None, np.zeros(2, bool), cfg).backward()
    g = logits.grad.abs().sum((-1, -2))
    assert (g[:, 0] > 0).all()  # the single-mask output always
    assert g[0, 2] > 0 and g[0, 1] == 0 and g[0, 3] == 0
    assert g[1, 3] > 0 and g[1, 1] == 0 and g[1, 2] == 0
    assert (iou.grad != 0).all()  # the IoU head on every output


def test_the_teacher_pulls_the_other_multimask_outputs_and_box_only_rows():
    cfg = load_interactive_config(None, multimask_weight=1.0, box_distill_weight=0.0)
    target, tb = _targets()
    logits = torch.full((2, 4, 16, 16), -4.0)
    logits[:, 2, 4:12, 4:12] = 4.0
    teacher = logits.clone() + 1.0  # differs everywhere
    logits.requires_grad_(True)
    iou = torch.zeros(2, 4)
    _round_loss(logits, iou, target, tb, teacher, np.zeros(2, bool), cfg).backward()
    g = logits.grad.abs().sum((-1, -2))
    assert (g[:, 1:] > 0).all()  # best one by the target, the others by the teacher
    # box-only distillation: only the rows it is asked for get the extra pull on output 0
    cfg2 = load_interactive_config(None, multimask_distill_weight=0.0, box_distill_weight=1.0)
    grads = []
    for rows in (np.array([False, False]), np.array([True, False])):
        lg = logits.detach().clone().requires_grad_(True)
        _round_loss(lg, iou, target, tb, teacher, rows, cfg2).backward()
        grads.append(lg.grad[:, 0].clone())
    assert not torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_simulated_sessions_train_on_the_low_res_grid_and_validate_on_the_frame(tiny_model):
    apply_lora(tiny_model, DEC)
    cfg = load_interactive_config(None)
    # targets on a frame 2x finer than the decoder's 256 grid (as LiteMedSAM: 1024 vs 256)
    gt = torch.zeros(2, 512, 512)
    gt[0, 120:280, 100:300] = 1
    gt[1, 200:240, 200:260] = 1
    emb = torch.randn(2, 256, 64, 64, generator=torch.Generator().manual_seed(2))
    rng = np.random.default_rng(0)
    loss, d = simulate_batch(
        tiny_model, emb, gt, np.ones(2), cfg, rng, start="box", rounds=2, datasets=["btcv", "acdc"]
    )
    assert loss.requires_grad and d.shape == (3, 2)
    loss.backward()
    assert any(p.grad is not None for p in tiny_model.parameters() if p.requires_grad)
    _, dv = simulate_batch(tiny_model, emb, gt, np.ones(2), cfg, rng, train=False, rounds=1)
    assert dv.shape == (2, 2) and np.all((dv >= 0) & (dv <= 1))


def test_the_sampler_balances_datasets():
    class C:
        index = [{"dataset": "acdc"}] * 9 + [{"dataset": "btcv"}]

    pairs = [(i, 1) for i in range(10)]
    p0, p1 = sample_weights(C, pairs, 0.0), sample_weights(C, pairs, 1.0)
    assert np.allclose(p0, 0.1)
    assert p1[9] == pytest.approx(0.5) and p1[:9].sum() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="balance"):
        load_interactive_config(None, balance=-1)


def test_slice_caches_join_without_copy_and_refuse_a_slice_twice(tmp_path, make_tiny_model):
    from test_interactive_adapter import _synthetic_cases

    from samed.train.interactive_data import build_slice_cache, concat_slice_caches

    cases, _ = _synthetic_cases(tmp_path)
    model = make_tiny_model()
    a = build_slice_cache(model, cases[:1], tmp_path / "a")
    b = build_slice_cache(model, cases[1:], tmp_path / "b")
    both = concat_slice_caches([a, b])
    assert len(both) == len(a) + len(b) and both.embeddings.shape[0] == len(both)
    rows = [0, len(a), len(both) - 1]
    want = np.stack([a.embeddings[0], b.embeddings[0], b.embeddings[len(b) - 1]])
    np.testing.assert_array_equal(both.embeddings[rows], want)
    np.testing.assert_array_equal(both.labels[len(a)], b.labels[0])
    assert both.samples("val") == [(len(a) + i, v) for i, v in b.samples("val")]
    with pytest.raises(ValueError, match="more than one cache"):
        concat_slice_caches([a, a])


def test_a_chunked_run_resumes_to_the_same_weights_as_one_run(tmp_path, make_tiny_model):
    from test_interactive_adapter import _synthetic_cases

    from samed.train.interactive import train_interactive
    from samed.train.interactive_data import build_slice_cache

    cases, _ = _synthetic_cases(tmp_path)
    cache = build_slice_cache(make_tiny_model(), cases, tmp_path / "cache")
    kw = dict(iterations=4, batch_size=2, val_interval=2, val_samples=2, warmup=1)
    quiet = dict(log=lambda s: None)
    one = train_interactive(
        load_interactive_config(None, **kw),
        tmp_path / "one",
        model=make_tiny_model(),
        cache=cache,
        **quiet,
    )
    chunked = load_interactive_config(None, chunk_steps=2, **kw)
    first = train_interactive(
        chunked, tmp_path / "two", model=make_tiny_model(), cache=cache, **quiet
    )
    assert first["steps_run"] == 2 and (tmp_path / "two" / "checkpoint.pt").is_file()
    second = train_interactive(
        chunked, tmp_path / "two", model=make_tiny_model(), cache=cache, **quiet
    )
    assert second["steps_run"] == 4 and second["history"] == one["history"]
    from samed.train.interactive import _load_checkpoint

    a = _load_checkpoint(tmp_path / "one" / "checkpoint.pt")["trainable"]
    b = _load_checkpoint(tmp_path / "two" / "checkpoint.pt")["trainable"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k])
