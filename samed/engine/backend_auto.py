"""``backend="auto"`` / ``precision="auto"``: measure the encoder candidates once per machine and
model, keep the fastest that meets the accuracy bar, remember the choice.

The measurement (a first use costs one OpenVINO conversion, shared by its fp32 and bf16
candidates, and a few encoder passes per candidate; afterwards nothing but loading the chosen one):

* candidates (:func:`auto_candidates`): those of the request that this CPU runs natively, in the
  order of their expected speed from the CPU's flags (:func:`expected_order`); with native bf16
  also ``torch-mixed`` (bf16 autocast with the convolutions in fp32: the bf16 rounding of the
  convolutions is what moved automatic adapters' class maps most; docs/BENCHMARKS.md session
  8). ``openvino-int8`` is measured only when int8 is asked for (``precision="int8"``): its
  NNCF quantisation costs minutes on a 2-core CPU, and where it was measured it missed the
  accuracy bar (box Dice 0.9899, embeddings 21 % off torch fp32; docs/BENCHMARKS.md, issue #15);

* calibration slices (:func:`calibration_inputs`): real CT and MRI training slices (BTCV, ACDC,
  CHAOS T2 train splits; never a held-out case) from ``$SAMED_CALIBRATION_DATA`` or the
  ``shared/data`` folder beside the checkout, prepared exactly as a Session prepares them
  (``intensity="auto"``, :func:`samed.engine.preprocess.prepare_slices`); without them, the
  MNI152 T1 template that nilearn ships (MRI only; int8 is then not offered);
* accuracy against torch fp32 on :data:`ACCURACY_SLICES` of them (decoder in torch fp32 either
  way), by what the model is used for (:func:`accuracy_check`): for a model without an
  automatic adapter, the box-prompt masks with the ground-truth box (+5 px) of up to 3
  structures per slice; for an **automatic adapter**, its automatic output: the raw argmax
  class maps of :meth:`samed.engine.Session.automatic` itself, on :data:`ACCURACY_SLICES`
  labelled slices of real training volumes of the adapter's modality, which the Session
  prepares with the adapter's own intensity, spacing / canvas and orientation
  (:mod:`samed.engine.backend_calibration`; the generic slices above only when no such volume
  is found), scored per class (:func:`class_dices`: Dice of each class pooled over the
  slices, classes with fewer than :data:`MIN_CLASS_PIXELS` pixels in both left out), so a
  backend that changes automatic results is never picked. Either way the Dice values must reach mean >=
  :data:`MIN_MEAN_DICE` and each >= :data:`MIN_DICE` (each class of an automatic adapter >=
  :data:`MIN_CLASS_DICE_AUTOMATIC`); the relative L2 error of the embeddings
  is recorded beside it;
* speed: median of :data:`TIMED_PASSES` batch-1 encoder passes after one warm-up, taken
  round-robin over the candidates (a load change hits all alike; at least 3 rounds, fewer than
  :data:`TIMED_PASSES` once they took :data:`MAX_TIMING_S`); a candidate
  must be at least :data:`MIN_GAIN` times faster than torch fp32 measured in the same process,
  else torch fp32 stays (never a slower path).

Choices are stored in ``<cache>/choices.json`` keyed by the CPU (model name + flags), the torch
and OpenVINO versions, the thread count and a digest of the encoder's weights (so a merged adapter
is its own entry); a model with an automatic adapter adds the check, the adapter's digest (a
decoder-only adapter leaves the encoder's digest as it was, but is checked on its own output)
and the automatic check's version (:func:`choice_key`).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .backend_calibration import (
    AUTOMATIC_CHECK_VERSION,
    CALIBRATION_DATASETS,
    automatic_cases,
    automatic_outputs,
    training_cases,
)
from .backends import (
    CANDIDATES,
    EncoderBackend,
    build_candidate,
    cpu_features,
    encoder_digest,
    notice,
    openvino_available,
    unsupported_reason,
)

if TYPE_CHECKING:
    from ..model import SamModel

__all__ = [
    "ACCURACY_SLICES",
    "MIN_CLASS_PIXELS",
    "MIN_CLASS_DICE_AUTOMATIC",
    "MIN_DICE",
    "MIN_GAIN",
    "MIN_MEAN_DICE",
    "calibration_data_root",
    "calibration_inputs",
    "accuracy_check",
    "auto_candidates",
    "calibration_set",
    "class_dices",
    "choice_key",
    "choose",
    "expected_order",
    "measure",
    "pick",
]

ACCURACY_SLICES = 6
MIN_MEAN_DICE = 0.99
MIN_DICE = 0.95
#: an automatic adapter's every class must agree this well with torch fp32 on the calibration
#: slices (``MIN_DICE`` let openvino-bf16 through for abdomen-ct at 0.962, and on BTCV val it then
#: moved a class by 0.045 and a case by 0.18: docs/BENCHMARKS.md, session 9)
MIN_CLASS_DICE_AUTOMATIC = 0.99
MIN_GAIN = 1.05
#: classes smaller than this (pixels, reference + candidate, over the accuracy slices) are left
#: out of the automatic check (a few flickering pixels of a class absent from the slices)
MIN_CLASS_PIXELS = 50
TIMED_PASSES = 5
#: the timed rounds stop early (after at least 3) once they have taken this long (s)
MAX_TIMING_S = 10.0
CALIBRATION_SLICES = 32
#: part of the choices.json key: a change of the accuracy bar or its slices measures again
#: (2: BTCV / CHAOS training cases by the project's fixed splits, not ACDC alone)
_BAR_VERSION = 2
_DATASETS = CALIBRATION_DATASETS


def calibration_data_root() -> Path | None:
    """``$SAMED_CALIBRATION_DATA``, else ``$SAMED_SHARED_DATA``, else ``shared/data`` beside the
    checkout, if it is a folder
    holding at least one of the calibration datasets; None otherwise."""
    env = os.environ.get("SAMED_CALIBRATION_DATA") or os.environ.get("SAMED_SHARED_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    if root.is_dir() and any((root / d / "dataset.json").is_file() for d, _ in _DATASETS):
        return root
    return None


def calibration_set(n: int = CALIBRATION_SLICES) -> tuple[list, str]:
    """``([(slice (Y, X) float32 after the Session's intensity mapping, [boxes XYXY px]), ...],
    source)``: ``n`` slices with labelled structures, spread over the first two training cases
    of each calibration dataset found in :func:`calibration_data_root` (CT and MRI taken in
    turn; the dataset.json ``train`` split, else every case outside the project's fixed
    validation / benchmark cases: BTCV 0034/0037/0039/0040, CHAOS T2 01-03), or the MNI152 template's slices when no real data is found (``source`` says which).
    Kept in memory per (n, folder)."""
    root = calibration_data_root()
    return _calibration_set(int(n), str(root) if root is not None else "")


@lru_cache(maxsize=4)
def _calibration_set(n: int, root: str) -> tuple[list, str]:
    from .preprocess import mask_bbox, resolve_intensity

    base = Path(root) if root else None
    per: list[list[tuple[np.ndarray, list]]] = []
    if base is not None:
        from ..io import load_label_map, load_volume

        for name, modality in _DATASETS:
            if not (base / name / "dataset.json").is_file():
                continue
            cases = training_cases(base, name)
            items: list[tuple[np.ndarray, list]] = []
            for case in cases[:2]:
                vol = load_volume(case.image)
                arr = np.asarray(vol.array, dtype=np.float32)
                lab = np.asarray(load_label_map(case.label, reference=vol).array).astype(int)
                _, fn = resolve_intensity("auto", arr, modality)
                img = fn(arr)
                zs = [z for z in range(lab.shape[0]) if lab[z].any()]
                for z in [zs[i] for i in np.linspace(0, len(zs) - 1, 8).round().astype(int)]:
                    classes = [c for c in np.unique(lab[z]) if c > 0]
                    sizes = sorted(classes, key=lambda c: -int((lab[z] == c).sum()))[:3]
                    boxes = [mask_bbox(lab[z] == c, 5) for c in sizes]
                    items.append(
                        (np.asarray(img[z], np.float32), [b for b in boxes if b is not None])
                    )
            per.append(items)
        source = f"real CT/MRI training slices from {base}"
    if not per or not any(per):
        from nilearn import datasets

        t1 = np.asarray(datasets.load_mni152_template(resolution=2).get_fdata(), np.float32)
        brain = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata()) > 0
        vol, mask = t1.transpose(2, 1, 0), brain.transpose(2, 1, 0)
        _, fn = resolve_intensity("auto", vol, "MR")
        img = fn(vol)
        zs = [z for z in range(vol.shape[0]) if mask[z].sum() > 200]
        items = []
        for z in [zs[i] for i in np.linspace(0, len(zs) - 1, n).round().astype(int)]:
            items.append((np.asarray(img[z], np.float32), [mask_bbox(mask[z], 5)]))
        per, source = [items], "the MNI152 T1 template (nilearn); no real calibration data"
    out: list = []
    i = 0
    while len(out) < n and any(i < len(p) for p in per):
        out += [p[i] for p in per if i < len(p)]
        i += 1
    return out[:n], source


def _encoder_input(model: SamModel, slices: list[np.ndarray]) -> torch.Tensor:
    """(N, 3, S, S): what ``model.image_encoder`` receives for these slices (prepare_slices,
    then the model's normalisation), one slice at a time (slices differ in shape)."""
    from .preprocess import prepare_slices

    x = torch.cat([prepare_slices(s[None], model.image_size) for s in slices])
    if model.spec.normalisation == "sam_imagenet":
        x = (x * 255.0 - model.pixel_mean.cpu()) / model.pixel_std.cpu()
    return x


def calibration_inputs(model: SamModel, n: int = CALIBRATION_SLICES) -> np.ndarray:
    """(n, 3, S, S) float32 encoder inputs of :func:`calibration_set` (for NNCF int8)."""
    items, source = calibration_set(n)
    if source.startswith("the MNI152"):
        raise ValueError(
            "int8 needs real CT/MRI calibration slices: set SAMED_CALIBRATION_DATA to a folder "
            "with btcv/, acdc/ or chaos_t2/ datasets"
        )
    return _encoder_input(model, [s for s, _ in items]).numpy()


def _box_masks(model: SamModel, emb: torch.Tensor, slices: list, boxes: list) -> list[np.ndarray]:
    from .preprocess import box_to_model, slice_geometry

    out = []
    for i, (sl, bs) in enumerate(zip(slices, boxes, strict=True)):
        geo = slice_geometry(sl.shape, model.image_size)
        for b in bs:
            bt = torch.as_tensor(box_to_model(b, geo))[None]
            logits, _ = model.decode(emb[i : i + 1], boxes=bt)
            out.append((logits[0, 0] > 0).numpy())
    return out


def accuracy_check(model: SamModel) -> str:
    """``"automatic"`` when ``model`` carries an automatic adapter (its argmax class maps are
    compared), else ``"box"`` (box-prompt masks)."""
    adapter = getattr(model, "adapter", None)
    return "automatic" if adapter is not None and adapter.mode == "automatic" else "box"


def _automatic_labels(model: SamModel, emb: torch.Tensor, slices: list) -> list[np.ndarray]:
    """(Y, X) argmax class maps of the automatic head on each slice's embedding, upscaled to
    the slice grid as :meth:`samed.engine.Session.automatic` does on the native grid."""
    from .preprocess import slice_geometry

    out = []
    for i, sl in enumerate(slices):
        geo = slice_geometry(sl.shape, model.image_size)
        logits, _ = model.decode(emb[i : i + 1], multimask_output=True)
        full = geo.upscale(logits)
        out.append(full.argmax(1)[0].cpu().numpy())
    return out


def class_dices(
    ref: list[np.ndarray], got: list[np.ndarray], min_pixels: int = MIN_CLASS_PIXELS
) -> dict[int, float]:
    """Per-class Dice of two lists of (Y, X) integer class maps (the same slices), each class's
    pixels pooled over the slices; background (0) and classes with fewer than ``min_pixels``
    pixels in ``ref`` and ``got`` together are left out.

    Returns:
        ``{class: Dice}`` (empty when no class is large enough).
    """
    if len(ref) != len(got):
        raise ValueError(f"ref and got must list the same slices; got {len(ref)} and {len(got)}")
    classes = sorted({int(c) for a in (*ref, *got) for c in np.unique(a)} - {0})
    out: dict[int, float] = {}
    for c in classes:
        inter = total = 0
        for a, b in zip(ref, got, strict=True):
            ma, mb = np.asarray(a) == c, np.asarray(b) == c
            inter += int((ma & mb).sum())
            total += int(ma.sum()) + int(mb.sum())
        if total >= min_pixels:
            out[c] = 2.0 * inter / total
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


@torch.inference_mode()
def measure(
    model: SamModel,
    candidates: list[str],
    *,
    cache: Path | None = None,
    built: dict[str, EncoderBackend] | None = None,
) -> dict[str, dict[str, Any]]:
    """Speed and accuracy of each candidate against torch fp32 on this machine.

    The timed passes go round-robin over the candidates (one pass each per round, after a
    warm-up pass each), so that a change of load on a shared machine hits all of them alike.

    ``built`` maps candidate names to backends already built for ``model`` (reused as they are);
    the backends built here are added to it.

    Returns:
        ``{name: {"s_per_slice": s, "speedup": x vs torch fp32, "check": "box" or "automatic"
        (:func:`accuracy_check`), "mean_dice", "min_dice" (over the box masks, or over the
        classes of :func:`class_dices`, then also ``"class_dice": {class: Dice}``),
        "embedding_rel_err", "build_s", "ok": passes the bar}}``; a candidate that failed to
        build has ``{"error": message, "ok": False}``. With the automatic check, torch fp32's
        entry also says how the slices were prepared (``"inputs"``: ``"session"``, by
        :func:`~samed.engine.backend_calibration.automatic_outputs`, or ``"generic"``) and
        which (``"slices"``: ``"case_id:z"``).
    """
    check = accuracy_check(model)
    cases = (
        automatic_cases(model, ACCURACY_SLICES, calibration_data_root())
        if check == "automatic"
        else []
    )
    if cases:  # the adapter's own input: Session.automatic on real volumes of its modality
        ref_out, x, ref = automatic_outputs(model, cases)
        prepared = "session"
    else:
        items, _ = calibration_set(CALIBRATION_SLICES)
        step = max(1, len(items) // ACCURACY_SLICES)
        picked = items[::step][:ACCURACY_SLICES]
        slices, boxes = [s for s, _ in picked], [b for _, b in picked]
        x = _encoder_input(model, slices)
        ref = torch.cat([model.image_encoder(x[i : i + 1]) for i in range(len(x))]).float()
        prepared = "generic"

    def outputs(emb: torch.Tensor) -> list[np.ndarray]:
        if check == "automatic":
            return _automatic_labels(model, emb, slices)
        return _box_masks(model, emb, slices, boxes)

    def candidate_outputs(be: EncoderBackend) -> tuple[list[np.ndarray], torch.Tensor]:
        if cases:
            out, _, emb = automatic_outputs(model, cases, be)
            return out, emb
        run = be.run if be.run is not None else model.image_encoder
        emb = torch.cat([run(x[i : i + 1]) for i in range(len(x))]).float()
        return outputs(emb), emb

    if not cases:
        ref_out = outputs(ref)
    runs: dict[str, Any] = {"torch-fp32": model.image_encoder}
    res: dict[str, dict[str, Any]] = {
        "torch-fp32": {
            "check": check,
            "mean_dice": 1.0,
            "min_dice": 1.0,
            "embedding_rel_err": 0.0,
            "build_s": 0.0,
        }
    }
    if check == "automatic":
        res["torch-fp32"]["inputs"] = prepared
        res["torch-fp32"]["slices"] = [f"{c.case_id}:{z}" for c in cases for z in c.slices]

    def calib() -> np.ndarray:
        return calibration_inputs(model)

    for name in candidates:
        if name == "torch-fp32":
            continue
        t = time.perf_counter()
        try:
            be = (built or {}).get(name) or build_candidate(
                model, name, calibration=calib, cache=cache
            )
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot build is not chosen
            res[name] = {"error": f"{type(exc).__name__}: {exc}", "ok": False}
            continue
        build_s = time.perf_counter() - t
        if built is not None:
            built[name] = be
        run = be.run if be.run is not None else model.image_encoder
        out, emb = candidate_outputs(be)
        extra: dict[str, Any] = {}
        if check == "automatic":
            per_class = class_dices(ref_out, out)
            dices = list(per_class.values())
            extra["class_dice"] = {str(c): round(d, 5) for c, d in per_class.items()}
        else:
            dices = [_dice(a, b) for a, b in zip(ref_out, out, strict=True)]
        res[name] = {
            "check": check,
            "mean_dice": float(np.mean(dices)) if dices else 1.0,
            "min_dice": float(np.min(dices)) if dices else 1.0,
            **extra,
            "embedding_rel_err": float((emb - ref).norm() / ref.norm().clamp_min(1e-12)),
            "build_s": build_s,
        }
        runs[name] = run
    times: dict[str, list[float]] = {n: [] for n in runs}
    x1 = x[:1]
    for run in runs.values():  # warm-up
        run(x1)
    t_start = time.perf_counter()
    for k in range(TIMED_PASSES):
        for n, run in runs.items():
            t = time.perf_counter()
            run(x1)
            times[n].append(time.perf_counter() - t)
        if k >= 2 and time.perf_counter() - t_start > MAX_TIMING_S:
            break
    base_s = statistics.median(times["torch-fp32"])
    for n in runs:
        r = res[n]
        r["s_per_slice"] = statistics.median(times[n])
        r["speedup"] = base_s / r["s_per_slice"]
        r["ok"] = n == "torch-fp32" or bool(
            r["mean_dice"] >= MIN_MEAN_DICE
            and r["min_dice"] >= (MIN_CLASS_DICE_AUTOMATIC if check == "automatic" else MIN_DICE)
            and r["s_per_slice"] * MIN_GAIN <= base_s
        )
    return res


def expected_order(candidates: list[str]) -> list[str]:
    """``candidates`` sorted by their expected speed on this CPU, fastest first, from the flags of
    :func:`samed.engine.backends.cpu_features` and the figures in docs/BENCHMARKS.md: with native
    bf16 OpenVINO bf16, torch bf16, OpenVINO int8, torch mixed (bf16 with fp32 convolutions),
    OpenVINO fp32; without it OpenVINO int8 (VNNI), OpenVINO fp32; torch fp32 last. Only the
    order of the measurement and of its notice; the choice is measured."""
    from .backends import native_bf16

    rank = (
        ["openvino-bf16", "torch-bf16", "openvino-int8", "torch-mixed", "openvino-fp32"]
        if native_bf16()
        else ["openvino-int8", "openvino-fp32", "openvino-bf16", "torch-bf16", "torch-mixed"]
    )
    rank.append("torch-fp32")
    return sorted(candidates, key=lambda c: rank.index(c) if c in rank else len(rank))


def auto_candidates(backend: str, precision: str) -> tuple[list[str], list[str]]:
    """``(runnable, wanted)`` for a request with ``auto``: ``wanted`` the candidates of
    :data:`~samed.engine.backends.CANDIDATES` that match ``backend`` / ``precision`` (int8 only
    when ``precision="int8"``), ``runnable`` those this machine runs
    (:func:`~samed.engine.backends.unsupported_reason` empty) in :func:`expected_order`, always
    with ``"torch-fp32"`` (the reference, last)."""
    wanted = [
        c
        for c in CANDIDATES
        if backend in ("auto", c.split("-")[0])
        and (precision == c.split("-")[1] or (precision == "auto" and c != "openvino-int8"))
    ]
    runnable = [c for c in wanted if not unsupported_reason(*c.split("-"))]
    if "torch-fp32" not in runnable:
        runnable.append("torch-fp32")
    return expected_order(runnable), wanted


def pick(results: dict[str, dict[str, Any]]) -> str:
    """The fastest candidate of :func:`measure`'s results that passed the bar (``ok``);
    ``"torch-fp32"`` when none did."""
    ok = [c for c, r in results.items() if r.get("ok") and "s_per_slice" in r]
    return min(ok, key=lambda c: results[c]["s_per_slice"]) if ok else "torch-fp32"


def _machine_key(model: SamModel) -> dict[str, Any]:
    ov = ""
    if openvino_available():
        from importlib.metadata import PackageNotFoundError, version

        try:
            ov = version("openvino")
        except PackageNotFoundError:
            ov = "?"
    return {
        "cpu": cpu_features(),
        "torch": torch.__version__,
        "openvino": ov,
        "threads": torch.get_num_threads(),
        "model": model.kind,
        "image_size": model.image_size,
        "encoder": encoder_digest(model.image_encoder),
    }


def choice_key(model: SamModel, runnable: list[str]) -> str:
    """The ``choices.json`` key of a measurement of ``runnable`` for ``model`` on this machine:
    :func:`_machine_key`, the candidates and the bar's version; a model with an automatic
    adapter adds the check, the adapter's digest and the automatic check's version
    (:data:`~samed.engine.backend_calibration.AUTOMATIC_CHECK_VERSION`), so that a choice made
    by an earlier check is measured again rather than reused."""
    key_obj: dict[str, Any] = {**_machine_key(model), "candidates": runnable, "bar": _BAR_VERSION}
    if accuracy_check(model) == "automatic":  # its own output is checked: its own entry
        key_obj["check"] = f"automatic {model.adapter_digest}"
        key_obj["automatic_check"] = AUTOMATIC_CHECK_VERSION
    return json.dumps(key_obj, sort_keys=True)


def _read_choices(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_choice(path: Path, key: str, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_choices(path)
    data[key] = entry
    tmp = path.with_name(f".tmp-samed-{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def choose(
    model: SamModel, backend: str, precision: str, *, cache: Path | None = None
) -> EncoderBackend:
    """Resolve a request with ``auto`` in ``backend`` and/or ``precision`` (see the module
    docstring); returns the built :class:`EncoderBackend` (``chosen_by="auto"``, or
    ``"fallback"`` with a notice when nothing but torch fp32 can run for the request)."""
    runnable, wanted = auto_candidates(backend, precision)
    if runnable == ["torch-fp32"]:
        why = "; ".join(
            f"{c}: {unsupported_reason(*c.split('-'))}" for c in wanted if c != "torch-fp32"
        )
        if "torch-fp32" not in wanted:  # e.g. backend=openvino without OpenVINO
            notice(f"{why}; running the encoder in torch fp32")
            return EncoderBackend(
                chosen_by="fallback", note=why, adapter_digest=model.adapter_digest
            )
        return EncoderBackend(
            chosen_by="auto",
            note="only torch fp32 runs fast here" + (f" ({why})" if why else ""),
            adapter_digest=model.adapter_digest,
        )
    key = choice_key(model, runnable)
    path = cache / "choices.json" if cache is not None else None
    entry = _read_choices(path).get(key) if path is not None else None
    built: dict[str, EncoderBackend] = {}
    if not isinstance(entry, dict) or entry.get("choice") not in runnable:
        slow = " and an int8 quantisation (minutes)" if "openvino-int8" in runnable else ""
        where = f"cached in {cache}" if cache is not None else "not cached: no cache folder"
        notice(
            f"measuring encoder candidates {', '.join(runnable)} on this CPU (first use per "
            f"machine and model: one to three minutes on 2 cores{slow}; {where})"
        )
        t0 = time.perf_counter()
        results = measure(model, runnable, cache=cache, built=built)
        choice = pick(results)
        entry = {
            "choice": choice,
            "results": results,
            "when": time.strftime("%Y-%m-%d %H:%M"),
            "measure_s": round(time.perf_counter() - t0, 1),
        }
        if path is not None:
            _write_choice(path, key, entry)
    choice = str(entry["choice"])
    r = entry.get("results", {}).get(choice, {})
    note = (
        f"auto: {choice}, {r.get('speedup', 1.0):.2f}x torch fp32, {r.get('check', 'box')} "
        f"Dice vs fp32 {r.get('mean_dice', 1.0):.4f}"
    )
    if choice == "torch-fp32":
        be = EncoderBackend(adapter_digest=model.adapter_digest)
    elif choice in built:  # just measured: reuse it (no second compilation)
        be = built[choice]
    else:
        try:
            be = build_candidate(
                model, choice, calibration=lambda: calibration_inputs(model), cache=cache
            )
        except Exception as exc:  # noqa: BLE001 - e.g. a cache that became unreadable
            notice(f"auto's choice {choice} failed to build ({exc}); running torch fp32")
            return EncoderBackend(
                chosen_by="fallback", note=str(exc), adapter_digest=model.adapter_digest
            )
    be.chosen_by, be.note = "auto", note
    return be
