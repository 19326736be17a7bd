"""Semi-supervised training (samed.train.semi) on a tiny random model and tiny synthetic volumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from samed.train import config_from_dict, finetune, loss_fn
from samed.train.semi import (
    IGNORE,
    SemiSection,
    cache_embeddings,
    load_semi_config,
    pseudo_label_report,
    split_cases,
)
from samed.train.semi_train import Pool, build_pool, paste_box, score_cached, semi_batch, train_semi

LATE = r"image_encoder\.layers\.3\..*\.attn\.qkv"


def _make_dataset(root: Path) -> Path:
    """6 volumes of 2 slices (40 x 48), a disk (1) and a square (2); splits: train c0..c4,
    labeled c0 + c1, val c5."""
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:40, :48]
    training = []
    for i in range(6):
        lab = np.zeros((2, 40, 48), np.uint8)
        cy, cx = 20 + rng.integers(-4, 5), 16 + rng.integers(-4, 5)
        lab[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 49] = 1
        lab[:, 10:22, 30:42] = 2
        img = 0.1 + 0.5 * (lab == 1) + 0.8 * (lab == 2) + 0.03 * rng.standard_normal(lab.shape)
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
                "splits": {
                    "train": ["c0", "c1", "c2", "c3", "c4"],
                    "labeled": ["c0", "c1"],
                    "val": ["c5"],
                },
            }
        )
    )
    return root


def _raw(root: Path, teacher: Path | str, **semi: object) -> dict:
    return {
        "name": "tiny-semi",
        "mode": "automatic",
        "model": {"kind": "tiny"},
        "data": {
            "root": str(root),
            "train_split": "labeled",
            "val_split": "val",
            "empty_slice_fraction": 0.0,
        },
        "lora": {"r": 2, "alpha": 2, "target_modules": LATE},
        "augment": {"enabled": True, "affine_prob": 1.0, "flip_prob": 0.0},
        "optim": {"lr": 1e-3, "warmup": 0, "schedule": "constant"},
        "train": {
            "iterations": 4,
            "batch_size": 4,
            "log_interval": 100,
            "checkpoint_interval": 1,
            "device": "cpu",
            "amp": False,
        },
        "validation": {"interval": 0},
        "semi": {"teacher": str(teacher), "labeled_copies": 2, "mix_prob": 0.5, **semi},
    }


def _cfg(tmp: Path, raw: dict, **over: object):
    p = tmp / f"semi-{len(list(tmp.glob('semi-*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_semi_config(p, over)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The dataset, a teacher trained on the labeled split only, and a filled cache made on a
    copy of the dataset whose unlabeled label files are garbage (so reading one would fail)."""
    base = tmp_path_factory.mktemp("semi")
    root = _make_dataset(base / "ds")
    tcfg = config_from_dict(
        {k: v for k, v in _raw(root, "").items() if k not in ("semi", "augment")}
        | {
            "train": {
                "iterations": 6,
                "batch_size": 2,
                "device": "cpu",
                "log_interval": 100,
                "checkpoint_interval": 100,
                "cache_stages": 3,
                "cache_copies": 1,
            },
            "data": {
                "root": str(root),
                "train_split": "labeled",
                "val_split": None,
                "empty_slice_fraction": 0.0,
            },
        }
    )
    teacher = finetune(tcfg, base / "teacher", log=lambda s: None)["adapter"]
    blind = base / "blind"
    shutil.copytree(root, blind)
    for i in (2, 3, 4):  # the unlabeled cases: their labels are unreadable here
        (blind / f"labelsTr/c{i}.nii.gz").write_bytes(b"not a label file")
    cfg, semi = _cfg(base, _raw(blind, teacher))
    out = base / "run"
    counts = cache_embeddings(cfg, semi, out, log=lambda s: None)
    return {
        "root": root,
        "blind": blind,
        "teacher": teacher,
        "base": base,
        "out": out,
        "counts": counts,
    }


def test_loss_valid_mask_ignores_left_out_voxels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    t = torch.randint(0, 3, (2, 8, 8))
    valid = torch.rand(2, 8, 8) > 0.3
    t2 = torch.where(valid, t, (t + 1) % 3)  # other targets on the left-out voxels only
    a = loss_fn(logits, t, "automatic", 0.8, 0.2, valid=valid)
    b = loss_fn(logits, t2, "automatic", 0.8, 0.2, valid=valid)
    assert float(a) == pytest.approx(float(b), abs=1e-6)
    assert float(a) != pytest.approx(float(loss_fn(logits, t2, "automatic", 0.8, 0.2)), abs=1e-4)
    full = torch.ones(2, 8, 8, dtype=torch.bool)
    assert float(loss_fn(logits, t, "automatic", 0.8, 0.2, valid=full)) == pytest.approx(
        float(loss_fn(logits, t, "automatic", 0.8, 0.2)), abs=1e-6
    )


def test_semi_section_names_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="voxel_threshold"):
        SemiSection(voxel_threshold=1.5)
    with pytest.raises(ValueError, match="uncertainty"):
        SemiSection(uncertainty="dropout")
    with pytest.raises(ValueError, match="unknown keys"):
        _cfg(tmp_path, _raw(tmp_path, "t", typo=1))


def test_split_and_cache_never_read_unlabeled_labels(setup: dict) -> None:
    cfg, semi = _cfg(setup["base"], _raw(setup["blind"], setup["teacher"]))
    split = split_cases(cfg, semi)
    assert [c.case_id for c in split["unlabeled"]] == ["c2", "c3", "c4"]
    assert [c.case_id for c in split["val"]] == ["c5"]
    assert setup["counts"] == {"labeled": 2, "unlabeled": 3, "val": 1}
    f = torch.load(setup["out"] / "cache/unlabeled/c2.pt", weights_only=True)
    assert f["emb"].shape == (2, 256, 64, 64) and f["emb"].dtype == torch.float16
    assert f["label"].shape == f["unc"].shape == (2, 40, 48)
    assert 0.0 <= float(f["unc"].float().min()) and float(f["unc"].float().max()) <= 1.0
    lab = torch.load(setup["out"] / "cache/labeled/c0.pt", weights_only=True)
    assert lab["emb"].shape[0] == 2 * 2  # 2 slices x labeled_copies
    # a second call finds everything cached
    assert cache_embeddings(cfg, semi, setup["out"], log=lambda s: None) == {
        "labeled": 0,
        "unlabeled": 0,
        "val": 0,
    }


def test_filter_leaves_out_uncertain_voxels_and_slices(tmp_path: Path) -> None:
    d = tmp_path / "cache" / "unlabeled"
    d.mkdir(parents=True)
    lab = np.zeros((4, 64, 64), np.int16)
    lab[:, 10:40, 10:40] = 1
    unc = np.zeros((4, 64, 64), np.float16)
    unc[0, 10:20, 10:40] = 0.9  # uncertain voxels on slice 0
    unc[3, 10:40, 10:40] = 0.4  # slice 3: the most uncertain per foreground voxel
    torch.save(
        {
            "emb": torch.zeros(4, 2, 16, 16, dtype=torch.float16),
            "label": torch.as_tensor(lab),
            "unc": torch.as_tensor(unc),
            "score": 0.0,
        },
        d / "v.pt",
    )
    semi = SemiSection(voxel_threshold=0.5, slice_drop_fraction=0.25)
    pool = build_pool(tmp_path, "unlabeled", semi, 64, 64)
    assert len(pool.emb) == 3  # slice 3 dropped
    t0 = pool.target[0].numpy()
    assert (t0[10:20, 10:40] == IGNORE).all() and (t0[20:40, 10:40] == 1).all()
    assert not (pool.target[1].numpy() == IGNORE).any()
    keep_all = build_pool(
        tmp_path, "unlabeled", SemiSection(voxel_threshold=1.0, slice_drop_fraction=0.0), 64, 64
    )
    assert len(keep_all.emb) == 4 and not any((t == IGNORE).any() for t in keep_all.target)


def test_paste_box_and_batches() -> None:
    e, t = torch.zeros(2, 8, 8), torch.zeros(32, 32, dtype=torch.uint8)
    se, st = torch.ones(2, 8, 8), torch.full((32, 32), 2, dtype=torch.uint8)
    pe, pt = paste_box(e, t, se, st, (1, 2, 4, 6), 4)
    assert pe[:, 1:4, 2:6].eq(1).all() and pe.sum() == 2 * 3 * 4
    assert pt[4:16, 8:24].eq(2).all() and int((pt == 2).sum()) == 12 * 16
    assert e.sum() == 0  # inputs unchanged
    lab = Pool(
        [torch.ones(2, 8, 8)] * 3, [torch.full((32, 32), 1, dtype=torch.uint8)] * 3, [0, 1, 2], []
    )
    tp = torch.full((32, 32), IGNORE, dtype=torch.uint8)
    tp[:16] = 2
    pse = Pool([torch.zeros(2, 8, 8)] * 2, [tp] * 2, [0, 1], [])
    raw = _raw(Path("/x"), "t", mix_prob=0.0, labeled_fraction=0.5)
    cfg = config_from_dict({k: v for k, v in raw.items() if k != "semi"})
    semi = SemiSection(**{**raw["semi"], "mix_prob": 0.0})
    b = semi_batch(lab, pse, cfg, semi, 3)
    assert b["kinds"] == ["labeled", "labeled", "pseudo", "pseudo"]
    assert b["valid"][:2].all() and not b["valid"][2:, 16:].any() and b["valid"][2:, :16].all()
    assert (b["targets"][2:, 16:] == 0).all()
    mixed = SemiSection(**{**raw["semi"], "mix_prob": 1.0})
    b1, b2 = semi_batch(lab, pse, cfg, mixed, 5), semi_batch(lab, pse, cfg, mixed, 5)
    assert torch.equal(b1["features"], b2["features"]) and torch.equal(b1["targets"], b2["targets"])
    # every labeled sample got a pseudo box (zeros), every pseudo sample a labeled box (ones)
    assert (b1["features"][:2] == 0).any() and (b1["features"][2:] == 1).any()


def test_train_resumes_exactly_and_exports_student(setup: dict, tmp_path: Path) -> None:
    from samed.model import build_tiny_model, load_model

    out1, out2 = tmp_path / "one", tmp_path / "two"
    for o in (out1, out2):
        shutil.copytree(setup["out"] / "cache", o / "cache")
    raw = _raw(setup["blind"], setup["teacher"])
    cfg4, semi = _cfg(tmp_path, raw)
    r1 = train_semi(cfg4, semi, out1, log=lambda s: None)
    assert r1["step"] == 4 and r1["finished"]
    cfg2, _ = _cfg(tmp_path, raw, **{"train.iterations": 2})
    assert train_semi(cfg2, semi, out2, log=lambda s: None)["step"] == 2
    assert train_semi(cfg4, semi, out2, log=lambda s: None)["step"] == 4
    c1 = torch.load(out1 / "checkpoint.pt", weights_only=True)["decoder"]
    c2 = torch.load(out2 / "checkpoint.pt", weights_only=True)["decoder"]
    assert all(torch.equal(c1[k], c2[k]) for k in c1)
    teacher = load_model(build_tiny_model(seed=0), adapter=setup["teacher"])
    student = load_model(build_tiny_model(seed=0), adapter=out1 / "adapter")
    tdec, sdec = teacher.mask_decoder.state_dict(), student.mask_decoder.state_dict()
    assert any(not torch.equal(tdec[k], sdec[k]) for k in tdec)  # the decoder trained
    for k, v in sdec.items():  # the exported decoder is the trained one (fp16 storage)
        assert torch.allclose(v, c1[k].float(), atol=2e-3, rtol=1e-2), k
    tl = {n: p for n, p in teacher.named_parameters() if ".lora_" in n}
    sl = {n: p for n, p in student.named_parameters() if ".lora_" in n}
    assert tl.keys() == sl.keys() and tl
    assert all(torch.allclose(tl[n], sl[n], atol=1e-3) for n in tl)  # encoder = teacher's
    meta = json.loads((out1 / "adapter" / "metadata.json").read_text())
    assert meta["semi_supervised"]["unlabeled_cases"] == ["c2", "c3", "c4"]
    assert meta["training"]["iterations_run"] == 4
    sc = score_cached(cfg4, semi, out1)
    assert sc["volumes"] == 1
    for kind in ("none", "largest_component"):
        assert 0.0 <= sc[kind]["mean"] <= 1.0


def test_pseudo_label_report_uses_hidden_labels_for_reporting(setup: dict, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    shutil.copytree(setup["out"] / "cache", out / "cache")
    cfg, semi = _cfg(tmp_path, _raw(setup["root"], setup["teacher"]))  # the readable labels
    rep = pseudo_label_report(cfg, semi, out)
    assert rep["volumes"] == 3 and set(rep["dice_per_class"]) == {"disk", "square"}
    assert 0.0 <= rep["foreground_voxels_left_out"] <= 1.0
    assert json.loads((out / "pseudo_quality.json").read_text())["volumes"] == 3


SEMI_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "semi").glob("*.yaml"))


@pytest.mark.parametrize("path", SEMI_CONFIGS, ids=lambda p: p.name)
def test_shipped_semi_configs_load(path: Path) -> None:
    from samed.registry import resolve_adapter

    cfg, semi = load_semi_config(path)
    assert cfg.mode == "automatic" and cfg.data.label_source == "semi"
    assert resolve_adapter(semi.teacher).is_dir()
