"""Training the click-aware adapter with simulated interactive sessions (issue #17).

Recipe (CPU-sized): the image encoder stays frozen, so the base model's embeddings of a training
slice set are computed once (:mod:`samed.train.interactive_data`, float16 memory map under /tmp)
and only the prompt side trains: LoRA on the mask decoder's transformer projections plus a few
small decoder parameters in full (output tokens, the single-mask hypernetwork, the IoU head) and
the prompt encoder (6 k parameters). The adapter leaves embeddings unchanged: a session's
embedding cache stays valid and a click costs what it cost with the base model.

Each training sample is one simulated session on one structure of one slice, in the model's
S x S input frame:

* start: the structure's box with a random slack of ``box_slack`` px (slice pixels) per side
  (so boxes as people draw them hold), or (``point_start_prob``) one positive point at the
  structure's centre;
* 2-4 (``rounds``) corrective rounds: a click at the centre of the largest 2D error component
  of the current prediction (as :func:`samed.engine.interactive.simulated_click` does in 3D), or
  (``random_click_prob``) at a random error pixel; positive on a miss, negative on a leak. The
  decoder sees every click so far, the box (a point-started session gets its previous
  prediction's box + 2 px, as :func:`samed.engine.interactive.refine_slice` does) and the
  previous round's low-res logits as the mask prompt (detached, as SAM's iterative training);
* the loss is summed over all rounds and covers every decoder output the refinement reads (the
  single-mask output, SAM's three multimask outputs by SAM's min-loss rule with the others
  distilled toward the base model, the IoU head), plus a box-only distillation toward the base
  model on sets other than ACDC (:mod:`samed.train.interactive_sim`, session 7).

Samples are drawn with a per-dataset weight ``n_dataset ** -balance`` (ACDC has most slices).
Training runs in time-limited, resumable chunks: ``out/checkpoint.pt`` (trainable weights,
optimiser, RNG states, history, the best step's weights) is written at every validation and at
the end of a chunk, and a run with the same ``out`` continues from it (``resume``).
The best step on the held-back validation slices (mean Dice over a box start with 4 px slack and
3 deterministic clicks) is exported with :func:`samed.lora.save_adapter` (weights stored float16).

Command line: ``samed finetune-interactive --config configs/interactive/click-adapter.yaml --out runs/NAME``
(or ``python -m samed.train.interactive``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .interactive_sim import _centre, simulate_batch  # noqa: F401  (_centre: tests)

__all__ = ["InteractiveConfig", "load_interactive_config", "simulate_batch", "train_interactive"]

DECODER_TARGETS = r"transformer\..*(q_proj|k_proj|v_proj|out_proj|lin1|lin2)"
DECODER_FULL = (
    r"iou_token\..*|mask_tokens\..*|iou_prediction_head\..*|output_hypernetworks_mlps\.0\..*"
)


@dataclass(frozen=True)
class InteractiveConfig:
    """The click-adapter training config (``configs/interactive/click-adapter.yaml``; every key optional).

    Attributes:
        name: adapter name (folder name of the export).
        description, intended_use: metadata.json text.
        data_root: ../shared/data (relative paths resolve from the current directory).
        cache_dir: where the slice cache lives (float16 embeddings; ~2 MB per slice).
        extra_cache_dirs: further slice caches (already built) trained on together with it.
        max_slices: cap on cached slices; acdc_patients: ACDC train patients used.
        decoder_r, decoder_alpha: decoder LoRA rank and scaling numerator.
        decoder_target_modules, decoder_full_parameters: see :class:`samed.lora.LoraConfig`.
        train_prompt_encoder: train the prompt encoder in full.
        iterations, batch_size, lr, weight_decay, warmup: optimisation (AdamW, cosine decay).
        rounds: [min, max] corrective rounds after the start prompt.
        box_slack: [min, max] px of slack per box side (slice pixels).
        point_start_prob: probability a session starts from one positive point.
        random_click_prob: probability a click lands on a random error pixel.
        dice_weight, bce_weight, iou_weight: loss weights.
        multimask_weight: weight of the best-fitting multimask output's loss (SAM's rule).
        multimask_distill_weight: pull of the other multimask outputs toward the base model's.
        box_distill_weight: box-only distillation toward the base model (first round of a box
            start) on samples of datasets not in ``distill_exclude``.
        no_mask_prob: probability a corrective round is asked without the mask prompt.
        balance: dataset weight exponent of the sampler (0: every sample alike; 1: every
            dataset alike).
        resume: continue from ``out/checkpoint.pt`` when it exists.
        chunk_steps: at most this many steps per call (0: no cap; ``max_minutes`` still holds).
        val_interval: steps between validations; val_samples: validation sessions.
        max_minutes: wall-clock cap of the training loop (the best step so far is exported).
        seed, threads: RNG seed; torch threads (1 on a shared machine).
    """

    name: str = "click-aware-litemedsam"
    description: str = (
        "Click-aware prompted adapter: box + corrective clicks (LiteMedSAM decoder LoRA)"
    )
    intended_use: str = (
        "Research use: interactive 2D/3D annotation with a box and corrective clicks (napari widget, "
        "samed.annotation.Annotator). Not for clinical use."
    )
    data_root: str = "../shared/data"
    cache_dir: str = "/tmp/samed-click-cache"
    extra_cache_dirs: tuple[str, ...] = ()
    max_slices: int = 800
    acdc_patients: int = 40
    decoder_r: int = 8
    decoder_alpha: float = 8.0
    decoder_target_modules: str = DECODER_TARGETS
    decoder_full_parameters: str = DECODER_FULL
    train_prompt_encoder: bool = True
    iterations: int = 600
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 20
    rounds: tuple[int, int] = (2, 4)
    box_slack: tuple[float, float] = (0.0, 8.0)
    point_start_prob: float = 0.3
    random_click_prob: float = 0.3
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    iou_weight: float = 0.1
    multimask_weight: float = 1.0
    multimask_distill_weight: float = 0.5
    box_distill_weight: float = 1.0
    distill_exclude: tuple[str, ...] = ("acdc",)
    no_mask_prob: float = 0.25
    balance: float = 0.5
    resume: bool = True
    chunk_steps: int = 0
    val_interval: int = 100
    val_samples: int = 48
    max_minutes: float = 30.0
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        for n in (
            "iterations",
            "batch_size",
            "val_interval",
            "val_samples",
            "max_slices",
            "threads",
        ):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(n, "an integer >= 1")
        r = tuple(int(x) for x in self.rounds)
        if len(r) != 2 or not 0 <= r[0] <= r[1] <= 10:
            bad("rounds", "[min, max] with 0 <= min <= max <= 10")
        object.__setattr__(self, "rounds", r)
        s = tuple(float(x) for x in self.box_slack)
        if len(s) != 2 or not 0 <= s[0] <= s[1]:
            bad("box_slack", "[min, max] px with 0 <= min <= max")
        object.__setattr__(self, "box_slack", s)
        object.__setattr__(self, "extra_cache_dirs", tuple(str(x) for x in self.extra_cache_dirs))
        object.__setattr__(self, "distill_exclude", tuple(str(x) for x in self.distill_exclude))
        if not isinstance(self.chunk_steps, int) or self.chunk_steps < 0:
            bad("chunk_steps", "an integer >= 0")
        for n in ("multimask_weight", "multimask_distill_weight", "box_distill_weight", "balance"):
            if not float(getattr(self, n)) >= 0:
                bad(n, "a number >= 0")
        for n in ("point_start_prob", "random_click_prob", "no_mask_prob"):
            if not 0.0 <= float(getattr(self, n)) <= 1.0:
                bad(n, "a probability in [0, 1]")
        if not float(self.lr) > 0 or float(self.max_minutes) <= 0:
            bad("lr" if not float(self.lr) > 0 else "max_minutes", "a number > 0")


def load_interactive_config(path: str | os.PathLike | None, **overrides: Any) -> InteractiveConfig:
    """Read a YAML config (None: the defaults) and apply ``overrides``; unknown keys are refused."""
    import yaml

    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must hold a YAML mapping; got {type(raw).__name__}")
    raw.update(overrides)
    known = {f.name for f in fields(InteractiveConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {sorted(known)}")
    return InteractiveConfig(**raw)


# ---------------------------------------------------------------------------- training
def _batch(cache, pairs, idx):
    import torch

    rows = [pairs[i][0] for i in idx]
    order = np.argsort(rows)  # memmap reads in file order
    rows_sorted = [rows[o] for o in order]
    vals = [pairs[idx[o]][1] for o in order]
    emb = torch.from_numpy(np.asarray(cache.embeddings[rows_sorted], dtype=np.float32))
    lab = np.asarray(cache.labels[rows_sorted])
    gt = torch.from_numpy((lab == np.array(vals)[:, None, None]).astype(np.float32))
    scale = np.array([cache.index[r]["scale"] for r in rows_sorted])
    datasets = [cache.index[r]["dataset"] for r in rows_sorted]
    return emb, gt, scale, datasets


def validate_interactive(model, cache, pairs, cfg: InteractiveConfig) -> dict[str, Any]:
    """Mean Dice per round of deterministic sessions (box + 4 px slack, 3 clicks) on ``pairs``."""
    import torch

    rng = np.random.default_rng(12345)
    curves = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), 8):
            idx = list(range(i, min(i + 8, len(pairs))))
            emb, gt, scale, _ = _batch(cache, pairs, idx)
            _, d = simulate_batch(
                model, emb, gt, scale, cfg, rng, train=False, start="box", rounds=3, slack=4.0
            )
            curves.append(d)
    curve = np.concatenate(curves, axis=1).mean(axis=1)
    return {"curve": [round(float(c), 4) for c in curve], "auc": round(float(curve.mean()), 4)}


def _lr(step: int, cfg: InteractiveConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.iterations - cfg.warmup, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def sample_weights(cache, pairs: list[tuple[int, int]], balance: float) -> np.ndarray:
    """(len(pairs),) sampling probabilities: each sample weighted ``n_dataset ** -balance``
    (``n_dataset``: the samples of its dataset among ``pairs``)."""
    from collections import Counter

    ds = [cache.index[r]["dataset"] for r, _ in pairs]
    n = Counter(ds)
    w = np.array([float(n[d]) ** -float(balance) for d in ds])
    return w / w.sum()


CHECKPOINT = "checkpoint.pt"


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def train_interactive(
    cfg: InteractiveConfig, out: str | os.PathLike, *, model=None, cache=None, log=print
) -> dict[str, Any]:
    """Train the click-aware adapter as ``cfg`` says; export the best step to ``out/<name>``.

    A chunk stops at ``cfg.iterations`` steps in all or after ``cfg.max_minutes`` of this call;
    ``out/checkpoint.pt`` then lets the next call with the same ``out`` go on (``cfg.resume``).

    Args:
        cfg: the config.
        out: run folder (``metrics.json``, ``checkpoint.pt`` and the adapter folder are written
            there).
        model: a base :class:`samed.model.SamModel` (default: ``build_model("litemedsam")``).
        cache: an opened :class:`~samed.train.interactive_data.SliceCache` (default: built or
            reused at ``cfg.cache_dir`` from :func:`~samed.train.interactive_data.training_cases`,
            joined with ``cfg.extra_cache_dirs``).

    Returns:
        The metrics dict (also ``out/metrics.json``), with ``adapter`` the exported folder.
    """
    import torch

    from ..lora import LoraConfig, apply_lora, save_adapter, trainable_parameters
    from ..model import build_model
    from .interactive_data import (
        build_slice_cache,
        concat_slice_caches,
        open_slice_cache,
        training_cases,
    )

    torch.set_num_threads(int(cfg.threads))
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else build_model(device="cpu")
    if cache is None:
        cases = training_cases(cfg.data_root, acdc_patients=cfg.acdc_patients)
        cache = build_slice_cache(model, cases, cfg.cache_dir, max_slices=cfg.max_slices, log=log)
        if cfg.extra_cache_dirs:
            extra = [open_slice_cache(d) for d in cfg.extra_cache_dirs]
            cache = concat_slice_caches([cache, *extra])
    train_pairs, val_pairs = cache.samples("train"), cache.samples("val")
    if not train_pairs:
        raise ValueError(f"{cache.folder}: no training samples (structures on 'train' slices)")
    probs = sample_weights(cache, train_pairs, cfg.balance)
    vrng = np.random.default_rng(7)
    val_pairs = val_pairs or train_pairs
    val_pairs = [val_pairs[i] for i in sorted(vrng.permutation(len(val_pairs))[: cfg.val_samples])]
    lora = LoraConfig(
        target_modules="",
        train_decoder=False,
        train_prompt_encoder=cfg.train_prompt_encoder,
        decoder_r=cfg.decoder_r,
        decoder_alpha=cfg.decoder_alpha,
        decoder_target_modules=cfg.decoder_target_modules,
        decoder_full_parameters=cfg.decoder_full_parameters,
    )
    apply_lora(model, lora)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path = out / CHECKPOINT
    step, losses, seconds_before = 0, [], 0.0
    if cfg.resume and ckpt_path.is_file():
        ck = _load_checkpoint(ckpt_path)
        if set(ck["trainable"]) != set(named):
            raise ValueError(
                f"{ckpt_path}: its trainable parameters differ from this config's; use a new out"
            )
        with torch.no_grad():
            for k, v in ck["trainable"].items():
                named[k].copy_(v)
        opt.load_state_dict(ck["optimizer"])
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        torch.set_rng_state(ck["torch_rng"])
        step, best_step = int(ck["step"]), int(ck["best_step"])
        best, base_val = json.loads(ck["best"]), json.loads(ck["base_val"])
        history, losses = json.loads(ck["history"]), list(ck["losses"])
        best_state = dict(ck["best_state"])
        seconds_before = float(ck["seconds"])
        log(f"resumed {ckpt_path} at step {step} (best step {best_step}, auc {best['auc']})")
    else:
        best = validate_interactive(model, cache, val_pairs, cfg)
        base_val = dict(best)
        best_step = 0
        best_state = {k: v.detach().clone() for k, v in named.items()}
        log(f"step 0 (base) val curve {best['curve']} auc {best['auc']}")
        history = [{"step": 0, **best}]
    t0, first = time.time(), step
    cap = step + cfg.chunk_steps if cfg.chunk_steps else cfg.iterations

    def checkpoint() -> None:
        _save_checkpoint(
            ckpt_path,
            {
                "step": step,
                "best_step": best_step,
                "trainable": {k: p.detach().clone() for k, p in named.items()},
                "best_state": best_state,
                "optimizer": opt.state_dict(),
                "numpy_rng": json.dumps(rng.bit_generator.state),
                "torch_rng": torch.get_rng_state(),
                "best": json.dumps(best),
                "base_val": json.dumps(base_val),
                "history": json.dumps(history),
                "losses": [float(x) for x in losses[-cfg.val_interval :]],
                "seconds": seconds_before + time.time() - t0,
            },
        )

    def export(steps_run: int) -> dict[str, Any]:
        """Write the model's current weights as the adapter (done at every new best step, so a
        run killed later still leaves its best adapter) and metrics.json."""
        metrics = {
            "best_step": best_step,
            "steps_run": steps_run,
            "seconds": round(seconds_before + time.time() - t0, 1),
            "validation_base": base_val,
            "validation_best": best,
            "history": history,
            "trainable_parameters": trainable_parameters(model),
            "train_samples": len(train_pairs),
            "val_samples": len(val_pairs),
            "config": asdict(cfg),
            "machine": f"{platform.processor() or platform.machine()}, torch threads {cfg.threads}",
        }
        meta = _metadata(cfg, cache, metrics)
        folder = save_adapter(model, out / cfg.name, metadata=meta, overwrite=True)
        _store_float16(folder)
        metrics["adapter"] = str(folder)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
        return metrics

    while step < min(cfg.iterations, cap) and (time.time() - t0) / 60 < cfg.max_minutes:
        model.train()
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        idx = rng.choice(len(train_pairs), size=cfg.batch_size, p=probs).tolist()
        emb, gt, scale, datasets = _batch(cache, train_pairs, idx)
        loss, _ = simulate_batch(model, emb, gt, scale, cfg, rng, datasets=datasets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % cfg.val_interval == 0 or step == cfg.iterations:
            v = validate_interactive(model, cache, val_pairs, cfg)
            history.append(
                {"step": step, "loss": round(float(np.mean(losses[-cfg.val_interval :])), 4), **v}
            )
            log(
                f"step {step} loss {history[-1]['loss']} val curve {v['curve']} auc {v['auc']} "
                f"({seconds_before + time.time() - t0:.0f} s)"
            )
            if v["auc"] > best["auc"]:
                best, best_step = v, step
                best_state = {k: p.detach().clone() for k, p in named.items()}
                export(step)
            checkpoint()
    checkpoint()
    log(f"chunk: steps {first}..{step} of {cfg.iterations} in {time.time() - t0:.0f} s")
    with torch.no_grad():
        for k, v in best_state.items():
            named[k].copy_(v)
    return export(step)


def _store_float16(folder: Path) -> None:
    """Rewrite the adapter's safetensors as float16 (the loader casts back to the model's dtype)."""
    from safetensors.torch import load_file, save_file

    from .. import __version__

    path = folder / "adapter_model.safetensors"
    state = {
        k: v.half().contiguous() if v.is_floating_point() else v
        for k, v in load_file(str(path)).items()
    }
    save_file(state, str(path), metadata={"format": "pt", "samed": __version__})


def _metadata(cfg: InteractiveConfig, cache, metrics: dict[str, Any]) -> dict[str, Any]:
    from collections import Counter

    per = Counter((e["dataset"], e["role"]) for e in cache.index)
    cases = sorted({(e["dataset"], e["case"], e["role"]) for e in cache.index})
    return {
        "name": cfg.name,
        "description": cfg.description,
        "intended_use": cfg.intended_use,
        "mode": "prompted",
        # a new adapter becomes the widget's and the API's interactive default only once the 3D
        # loop (bench/bench_interactive.py) shows it beats the base model: set it true then
        "interactive_default": False,
        "encoder": "unchanged (base LiteMedSAM embeddings; the embedding cache stays valid)",
        "training": {k: v for k, v in metrics.items() if k != "history"}
        | {"history": metrics["history"]},
        "training_data": {
            "slices": {f"{d}/{r}": n for (d, r), n in sorted(per.items())},
            # "held back": the slices that choose the best step (never the benchmark's cases)
            "cases": [f"{d}/{c} ({'held back' if r == 'val' else r})" for d, c, r in cases],
            "never_trained_on": "bench/bench_interactive.py's held-out cases (ACDC val, CHAOS 01-03, "
            "hippocampus 001/003/004/006, DeepLesion, BraTS2021_01646, pyradiomics), BTCV val "
            "(0034/0037/0039/0040)",
        },
        "weights_dtype": "float16 (trained in float32)",
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m samed.train.interactive --config configs/interactive/click-adapter.yaml --out runs/X``."""
    from .interactive_cli import build, run

    return run(build().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
