"""The quick recipe's weight averaging (``train.ema``) and keep rule (``validation.keep``), on a
tiny random model and tiny synthetic volumes: the average follows its formula step by step and
differs from the trained weights, ``best`` keeps the best validation's weights when validation
gets worse later, ``last`` keeps the final ones, both are recorded beside the adapter, and bad
values are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samed.train.annotations import QUICK_DEFAULTS, annotations_config, export_pair

# constant learning rate, no warm-up: the weights after step k do not depend on how many
# steps the run has in all, so runs of different lengths can be compared step for step
TINY = {
    "model.kind": "tiny",
    "train.max_minutes": None,
    "train.batch_size": 1,
    "train.cache_copies": 1,
    "train.device": "cpu",
    "optim.warmup": 0,
    "optim.schedule": "constant",
    "validation.interval": 2,
}


@pytest.fixture
def folder(tmp_path: Path, make_tiny_volume) -> Path:
    """4 annotated tiny volumes (3 train, 1 held back; labels 1 = a block, 2 = its core)."""
    out = tmp_path / "annotations"
    for i in range(4):
        vol = make_tiny_volume(seed=i)
        lab = np.zeros(vol.array.shape, np.int16)
        lab[:, 20:40, 30:60] = 1
        lab[:, 25:35, 35:45] = 2
        export_pair(out, f"case{i}", vol, lab, {1: "block", 2: "core"})
    return out


def _run(folder: Path, tmp_path: Path, name: str, **over) -> tuple[dict, dict[str, np.ndarray]]:
    """train_quick on the folder; (result, the kept adapter's tensors)."""
    from safetensors.torch import load_file

    from samed.train.quick import train_quick

    cfg = annotations_config(folder, "keep", overrides={**TINY, **over})
    res = train_quick(cfg, tmp_path / name, log=lambda s: None, embedding_cache=tmp_path / "emb.pt")
    w = load_file(Path(res["adapter"]) / "adapter_model.safetensors")
    return res, {k: v.numpy() for k, v in w.items()}


def _meta(res: dict) -> dict:
    return json.loads((Path(res["adapter"]) / "metadata.json").read_text())


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_ema_decay_and_average_by_hand():
    from samed.train.quick import WeightAverage, ema_decay

    assert ema_decay(0.99, 1) == pytest.approx(2 / 11)
    assert ema_decay(0.99, 2) == pytest.approx(3 / 12)
    assert ema_decay(0.99, 10_000) == 0.99
    assert ema_decay(0.5, 20) == 0.5
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    q = torch.nn.Parameter(torch.tensor([[4.0]]))
    avg = WeightAverage([p, q], 0.99)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, -2.0]))
        q.copy_(torch.tensor([[0.0]]))
    assert avg.update(1) == pytest.approx(2 / 11)
    want_p = 2 / 11 * np.array([1.0, 2.0]) + 9 / 11 * np.array([3.0, -2.0])
    want_q = 2 / 11 * 4.0
    with avg.applied():
        np.testing.assert_allclose(p.detach().numpy(), want_p, rtol=1e-6)
        np.testing.assert_allclose(q.detach().numpy(), [[want_q]], rtol=1e-6)
    # the trained weights are back after the block
    np.testing.assert_array_equal(p.detach().numpy(), [3.0, -2.0])
    with torch.no_grad():
        p.copy_(torch.tensor([0.0, 0.0]))
    avg.update(2)  # decay 3/12
    with avg.applied():
        np.testing.assert_allclose(p.detach().numpy(), 0.25 * want_p, rtol=1e-6)


def test_ema_adapter_follows_the_formula(folder, tmp_path):
    """E2 = d2 * E1 + (1 - d2) * W2 with d2 = min(0.99, 3 / 12): the saved average after two
    steps from the saved average after one and the trained weights after two."""
    last = {"validation.keep": "last"}
    _, w2 = _run(folder, tmp_path, "raw2", **last, **{"train.iterations": 2, "train.ema": 0.0})
    r1, e1 = _run(folder, tmp_path, "ema1", **last, **{"train.iterations": 1, "train.ema": 0.99})
    r2, e2 = _run(folder, tmp_path, "ema2", **last, **{"train.iterations": 2, "train.ema": 0.99})
    assert r1["steps"] == 1 and r2["steps"] == 2 and r2["ema"] == 0.99
    d2 = 3 / 12
    moved = [k for k in e2 if not np.array_equal(e2[k], w2[k])]
    assert moved, "the averaged weights equal the trained weights"
    assert any(".mask_decoder." in k or "mask_decoder" in k for k in moved)
    for k in e2:
        np.testing.assert_allclose(e2[k], d2 * e1[k] + (1 - d2) * w2[k], rtol=1e-5, atol=1e-6)


@pytest.fixture
def scripted_dice(monkeypatch):
    """Validation scores set by the test: ``scores[:] = [...]`` gives them in order."""
    from samed.train import quick

    scores: list[float] = []
    real = quick.dice_summary

    def fake(rows, names):
        res = real(rows, names)
        if scores:
            res["mean_dice"] = scores.pop(0)
        return res

    monkeypatch.setattr(quick, "dice_summary", fake)
    return scores


def test_keep_best_and_last(folder, tmp_path, scripted_dice):
    """Validation at steps 2, 4, 6 scores 0.3, 0.9, 0.1: ``best`` keeps step 4's weights,
    ``last`` step 6's (the averages, as the recipe's defaults say)."""
    ema = 0.99
    six = {"train.iterations": 6, "train.ema": ema}
    _, ref4 = _run(
        folder, tmp_path, "ref4", **{**six, "train.iterations": 4, "validation.keep": "last"}
    )
    scripted_dice[:] = [0.3, 0.9, 0.1]
    best, wb = _run(folder, tmp_path, "best", **six, **{"validation.keep": "best"})
    scripted_dice[:] = [0.3, 0.9, 0.1]
    last, wl = _run(folder, tmp_path, "last", **six, **{"validation.keep": "last"})
    assert [v["mean_dice"] for v in best["validation"]] == [0.3, 0.9, 0.1]
    assert best["steps"] == 6 and best["best_step"] == 4 and best["adapter_step"] == 4
    assert best["adapter_mean_dice"] == 0.9
    assert _same(wb, ref4)  # the weights of step 4, not of the last step
    assert last["steps"] == 6 and last["best_step"] == 4 and last["adapter_step"] == 6
    assert last["adapter_mean_dice"] == 0.1
    assert not _same(wl, wb)
    for res, keep, step in ((best, "best", 4), (last, "last", 6)):
        meta = _meta(res)
        assert meta["training"]["iterations_run"] == step
        assert meta["weights"]["keep"] == keep and meta["weights"]["ema"] == ema
        cfg = meta["training"]["config"]
        assert cfg["train"]["ema"] == ema and cfg["validation"]["keep"] == keep
        text = (Path(res["out"]) / "finetune.yaml").read_text()
        assert f"keep: {keep}" in text and f"ema: {ema}" in text


def test_keep_last_validates_the_final_weights(folder, tmp_path, scripted_dice):
    """A last step between validations is validated once more, and that score is recorded."""
    scripted_dice[:] = [0.5, 0.2]
    res, _ = _run(folder, tmp_path, "l3", **{"train.iterations": 3, "validation.keep": "last"})
    assert [v["step"] for v in res["validation"]] == [2, 3]
    assert res["adapter_step"] == 3 and res["adapter_mean_dice"] == 0.2
    assert res["best_step"] == 2
    assert _meta(res)["validation"]["mean_dice"] == pytest.approx(0.2)


def test_quick_defaults_average_and_keep_best(folder):
    assert QUICK_DEFAULTS["train"]["ema"] == 0.99
    assert QUICK_DEFAULTS["validation"]["keep"] == "best"
    cfg = annotations_config(folder, "d")
    assert cfg.train.ema == 0.99 and cfg.validation.keep == "best"


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("train.ema", 1.0, "[0.0, 1.0)"),
        ("train.ema", -0.1, "[0.0, 1.0)"),
        ("train.ema", "0.9", "[0.0, 1.0)"),
        ("train.ema", True, "[0.0, 1.0)"),
        ("validation.keep", "first", "best, last"),
        ("validation.keep", None, "best, last"),
    ],
)
def test_bad_values_refused(folder, key, value, allowed):
    with pytest.raises(ValueError) as err:
        annotations_config(folder, "bad", overrides={**TINY, key: value})
    msg = str(err.value)
    assert f"{key}={value!r}" in msg and allowed in msg


@pytest.mark.parametrize(("key", "value"), [("train.ema", 0.9), ("validation.keep", "last")])
def test_full_loop_refuses_quick_only_keys(folder, tmp_path, key, value):
    from samed.train.loop import finetune

    cfg = annotations_config(folder, "full", overrides={**TINY, "train.ema": 0.0, key: value})
    with pytest.raises(ValueError, match=rf"{key}=.*quick recipe"):
        finetune(cfg, tmp_path / "full")
