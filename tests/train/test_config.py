"""Fine-tuning configs: YAML round trip, shipped presets, and validation naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from samed.train.config import FinetuneConfig, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
BASE = {"name": "x", "data": {"root": "somewhere"}}


def _with(section: str, key: str, value: object) -> dict:
    raw = {"name": "x", "data": {"root": "somewhere"}}
    if section:
        raw.setdefault(section, {})[key] = value
    else:
        raw[key] = value
    return raw


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, FinetuneConfig)
    assert cfg.name


def test_round_trip_through_dict(tmp_path: Path) -> None:
    cfg = config_from_dict({**BASE, "mode": "prompted", "augment": {"scale": [0.9, 1.1]}})
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(p) == cfg


def test_overrides_apply(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, {"train.iterations": 7, "lora.r": 2})
    assert cfg.train.iterations == 7 and cfg.lora.r == 2
    assert cfg.loss.dice_classes == "all"  # the default keeps every existing config's meaning
    cfg = load_config(p, {"loss.dice_classes": "present"})
    assert cfg.loss.dice_classes == "present"
    assert config_from_dict(cfg.to_dict()).loss.dice_classes == "present"
    assert cfg.loss.loss_fn_kwargs() == {"dice_w": 0.8, "ce_w": 0.2, "dice_classes": "present"}


@pytest.mark.parametrize(
    ("section", "key", "value", "needle"),
    [
        ("", "mode", "semi", "mode"),
        ("", "name", "", "name"),
        ("model", "kind", "sam_vit_z", "model.kind"),
        ("data", "format", "zip", "data.format"),
        ("data", "empty_slice_fraction", 1.5, "empty_slice_fraction"),
        ("data", "label_source", "guess", "label_source"),
        ("data", "labels", {1: {"name": "a"}}, "labels"),
        ("data", "labels", {2: {"name": "a", "source": [1]}}, "labels"),
        ("lora", "r", 0, "lora.r"),
        ("lora", "dropout", 1.0, "lora.dropout"),
        ("lora", "projections", ["q", "x"], "projections"),
        ("augment", "rotate_deg", -1, "rotate_deg"),
        ("augment", "scale", [1.2, 0.8], "augment.scale"),
        ("augment", "flip_prob", 2, "flip_prob"),
        ("prompt", "box_margin", [5, 1], "box_margin"),
        ("prompt", "max_points", 0, "max_points"),
        ("loss", "dice_weight", -1, "dice_weight"),
        ("loss", "dice_classes", "some", "loss.dice_classes"),
        ("optim", "name", "lbfgs", "optim.name"),
        ("optim", "schedule", "step", "optim.schedule"),
        ("optim", "lr", 0, "optim.lr"),
        ("train", "iterations", 0, "train.iterations"),
        ("train", "batch_size", 1.5, "train.batch_size"),
        ("train", "device", "tpu", "train.device"),
        ("train", "max_minutes", -1, "max_minutes"),
        ("validation", "interval", -1, "validation.interval"),
        ("validation", "limit", 0, "validation.limit"),
    ],
)
def test_invalid_values_name_the_field(section: str, key: str, value: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        config_from_dict(_with(section, key, value))


@pytest.mark.parametrize(
    "raw",
    [
        {**BASE, "trian": {}},
        {**BASE, "train": {"iteratons": 3}},
        {"data": {"root": "x"}},
        {**BASE, "train": [1, 2]},
    ],
)
def test_unknown_or_malformed_keys_are_refused(raw: dict) -> None:
    with pytest.raises(ValueError):
        config_from_dict(raw)


def test_pairs_need_cases() -> None:
    with pytest.raises(ValueError, match="cases"):
        config_from_dict({"name": "x", "data": {"format": "pairs"}})
    cfg = config_from_dict(
        {
            "name": "x",
            "data": {"format": "pairs", "cases": [{"image": "a", "label": "b", "z_range": [0, 3]}]},
        }
    )
    assert cfg.data.cases[0]["z_range"] == [0, 3]


def test_bad_yaml_names_the_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(p)


def test_lora_section_is_the_adapters_lora_settings() -> None:
    """The YAML lora section and adapter_config.json share one dataclass: same fields, same checks."""
    from dataclasses import fields

    from samed.lora import LoraConfig, LoraSettings

    cfg = config_from_dict({**BASE, "lora": {"r": 2, "alpha": 8, "projections": ["q", "k", "v"]}})
    assert type(cfg.lora) is LoraSettings and issubclass(LoraConfig, LoraSettings)
    lc = LoraConfig(
        **{f.name: getattr(cfg.lora, f.name) for f in fields(cfg.lora)},
        mode="automatic",
        num_classes=3,
    )
    assert lc.scaling == 4.0 and lc.projections == ("q", "k", "v") and lc.train_decoder
    for key, value in (("alpha", 0), ("train_decoder", "yes"), ("target_modules", "(")):
        with pytest.raises(ValueError, match=rf"lora\.{key}"):
            LoraConfig(**{key: value})
        with pytest.raises(ValueError, match=rf"lora\.{key}"):
            config_from_dict({**BASE, "lora": {key: value}})
    # what the run decides (mode, class count) is not a YAML lora key
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_dict({**BASE, "lora": {"mode": "automatic"}})
