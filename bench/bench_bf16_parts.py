"""Where does bf16 lose an automatic adapter's class maps? (issue #15, session 8)

Runs parts of the LiteMedSAM image encoder in bf16 (torch CPU autocast, per module) and the rest
in fp32, and scores each variant as ``auto`` scores a candidate for an automatic adapter
(:mod:`samed.engine.backend_auto`): per-class Dice of the argmax class maps against torch fp32 on
the same 6 calibration slices (real CT/MRI training slices), bar mean >= 0.99 and each >= 0.95.
Timed in the same process, batch 1, round-robin over the variants, beside torch fp32, torch
bf16 (the whole encoder under autocast) and openvino-fp32.

    python bench/bench_bf16_parts.py [--adapters acdc-cardiac-mri,abdomen-ct] [--variants a,b]
    python bench/bench_bf16_parts.py --acdc-val neck_fp32,...   # + ACDC val per class (report)

Writes bench/results/bf16-parts-cpu.json. ACDC val is scored for the report only: the variants
and the bar are never chosen on it. Session 8 ran two rounds (bench/results/
bf16-parts-cpu-round1.json, -round2.json); ``convs_fp32`` became the ``torch-mixed`` candidate.
The OpenVINO variants mark nodes in the IR's XML; in OpenVINO 2026.4 marking a subset of the
convolutions gave broken outputs (NaN / inf), and marking every node still left ~1 % error.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))
BF16 = torch.bfloat16


def _f32(t: object) -> object:
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _region(mod: nn.Module, bf16: bool) -> None:
    """Make ``mod`` run with autocast on (bf16) or off (fp32, inputs cast to fp32); its outputs
    are cast to fp32 either way."""
    fwd = mod.forward

    def forward(*args: object, **kw: object) -> object:
        if not bf16:
            args = tuple(_f32(a) for a in args)
        with torch.autocast("cpu", dtype=BF16, enabled=bf16):
            return _f32(fwd(*args, **kw))

    mod.forward = forward  # type: ignore[method-assign]


def _autocast_aware(mod: nn.Module) -> None:
    fused = mod.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            return torch.nn.functional.gelu(mod.conv(x))
        return fused(x.float())

    mod.forward = forward  # type: ignore[method-assign]


def _select(enc: nn.Module, pred: Callable[[str, nn.Module], bool]) -> list[nn.Module]:
    return [m for n, m in enc.named_modules() if n and pred(n, m)]


def _kind(*names: str) -> Callable[[str, nn.Module], bool]:
    return lambda n, m: type(m).__name__ in names


#: name -> (everything else in bf16?, predicate of the modules that switch to the other dtype,
#: what it tests). ``True``: autocast over the whole encoder, the selected modules fp32 islands;
#: ``False``: fp32, the selected modules bf16 regions.
VARIANTS: dict[str, tuple[bool, Callable[[str, nn.Module], bool], str]] = {
    "all_bf16": (True, lambda n, m: False, "the whole encoder under autocast (= torch-bf16)"),
    "neck_fp32": (True, lambda n, m: n == "neck", "bf16, the neck (convs + LayerNorm2d) fp32"),
    "last_stage_neck_fp32": (
        True,
        lambda n, m: n in ("neck", "layers.3"),
        "bf16, the last stage and the neck fp32",
    ),
    "early_bf16": (
        False,
        lambda n, m: n in ("patch_embed", "layers.0", "layers.1"),
        "patch embedding + stages 0-1 bf16 (the large activations), stages 2-3 + neck fp32",
    ),
    "early_mid_bf16": (
        False,
        lambda n, m: n in ("patch_embed", "layers.0", "layers.1", "layers.2"),
        "patch embedding + stages 0-2 bf16, stage 3 + neck fp32",
    ),
    "late_bf16": (
        False,
        lambda n, m: n in ("layers.2", "layers.3", "neck"),
        "stages 2-3 + neck bf16, patch embedding + stages 0-1 fp32",
    ),
    "norms_fp32": (
        True,
        _kind("LayerNorm", "LayerNorm2d"),
        "bf16, every LayerNorm / LayerNorm2d an fp32 island",
    ),
    "attention_fp32": (True, _kind("Attention"), "bf16, the attention modules fp32"),
    "blocks_fp32_stream": (
        False,
        _kind("MBConv", "TinyViTBlock", "PatchMerging", "PatchEmbed"),
        "each block bf16 inside, the stream between blocks (and the neck) fp32",
    ),
    "matmul_bf16": (
        False,
        lambda n, m: isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "ConvGELU",
        "only Linear / Conv2d in bf16 (outputs back to fp32); norms, softmax, q@k, residuals fp32",
    ),
    "matmul_bf16_no_neck": (
        False,
        lambda n, m: (
            (isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "ConvGELU")
            and not n.startswith("neck")
        ),
        "Linear / Conv2d in bf16 except the neck's; everything else fp32",
    ),
    "linear_bf16": (
        False,
        lambda n, m: isinstance(m, nn.Linear),
        "only the Linear layers (qkv, proj, MLP) in bf16; convs and the rest fp32",
    ),
}


def _conv(m: nn.Module) -> nn.Conv2d | None:
    if type(m).__name__ == "ConvGELU":
        return m.conv
    return m if isinstance(m, nn.Conv2d) else None


def _convs(groups: str, under: tuple[str, ...] = ()) -> Callable[[str, nn.Module], bool]:
    """Convolutions (``groups``: "all", "dw" depthwise, "pw" the others), under these paths."""

    def pred(n: str, m: nn.Module) -> bool:
        c = _conv(m)
        if c is None or (under and not n.startswith(under)):
            return False
        return groups == "all" or (c.groups > 1) == (groups == "dw")

    return pred


VARIANTS.update(
    {
        "convs_fp32": (True, _convs("all"), "bf16, every convolution an fp32 island"),
        "dwconvs_fp32": (True, _convs("dw"), "bf16, the depthwise convolutions fp32"),
        "pwconvs_fp32": (True, _convs("pw"), "bf16, the dense (1x1 / patch) convolutions fp32"),
        "early_convs_fp32": (
            True,
            _convs("all", ("patch_embed", "layers.0")),
            "bf16, the convolutions of the patch embedding and stage 0 fp32",
        ),
        "linear_attn_bf16": (
            False,
            lambda n, m: isinstance(m, nn.Linear) or type(m).__name__ == "Attention",
            "Linear layers and the attention (q@k, softmax, @v) bf16; convs, norms, stream fp32",
        ),
    }
)


def build_variant(encoder: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, S, S) -> (B, C, h, w) float32 through a copy of ``encoder`` with variant ``name``."""
    glob, pred, _ = VARIANTS[name]
    enc = copy.deepcopy(encoder).eval()
    for m in enc.modules():  # the fused oneDNN conv+GELU is fp32 only: unfused under autocast
        if type(m).__name__ == "ConvGELU":
            _autocast_aware(m)
    mods = _select(enc, pred)
    # outermost selected modules only (an island inside an island changes nothing)
    ids = {id(m) for m in mods}
    inner = {id(c) for m in mods for c in m.modules() if c is not m and id(c) in ids}
    for m in mods:
        if id(m) not in inner:
            _region(m, bf16=not glob)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=BF16, enabled=glob):
            return enc(x).float()

    return run


#: OpenVINO variants: the fp32 IR compiled with ``INFERENCE_PRECISION_HINT=bf16``, the nodes
#: for which ``keep(type, friendly name)`` is true marked ``disable_fp16_compression`` (the
#: CPU plugin then runs them in f32). Friendly names carry the torch module path.
OV_VARIANTS: dict[str, tuple[Callable[[str, str], bool], str]] = {
    "ov_all_bf16": (lambda t, n: False, "= openvino-bf16"),
    "ov_all_kept": (lambda t, n: True, "every node marked: must equal openvino-fp32"),
    "ov_neck_fp32": (lambda t, n: "__module.neck." in n, "bf16, the neck f32"),
    "ov_last_stage_neck_fp32": (
        lambda t, n: "__module.neck." in n or "__module.layers.3" in n,
        "bf16, the last stage and the neck f32",
    ),
    "ov_early_bf16": (
        lambda t, n: (
            not any(f"__module.{p}" in n for p in ("patch_embed", "layers.0", "layers.1."))
        ),
        "patch embedding + stages 0-1 bf16, the rest f32",
    ),
    "ov_early_mid_bf16": (
        lambda t, n: "__module.layers.3" in n or "__module.neck." in n or not n.startswith("__"),
        "patch embedding + stages 0-2 bf16, stage 3 + neck (and unnamed nodes) f32",
    ),
    "ov_norms_fp32": (
        lambda t, n: (
            t == "MVN" or "layer_norm" in n or "__module.neck.1" in n or "__module.neck.3" in n
        ),
        "bf16, the layer norms (MVN + scale/shift) f32",
    ),
    "ov_attention_fp32": (
        lambda t, n: t == "ScaledDotProductAttention" or ".attn/" in n,
        "bf16, the attention core (q/k/v split, SDPA, incl. softmax) f32",
    ),
    "ov_matmul_bf16": (
        lambda t, n: t not in ("MatMul", "Convolution", "GroupConvolution"),
        "only MatMul / Convolution bf16, everything else (norms, SDPA, adds, GELU) f32",
    ),
    "ov_convs_fp32": (
        lambda t, n: t in ("Convolution", "GroupConvolution") or "aten::_convolution" in n,
        "bf16, every convolution (with its bias add) f32",
    ),
    "ov_conv_nodes_fp32": (
        lambda t, n: t in ("Convolution", "GroupConvolution"),
        "bf16, the Convolution / GroupConvolution nodes alone f32",
    ),
    "ov_dwconvs_fp32": (lambda t, n: t == "GroupConvolution", "bf16, depthwise convs f32"),
    "ov_pwconvs_fp32": (lambda t, n: t == "Convolution", "bf16, dense convs f32"),
    "ov_early_convs_fp32": (
        lambda t, n: (
            "aten::_convolution" in n and ("__module.patch_embed" in n or "__module.layers.0" in n)
        ),
        "bf16, the convolutions of the patch embedding and stage 0 f32",
    ),
}


def build_ov_variant(model: object, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The OpenVINO bf16 encoder with the nodes of ``OV_VARIANTS[name]`` kept in f32.

    The nodes are marked in the IR's XML (``<rt_info><attribute name="precise" version="0"/>``,
    read back as ``DisablePrecisionConversion``): in OpenVINO 2026.4 an ``rt_info`` entry set
    from Python (``disable_fp16_compression_0``) changed nothing."""
    import re
    import shutil
    import tempfile

    import openvino as ov

    from samed.engine.backends import _ov_model, _plain_copy, backend_cache_dir, encoder_digest

    keep, _ = OV_VARIANTS[name]
    cache = backend_cache_dir()
    _ov_model(model.image_encoder, model.image_size, "fp32", None, cache)  # ensure the IR
    digest = encoder_digest(_plain_copy(model.image_encoder))
    src = cache / "openvino" / f"{digest}-{model.image_size}-fp32" / "encoder.xml"
    pat = re.compile(r'(<layer id="\d+" name="([^"]*)" type="(\w+)" version="\w+">)')
    n_kept = 0

    def mark(mo: re.Match) -> str:
        nonlocal n_kept
        if mo.group(3) in ("Const", "Parameter", "Result") or not keep(mo.group(3), mo.group(2)):
            return mo.group(1)
        n_kept += 1
        return mo.group(1) + '<rt_info><attribute name="precise" version="0" /></rt_info>'

    tmp = Path(tempfile.mkdtemp(prefix="samed-bf16-parts-"))
    try:
        (tmp / "encoder.xml").write_text(pat.sub(mark, src.read_text()))
        shutil.copy(src.with_suffix(".bin"), tmp / "encoder.bin")
        ovm = ov.Core().read_model(str(tmp / "encoder.xml"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    compiled = ov.Core().compile_model(
        ovm,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": "bf16",
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        },
    )
    print(f"{name}: {n_kept} nodes kept f32", flush=True)
    from samed.engine.backends import openvino_runner

    return openvino_runner(compiled.create_infer_request())


@torch.inference_mode()
def calibration_check(
    model: object, runs: dict[str, Callable[[torch.Tensor], torch.Tensor]]
) -> dict[str, dict]:
    """auto's automatic check (same slices, same Dice) for every run in ``runs``."""
    from samed.engine.backend_auto import (
        ACCURACY_SLICES,
        CALIBRATION_SLICES,
        MIN_DICE,
        MIN_MEAN_DICE,
        _automatic_labels,
        _encoder_input,
        calibration_set,
        class_dices,
    )

    items, _ = calibration_set(CALIBRATION_SLICES)
    step = max(1, len(items) // ACCURACY_SLICES)
    slices = [s for s, _ in items[::step][:ACCURACY_SLICES]]
    x = _encoder_input(model, slices)
    ref = torch.cat([model.image_encoder(x[i : i + 1]) for i in range(len(x))]).float()
    ref_out = _automatic_labels(model, ref, slices)
    out = {}
    for name, run in runs.items():
        emb = torch.cat([run(x[i : i + 1]) for i in range(len(x))]).float()
        per = class_dices(ref_out, _automatic_labels(model, emb, slices))
        d = list(per.values()) or [1.0]
        out[name] = {
            "class_dice": {str(c): round(v, 5) for c, v in per.items()},
            "mean_dice": float(np.mean(d)),
            "min_dice": float(np.min(d)),
            "embedding_rel_err": float((emb - ref).norm() / ref.norm()),
            "passes": bool(np.mean(d) >= MIN_MEAN_DICE and np.min(d) >= MIN_DICE),
        }
    return out


@torch.inference_mode()
def timings(
    runs: dict[str, Callable[[torch.Tensor], torch.Tensor]], x1: torch.Tensor, reps: int
) -> dict[str, float]:
    """Median batch-1 seconds per run, after a warm-up each, round-robin over the runs."""
    t: dict[str, list[float]] = {k: [] for k in runs}
    for r in runs.values():
        r(x1)
    for _ in range(reps):
        for k, r in runs.items():
            t0 = time.perf_counter()
            r(x1)
            t[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in t.items()}


def acdc_val(model: object, runs: dict[str, Callable], names: list[str]) -> dict[str, dict]:
    """ACDC val (all 20 volumes) per class for torch fp32 and the named runs (report only)."""
    from samed.engine.backends import EncoderBackend
    from samed.evaluate import evaluate

    out = {}
    for name in ["torch-fp32", *names]:
        be = EncoderBackend("torch", "fp32" if name == "torch-fp32" else "bf16")
        be.run = None if name == "torch-fp32" else runs[name]
        model.encoder_backend = be.bind(model)
        t0 = time.perf_counter()
        rep = evaluate(model, DATA / "acdc", "val", prompt=None, postprocess="adapter")
        out[name] = {
            "per_class": rep.per_class(),
            "mean_dice": rep.mean_dice(),
            "rows": rep.rows,
            "wall_s": time.perf_counter() - t0,
        }
        print(f"acdc val {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    model.encoder_backend = None
    return out


def _describe(name: str) -> str:
    if name in VARIANTS:
        return VARIANTS[name][2]
    if name in OV_VARIANTS:
        return OV_VARIANTS[name][1]
    return "the production candidate (samed.engine.backends)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", default="acdc-cardiac-mri,abdomen-ct")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-openvino", action="store_true")
    ap.add_argument("--acdc-val", default="", help="variants to score on ACDC val (report only)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bf16-parts-cpu.json"))
    args = ap.parse_args()
    from samed.engine.backends import backend_cache_dir, build_candidate, cpu_features
    from samed.model import load_model

    names = [v for v in args.variants.split(",") if v]
    res: dict = {
        "machine": {
            "cpu": cpu_features(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_before": os.getloadavg(),
        },
        "variants": {n: _describe(n) for n in names},
        "adapters": {},
    }
    for i, adapter in enumerate(a for a in args.adapters.split(",") if a):
        model = load_model(device="cpu", adapter=adapter, merge=True)
        runs: dict[str, Callable] = {"torch-fp32": model.image_encoder}
        if "torch-bf16" in names:
            from samed.engine.backends import _torch_bf16

            runs["torch-bf16"] = _torch_bf16(model.image_encoder)
        runs.update({n: build_variant(model.image_encoder, n) for n in names if n in VARIANTS})
        runs.update({n: build_ov_variant(model, n) for n in names if n in OV_VARIANTS})
        acc = calibration_check(model, {n: runs[n] for n in names})
        entry: dict = {"accuracy": acc}
        for n in names:
            a = acc[n]
            print(
                f"{adapter} {n}: mean {a['mean_dice']:.4f} min {a['min_dice']:.4f} "
                f"emb {a['embedding_rel_err']:.4f} {'PASS' if a['passes'] else 'fail'} "
                f"{a['class_dice']}",
                flush=True,
            )
        if i == 0:  # timing once (the encoder is the same network whatever the adapter)
            truns = dict(runs)
            if not args.no_openvino:
                truns["openvino-fp32"] = build_candidate(
                    model, "openvino-fp32", cache=backend_cache_dir()
                ).run
            from samed.engine.backend_auto import _encoder_input, calibration_set

            x1 = _encoder_input(model, [calibration_set()[0][0][0]])
            s = timings(truns, x1, args.reps)
            res["timing_s_per_slice_b1"] = s
            res["speedup_vs_torch_fp32"] = {k: s["torch-fp32"] / v for k, v in s.items()}
            for k, v in s.items():
                print(f"time {k}: {v:.3f} s ({s['torch-fp32'] / v:.2f}x)", flush=True)
        if args.acdc_val and adapter == "acdc-cardiac-mri":
            entry["acdc_val"] = acdc_val(model, runs, [v for v in args.acdc_val.split(",") if v])
        res["adapters"][adapter] = entry
    res["machine"]["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
