"""Training from an annotations folder (the widget's export) with the fast decoder recipe, on a
tiny random model and tiny synthetic volumes: the folder round trip, a stop that keeps a
loadable adapter, the adapter listed where samed finds adapters, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from samed.train.annotations import (
    MANIFEST,
    annotations_config,
    export_pair,
    read_annotations,
    split_pairs,
)

TINY = {
    "model.kind": "tiny",
    "train.max_minutes": None,
    "train.iterations": 4,
    "train.batch_size": 1,
    "train.cache_copies": 1,
    "train.device": "cpu",
    "validation.interval": 2,
}


def _folder(tmp_path: Path, make_tiny_volume, n: int = 4) -> Path:
    """n annotated tiny volumes (labels 1 = the bright block, 2 = its core)."""
    folder = tmp_path / "annotations"
    for i in range(n):
        vol = make_tiny_volume(seed=i)
        lab = np.zeros(vol.array.shape, np.int16)
        lab[:, 20:40, 30:60] = 1
        lab[:, 25:35, 35:45] = 2
        export_pair(folder, f"case{i}", vol, lab, {1: "block", 2: "core"}, source=f"/x/{i}.nii")
    return folder


def test_export_and_read_pairs(tmp_path, make_tiny_volume):
    folder = _folder(tmp_path, make_tiny_volume)
    pairs, labels, _ = read_annotations(folder)
    assert [p.name for p in pairs] == ["case0", "case1", "case2", "case3"]
    assert labels == {1: "block", 2: "core"}
    from samed.io import load_label_map, load_volume

    vol = load_volume(pairs[1].image)
    np.testing.assert_allclose(vol.array, make_tiny_volume(seed=1).array, atol=1e-5)
    assert int(load_label_map(pairs[1].label, reference=vol).array.max()) == 2
    train, val = split_pairs(pairs)
    assert [p.name for p in val] == ["case3"] and len(train) == 3
    cfg = annotations_config(folder, "mine", overrides=TINY)
    assert {c["split"] for c in cfg.data.cases} == {"train", "val"}
    assert cfg.data.labels == {
        1: {"name": "block", "source": [1]},
        2: {"name": "core", "source": [2]},
    }


def test_manifest_cannot_point_outside(tmp_path, make_tiny_volume):
    folder = _folder(tmp_path, make_tiny_volume, n=1)
    raw = json.loads((folder / MANIFEST).read_text())
    raw["pairs"][0]["image"] = "../../etc/passwd"
    (folder / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="pairs\\[0\\].image"):
        read_annotations(folder)


def test_empty_labels_refused(tmp_path, make_tiny_volume):
    vol = make_tiny_volume()
    with pytest.raises(ValueError, match="empty"):
        export_pair(tmp_path, "a", vol, np.zeros(vol.array.shape, np.int16))


def test_train_install_and_list(tmp_path, make_tiny_volume, monkeypatch):
    from samed.registry import find_adapters, resolve_adapter, user_adapter_dir
    from samed.train.annotations import train_from_annotations

    folder = _folder(tmp_path, make_tiny_volume)
    events: list[dict] = []
    res = train_from_annotations(
        folder, "mine", overrides=TINY, callback=events.append, log=lambda s: None
    )
    assert res["steps"] == 4 and res["best_step"] in (2, 4)
    kinds = {e["event"] for e in events}
    assert {"cache", "step", "val", "done"} <= kinds
    installed = Path(res["installed"])
    assert installed == user_adapter_dir() / "mine"
    assert (user_adapter_dir() / "mine.yaml").is_file()
    assert "mine" in {a.name for a in find_adapters()}
    assert resolve_adapter("mine") == installed.resolve()
    meta = json.loads((installed / "metadata.json").read_text())
    assert [i["name"] for i in meta["annotations"]["images"]] == [
        "case0",
        "case1",
        "case2",
        "case3",
    ]
    assert meta["annotations"]["held_back_for_validation"] == ["case3"]
    # the adapter loads onto the tiny model and segments automatically
    from samed.engine import Session
    from samed.lora import load_adapter
    from samed.model import build_tiny_model

    model = build_tiny_model("tinyvit", seed=0)
    load_adapter(model, installed)
    out = Session(model, make_tiny_volume()).automatic(postprocess="none")
    assert out.shape == (3, 60, 80) and set(np.unique(out)) <= {0, 1, 2}
    # the largest-component clean-up was decided on the held-back volume and is recorded the way
    # the shipped adapters record it; Session.automatic applies what was recorded
    from samed.postprocess import keep_largest_component

    post = meta["postprocessing"]
    [measured] = post["measured"].values()
    gain = {n: measured["largest_component"][n] - measured["none"][n] for n in ("block", "core")}
    assert post["largest_component"] == (
        [k for k, n in ((1, "block"), (2, "core")) if gain[n] > 0] or False
    )
    assert model.adapter.postprocessing == post
    lcc = post["largest_component"]
    want = keep_largest_component(out, lcc) if lcc else out
    np.testing.assert_array_equal(Session(model, make_tiny_volume()).automatic(), want)


def test_stop_keeps_best_adapter(tmp_path, make_tiny_volume):
    from samed.lora import load_adapter
    from samed.model import build_tiny_model
    from samed.train.annotations import train_from_annotations

    folder = _folder(tmp_path, make_tiny_volume)
    steps: list[int] = []

    def callback(ev: dict) -> None:
        if ev["event"] == "step":
            steps.append(ev["step"])

    res = train_from_annotations(
        folder,
        "stopped",
        overrides={**TINY, "train.iterations": 1000},
        callback=callback,
        should_stop=lambda: len(steps) >= 3,
        log=lambda s: None,
    )
    assert res["stopped"] and res["steps"] == 3 and res["best_step"] == 2
    model = build_tiny_model("tinyvit", seed=0)
    load_adapter(model, res["installed"])
    meta = json.loads((Path(res["installed"]) / "metadata.json").read_text())
    assert meta["training"]["best_step"] == 2


def test_cli_from_annotations(tmp_path, make_tiny_volume, capsys):
    from samed.cli import main

    folder = _folder(tmp_path, make_tiny_volume, n=2)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={'null' if v is None else v}")]
    rc = main(
        [
            "finetune",
            "--from-annotations",
            str(folder),
            "--name",
            "cli-mine",
            "--out",
            str(tmp_path / "run"),
            *sets,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "finetune.yaml").is_file()
    rc = main(["finetune", "--from-annotations", str(folder), "--name", "../bad"])
    assert rc == 2 and "adapter name" in capsys.readouterr().err


def test_embedding_cache_is_reused(tmp_path, make_tiny_volume):
    """A second run on the same data reads the cached embeddings back (only the missing copies
    are computed) and trains exactly as the first; another augmentation computes its own."""
    from safetensors.torch import load_file

    from samed.train.quick import train_quick

    folder = _folder(tmp_path, make_tiny_volume)
    over = {**TINY, "train.cache_copies": 2}
    store = tmp_path / "emb.pt"
    totals = []
    for run, extra in (("a", {}), ("b", {}), ("c", {"augment.rotate_deg": 5.0})):
        cfg = annotations_config(folder, "c", overrides={**over, **extra})
        events: list[dict] = []
        res = train_quick(
            cfg, tmp_path / run, callback=events.append, log=lambda s: None, embedding_cache=store
        )
        totals.append(max(e["total"] for e in events if e["event"] == "cache"))
        assert res["cache_encoder"] == "torch-fp32" and res["steps"] == 4
    n_train, n_val = 3 * 3, 3  # three 3-slice training volumes, one held back
    assert totals == [2 * n_train + n_val, n_val, n_train + n_val]
    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
