"""``samed demo``: the whole pipeline on data that installed packages ship (no download).

The MNI152 T1 template (ICBM 2009a, skull-stripped, 2 mm; shipped inside ``nilearn``) is segmented
headlessly with the bundled LiteMedSAM weights through the same calls a script or the napari
widget uses (:class:`samed.annotation.Annotator`): one box in world millimetres on the central
axial slice (as a user would draw it), propagation through the volume, then a few simulated
corrective clicks (:func:`samed.engine.interactive.simulated_click`: the centre of the largest 3D
error component, on its largest slice), each followed by re-propagation, with the Dice against
the brain mask that nilearn ships with the template printed after every interaction. The label
map is written as NIfTI on the template's grid with a QC montage."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["add_parser", "run_demo", "sample_mni152"]

# The brain's extent on the axial plane z = +10 mm of MNI space (RAS mm), with a small margin.
BRAIN_BOX_MM = (-72.0, -108.0, 72.0, 74.0)
BRAIN_SLICE_MM = 10.0
# A brain window, as a user sets one in a viewer: the template's T1 values 0-0.4 (of 0-1) -> 0-1,
# so grey and white matter are both bright against the dark background and the box's object is
# the whole brain. With percentiles 0.5/99.5 (white matter bright, cortex grey) LiteMedSAM
# returns the white matter plus one hemisphere's cortex: Dice 0.88 on the key slice, 0.82 in 3D.
DEMO_WINDOW = "window:0:0.4"


def sample_mni152(folder: str | Path) -> tuple[Path, Path]:
    """Write the MNI152 T1 template and its brain mask (2 mm) from nilearn as NIfTI files.

    Returns:
        (template path, brain-mask path) inside ``folder``.

    Raises:
        ValueError: nilearn is not installed.
    """
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a core dependency
        raise ValueError("the demo needs nilearn (pip install nilearn)") from exc
    import nibabel as nib

    from .io import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t1, mask = folder / "mni152_t1_2mm.nii.gz", folder / "mni152_brain_mask_2mm.nii.gz"
    for path, img in (
        (t1, datasets.load_mni152_template(resolution=2)),
        (mask, datasets.load_mni152_brain_mask(resolution=2)),
    ):
        if not path.exists():
            with atomic_write(path) as tmp:
                nib.save(img, str(tmp) + ".nii.gz")
                Path(str(tmp) + ".nii.gz").replace(tmp)
    return t1, mask


def run_demo(args: Any) -> int:
    """Segment the MNI152 brain from one box, then correct it with simulated clicks; returns the
    exit code (0 when it ran)."""
    from .annotation import Annotator
    from .batch.qc import save_qc_png
    from .engine import Session
    from .engine.interactive import simulated_click
    from .evaluate.metrics import dice as dice_score
    from .io import load_label_map, load_volume, save_nifti
    from .model import load_model
    from .precision import amp_from_precision

    out = Path(args.out)
    t0 = time.perf_counter()
    t1_path, mask_path = sample_mni152(out / "input")
    vol = load_volume(t1_path)
    gt = load_label_map(mask_path, reference=vol).array > 0
    from .registry import cpu_request

    backend, precision = cpu_request(
        getattr(args, "backend", "torch"), getattr(args, "precision", "auto")
    )
    model = load_model(device=args.device, backend=backend, precision=precision)
    inv = np.linalg.inv(vol.affine)
    x0, y0, x1, y1 = BRAIN_BOX_MM
    a = inv @ [x0, y0, BRAIN_SLICE_MM, 1.0]
    b = inv @ [x1, y1, BRAIN_SLICE_MM, 1.0]
    z = int(round(a[2]))
    box = [min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])]
    print(
        f"model {model.kind} on {model.device}; volume {vol.shape} (z, y, x), "
        f"{vol.orientation}, spacing {tuple(round(s, 2) for s in vol.spacing)} mm"
    )
    print(
        f"box on slice z={z}: x {box[0]:.0f}-{box[2]:.0f}, y {box[1]:.0f}-{box[3]:.0f} px "
        f"(world {BRAIN_BOX_MM} mm at z={BRAIN_SLICE_MM} mm); window {args.window}"
    )
    session = Session(model, vol, intensity=args.window, amp=amp_from_precision(args.precision))
    print("embedding the slices ...", flush=True)
    session.embed()
    seg = np.zeros(vol.shape, dtype=np.uint8)
    ann = Annotator(session, seg)
    options = {"box_margin": args.box_margin, "min_area": 10, "max_step_px": 2}  # the widget's
    curve: list[dict[str, Any]] = []

    def record(what: str, t: float) -> None:
        d = dice_score(ann.object_mask(), gt)
        curve.append(
            {"interaction": what, "dice": round(d, 4), "seconds": round(time.perf_counter() - t, 2)}
        )
        print(f"{what:<44} Dice {d:.4f}  ({curve[-1]['seconds']:.2f} s)", flush=True)

    t = time.perf_counter()
    ann.add_box(z, box)
    ann.propagate(z, **options)
    record(f"box on slice {z} + propagate", t)
    for i in range(int(args.clicks)):
        click = simulated_click(ann.object_mask(), gt)
        if click is None:
            break
        cz, xy, positive = click
        t = time.perf_counter()
        ann.add_point(cz, xy, positive)
        ann.propagate(cz, **options)
        record(
            f"click {i + 1}: {'+' if positive else '-'} ({xy[0]:.0f}, {xy[1]:.0f}) on slice {cz}"
            " + propagate",
            t,
        )
    ann.accept(1)
    seg_path = save_nifti(seg, vol, out / "brain_seg.nii.gz")
    qc_path = save_qc_png(out / "brain_qc.png", vol.array, seg)
    dice = dice_score(seg, gt)
    ml = float((seg > 0).sum()) * float(np.prod(vol.spacing)) / 1000.0
    summary = {
        "input": str(t1_path),
        "output": str(seg_path),
        "qc": str(qc_path),
        "window": args.window,
        "interactions": curve,
        "brain_volume_ml": round(ml, 1),
        "reference_volume_ml": round(float(gt.sum()) * float(np.prod(vol.spacing)) / 1000.0, 1),
        "dice_after_box": curve[0]["dice"],
        "dice_vs_nilearn_brain_mask": round(dice, 4),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for k, v in summary.items():
        if k != "interactions":
            print(f"{k}: {v}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register ``samed demo``."""
    p = subparsers.add_parser(
        "demo",
        help="segment the MNI152 brain (shipped in nilearn) with the bundled model",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--out", default="samed-demo", help="output folder (default ./samed-demo)")
    from .cli_options import add_encoder_options

    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_encoder_options(p)
    p.add_argument(
        "--box-margin",
        type=float,
        default=2.0,
        help="px added around the previous slice's mask to prompt the next (default 2, "
        "the napari widget's)",
    )
    p.add_argument(
        "--window",
        default=DEMO_WINDOW,
        help=f"intensity mapping (samed.intensity grammar; default {DEMO_WINDOW})",
    )
    p.add_argument(
        "--clicks",
        type=int,
        default=3,
        help="simulated corrective clicks after the box (default 3)",
    )
    p.set_defaults(func=run_demo)
