"""Fine-tuning on a tiny random model and a tiny synthetic dataset (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samed.evaluate.metrics import dice
from samed.train import config_from_dict, finetune, loss_fn, lr_factor, validate
from samed.train.data import load_cases, prepare_targets

LATE = r"image_encoder\.layers\.3\..*\.attn\.qkv"


def make_tiny_dataset(root: Path) -> Path:
    """4 volumes of 2 slices (40 x 48) under ``root``: a bright disk (class 1) and a square
    (class 2), MSD-style (``dataset.json`` with train/val splits). Returns ``root``."""
    import nibabel as nib

    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    yy, xx = np.mgrid[:40, :48]
    for i in range(4):
        lab = np.zeros((2, 40, 48), np.uint8)
        cy, cx = 20 + rng.integers(-4, 5), 16 + rng.integers(-4, 5)
        lab[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 49] = 1
        lab[:, 10:22, 30:42] = 2
        img = 0.1 + 0.5 * (lab == 1) + 0.8 * (lab == 2) + 0.03 * rng.standard_normal(lab.shape)
        # files store (x, y, z); samed reads them as (z, y, x)
        nib.save(
            nib.Nifti1Image(img.astype(np.float32).T, np.eye(4)), root / f"imagesTr/c{i}.nii.gz"
        )
        nib.save(nib.Nifti1Image(lab.T, np.eye(4)), root / f"labelsTr/c{i}.nii.gz")
        training.append({"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "name": "tiny",
                "labels": {"0": "background", "1": "disk", "2": "square"},
                "training": training,
                "splits": {"train": ["c0", "c1", "c2"], "val": ["c3"]},
            }
        )
    )
    return root


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tinyds"))


def _cfg(root: Path, **over: dict) -> object:
    raw = {
        "name": "tiny-adapter",
        "mode": "automatic",
        "model": {"kind": "tiny"},
        "data": {
            "root": str(root),
            "train_split": "train",
            "val_split": None,
            "empty_slice_fraction": 0.0,
        },
        "lora": {"r": 2, "alpha": 2, "target_modules": LATE},
        "augment": {"enabled": False},
        "optim": {"lr": 1e-3, "warmup": 0, "schedule": "constant"},
        "train": {
            "iterations": 6,
            "batch_size": 1,
            "cache_stages": 3,
            "cache_copies": 1,
            "log_interval": 100,
            "checkpoint_interval": 100,
            "device": "cpu",
        },
        "validation": {"interval": 0},
    }
    for k, v in over.items():
        raw.setdefault(k, {}).update(v) if isinstance(v, dict) else raw.__setitem__(k, v)
    return config_from_dict(raw)


def test_loss_falls_and_exported_adapter_reloads(
    tiny_dataset: Path, tmp_path: Path, make_tiny_model
) -> None:
    from samed.lora import load_adapter

    cfg = _cfg(tiny_dataset, data={"val_split": "val"})
    res = finetune(cfg, tmp_path / "run", log=lambda s: None)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    losses = [v for _, v in m["loss"]]
    assert res["steps"] == 6 and len(losses) == 6
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    assert (tmp_path / "run" / "curve.png").stat().st_size > 1000
    folder = res["adapter"]
    meta = json.loads((folder / "metadata.json").read_text())
    for key in (
        "description",
        "labels",
        "preprocessing",
        "training_data",
        "validation",
        "command",
        "samed_version",
        "intended_use",
    ):
        assert key in meta
    assert meta["training_data"]["cases"] == ["c0", "c1", "c2"]
    assert meta["validation"]["per_class"].keys() == {"disk", "square"}
    # the reloaded adapter predicts exactly what the exported (best) model scored
    cases, labels, _ = load_cases(cfg.data, "val")
    m1 = make_tiny_model(seed=cfg.train.seed)
    load_adapter(m1, folder)
    r1 = validate(m1, cases, labels, "automatic")
    assert r1["mean_dice"] == pytest.approx(meta["validation"]["mean_dice"], abs=1e-9)
    with pytest.raises(ValueError, match="SHA-256"):  # another random base model is refused
        load_adapter(make_tiny_model(seed=123), folder)


def test_exported_adapter_records_chosen_postprocessing(
    tiny_dataset: Path, tmp_path: Path, make_tiny_model
) -> None:
    """The YAML path decides the largest-component clean-up on its validation volumes (as the
    quick recipe does), records it in metadata.json, and Session.automatic applies it."""
    from samed.engine import Session
    from samed.lora import load_adapter
    from samed.postprocess import choose_largest_component, keep_largest_component

    cfg = _cfg(
        tiny_dataset,
        data={"val_split": "val"},
        optim={"lr": 1e-2},
        train={"iterations": 12},
        validation={"interval": 4},
    )
    res = finetune(cfg, tmp_path / "run", log=lambda s: None)
    meta = json.loads((res["adapter"] / "metadata.json").read_text())
    post = meta["postprocessing"]
    # the record is the decision on the raw predictions of the validation volume(s)
    cases, labels, _ = load_cases(cfg.data, "val")
    model = make_tiny_model(seed=cfg.train.seed)
    load_adapter(model, res["adapter"])
    raw = [Session(model, c.image, intensity="minmax").automatic(postprocess="none") for c in cases]
    fg = {k: v for k, v in labels.items() if k}
    want = choose_largest_component(list(zip(raw, [c.label for c in cases], strict=True)), fg)
    assert post["largest_component"] == want["largest_component"]
    assert post["measured"] == want["measured"]
    assert model.adapter.postprocessing == post
    lcc = post["largest_component"]
    out = Session(model, cases[0].image, intensity="minmax").automatic()
    np.testing.assert_array_equal(out, keep_largest_component(raw[0], lcc) if lcc else raw[0])
    # prompted runs record none (the clean-up is for automatic adapters)
    pcfg = _cfg(tiny_dataset, mode="prompted", data={"val_split": "val"}, train={"iterations": 1})
    pres = finetune(pcfg, tmp_path / "p", log=lambda s: None)
    assert "postprocessing" not in json.loads((pres["adapter"] / "metadata.json").read_text())


def test_resume_continues_identically(tiny_dataset: Path, tmp_path: Path) -> None:
    # on-the-fly MONAI augmentation, full encoder path
    over = {
        "augment": {"enabled": True, "noise_prob": 0.5},
        "train": {"iterations": 3, "cache_stages": 0},
    }
    cfg = _cfg(tiny_dataset, **over)
    finetune(cfg, tmp_path / "a", log=lambda s: None)
    part = finetune(cfg, tmp_path / "b", log=lambda s: None, stop_after=1)
    assert part["interrupted"] and part["steps"] == 1
    finetune(cfg, tmp_path / "b", resume=True, log=lambda s: None)
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ca["trainable"].keys() == cb["trainable"].keys()
    for k, v in ca["trainable"].items():
        assert torch.equal(v, cb["trainable"][k]), k
    la = json.loads((tmp_path / "a" / "metrics.json").read_text())["loss"]
    lb = json.loads((tmp_path / "b" / "metrics.json").read_text())["loss"]
    assert la == lb


def test_resume_refuses_another_config(tiny_dataset: Path, tmp_path: Path) -> None:
    finetune(_cfg(tiny_dataset), tmp_path / "r", log=lambda s: None, stop_after=0)
    other = _cfg(tiny_dataset, optim={"lr": 1e-2})
    with pytest.raises(ValueError, match="another config"):
        finetune(other, tmp_path / "r", resume=True, log=lambda s: None)


def test_resume_accepts_the_same_config_with_remapped_labels(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    # data.labels has integer ids, which the checkpoint's JSON stores as strings
    labels = {"labels": {1: {"name": "disk", "source": [1]}, 2: {"name": "square", "source": [2]}}}
    cfg = _cfg(tiny_dataset, data=labels, train={"iterations": 2})
    assert finetune(cfg, tmp_path / "a", log=lambda s: None, stop_after=1)["interrupted"]
    res = finetune(cfg, tmp_path / "a", resume=True, log=lambda s: None)
    assert res["steps"] == 2
    other = _cfg(tiny_dataset, data=labels, train={"iterations": 2}, optim={"lr": 1e-2})
    with pytest.raises(ValueError, match="another config"):
        finetune(other, tmp_path / "a", resume=True, log=lambda s: None)


def test_prompted_mode_trains_and_validates(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        tiny_dataset,
        mode="prompted",
        data={"val_split": "val"},
        prompt={"point_prob": 0.5, "max_points": 2},
        train={"iterations": 1},
    )
    res = finetune(cfg, tmp_path / "p", log=lambda s: None)
    assert 0.0 <= res["best_mean_dice"] <= 1.0
    cfgj = json.loads((res["adapter"] / "adapter_config.json").read_text())
    assert cfgj["mode"] == "prompted"


def test_cache_stages_refuses_early_lora(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_dataset, lora={"target_modules": r"image_encoder\..*\.attn\.qkv"})
    with pytest.raises(ValueError, match="cache_stages"):
        finetune(cfg, tmp_path / "x", log=lambda s: None)


def test_loss_and_targets() -> None:
    t = torch.zeros(1, 8, 8, dtype=torch.long)
    t[0, 2:5, 2:5] = 1
    perfect = torch.full((1, 2, 8, 8), -20.0)
    perfect[:, 0][t == 0] = 20
    perfect[:, 1][t == 1] = 20
    assert float(loss_fn(perfect, t, "automatic", 0.8, 0.2)) < 1e-3
    assert float(loss_fn(-perfect, t, "automatic", 0.8, 0.2)) > 0.5
    lab = np.zeros((1, 20, 40), np.int64)
    lab[0, :, :20] = 3
    out = prepare_targets(lab, 16, 8)
    assert out.shape == (1, 8, 8)
    assert out[0, :4, :4].eq(3).all() and out[0, 5:].eq(0).all()  # padded rows are background


def test_dice_and_schedule() -> None:
    a = np.zeros((2, 4, 4), bool)
    a[0, :2] = True
    assert dice(a, a) == 1.0
    assert np.isnan(dice(a, np.zeros_like(a)))
    cfg = config_from_dict(
        {"name": "x", "data": {"root": "r"}, "optim": {"warmup": 10}, "train": {"iterations": 100}}
    )
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) < 0.01


def _absent_class_grad(dice_classes: str, dice_w: float, ce_w: float) -> tuple[float, float]:
    """Loss and the summed gradient on class 2's logits for a batch of 2 (8 x 8) where class 1
    is present and class 2 is absent and nearly never predicted (sum of its probability ~5e-5,
    the regime a rare class reaches after many batches without it)."""
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    t[:, 2:5, 2:5] = 1
    z = torch.zeros(2, 3, 8, 8)
    z[:, 1][t == 1] = 2.0
    z[:, 2] = -14.0
    z.requires_grad_(True)
    loss = loss_fn(z, t, "automatic", dice_w, ce_w, dice_classes=dice_classes)
    loss.backward()
    return float(loss.detach()), float(z.grad[:, 2].sum())


def test_dice_over_present_classes_does_not_suppress_an_absent_class() -> None:
    _, ce_only = _absent_class_grad("all", 0.0, 1.0)  # CE alone: a small push down (> 0)
    assert ce_only > 0
    _, all_dice = _absent_class_grad("all", 1.0, 0.0)
    # 'all': the absent class's Dice term (~1 unless its probability is ~0 everywhere) pushes
    # its logits down, here by far more than cross-entropy does
    assert all_dice > 1e4 * ce_only
    loss_p, present = _absent_class_grad("present", 0.8, 0.2)
    # 'present': nothing beyond cross-entropy (only class 1's Dice, via the softmax, is left)
    assert present <= 0.2 * ce_only + 1e-9
    loss_a, mixed = _absent_class_grad("all", 0.8, 0.2)
    assert mixed > 1e4 * ce_only and loss_a > loss_p + 0.05


def test_dice_classes_present_equals_all_when_every_class_is_present() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.zeros(2, 8, 8, dtype=torch.long)
    t[0, :3] = 1
    t[1, 5:] = 2
    for mode_t, mode_l, mode in (
        (t, logits, "automatic"),
        ((t > 0).long(), logits[:, :1], "prompted"),
    ):
        a = loss_fn(mode_l, mode_t, mode, 0.8, 0.2)
        p = loss_fn(mode_l, mode_t, mode, 0.8, 0.2, dice_classes="present")
        assert float(p) == pytest.approx(float(a), abs=1e-6)
    # no foreground at all: 'present' has no Dice term, only cross-entropy
    empty = torch.zeros(2, 8, 8, dtype=torch.long)
    ce = torch.nn.functional.cross_entropy(logits, empty)
    p = loss_fn(logits, empty, "automatic", 0.8, 0.2, dice_classes="present")
    assert float(p) == pytest.approx(0.2 * float(ce), abs=1e-6)
    assert float(loss_fn(logits, empty, "automatic", 0.8, 0.2)) > float(p) + 0.5
    with pytest.raises(ValueError, match="dice_classes"):
        loss_fn(logits, t, "automatic", 0.8, 0.2, dice_classes="some")
