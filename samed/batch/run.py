"""The batch job: one case after another, each one loaded, segmented, written, recorded."""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .cases import CaseInput, check_output_location, discover_cases
from .outputs import (
    TMP_PREFIX,
    check_outputs,
    check_writable,
    clean_temporaries,
    commit_case_folder,
    fingerprint_differences,
    input_fingerprint,
    new_case_folder,
)
from .prompts import ObjectPrompt, prompts_by_case, read_prompts, resolve_prompt
from .summary import (
    BatchSummary,
    CaseResult,
    ProgressCallback,
    ProgressEvent,
    write_json,
    write_summary,
)

__all__ = ["FORMATS", "segment_batch"]

#: Output formats accepted by ``--format``.
FORMATS = ("nifti", "dicom-seg")
_MARKER = "case.json"
_LABELS_FILE = "labels.nii.gz"
_SEG_FILE = "seg.dcm"
_QC_FILE = "qc.png"


# ---------------------------------------------------------------------------------- encoding
class _OomFallbackModel:
    """Wraps a :class:`samed.model.SamModel` so that ``encode`` survives CUDA out-of-memory.

    A batch that raises ``torch.cuda.OutOfMemoryError`` is split in halves (recursively, down to
    one slice); the largest batch that worked is remembered and later batches are cut to it.
    Everything else is delegated to the wrapped model.
    """

    def __init__(self, model: Any, on_oom: Callable[[int], None] | None = None) -> None:
        self._model = model
        self.max_batch: int | None = None
        self.oom_events = 0
        self._on_oom = on_oom

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def encode(self, images: Any) -> Any:
        """(B, 3, S, S) -> (B, C, h, w), in chunks of at most :attr:`max_batch` slices."""
        import torch

        n = int(images.shape[0])
        size = n if self.max_batch is None else min(n, self.max_batch)
        if size >= n:
            try:
                return self._model.encode(images)
            except torch.cuda.OutOfMemoryError:
                if n == 1:
                    raise
                self.oom_events += 1
                self.max_batch = max(1, n // 2)
                if self._on_oom is not None:
                    self._on_oom(self.max_batch)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                return self.encode(images)
        return torch.cat([self.encode(images[i : i + size]) for i in range(0, n, size)])


# ---------------------------------------------------------------------------------- one case
def _label_dtype(max_label: int) -> np.dtype:
    return np.dtype(np.uint8) if max_label <= 255 else np.dtype(np.int16)


def _volumes_ml(
    labels: np.ndarray, names: dict[int, str], spacing: Sequence[float]
) -> dict[str, float]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    fg = [n for v, n in names.items() if v > 0]
    dup = sorted({n for n in fg if fg.count(n) > 1})
    if dup:  # the summary keys volumes by name: one would be lost
        raise ValueError(f"label names {dup} are given to more than one label value")
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    return {names[v]: round(float(counts[v]) * voxel_ml, 3) for v in sorted(names) if v > 0}


def _propagate(
    session: Any,
    z: int,
    mask: np.ndarray,
    min_slice_iou: float,
    report: Callable[[int], None],
) -> np.ndarray:
    """Propagate one object from slice z in both directions; (Z, Y, X) bool, with the engine's
    stop rules (:meth:`samed.engine.Session.propagate_volume`) and ``min_slice_iou`` for the
    overlap between consecutive slices. ``report(slices visited)`` after every slice."""
    return session.propagate_volume(
        z, mask, progress=lambda done, total: report(done), min_slice_iou=min_slice_iou
    )


def _segment_prompted(
    session: Any,
    volume: Any,
    prompts: list[ObjectPrompt],
    min_slice_iou: float,
    report: Callable[[int, int], None],
) -> tuple[np.ndarray, dict[int, str]]:
    resolved = [resolve_prompt(p, volume.shape, volume.affine) for p in prompts]
    names = {p.label: p.name for p in prompts}
    labels = np.zeros(volume.shape, dtype=_label_dtype(max(names)))
    nz = volume.shape[0]
    total = nz * len(prompts)
    for k, (pr, rp) in enumerate(zip(prompts, resolved, strict=True)):
        mask = session.predict(rp.z, box=rp.box, points=rp.points, point_labels=rp.point_labels)
        if not mask.any():
            raise ValueError(
                f"{pr.where}: the prompt on slice {rp.z} gave an empty mask for label {pr.label} "
                f"({pr.name}); check the box/points"
            )
        obj = _propagate(
            session, rp.z, mask, min_slice_iou, lambda d, k=k: report(k * nz + min(d, nz), total)
        )
        labels[obj & (labels == 0)] = pr.label
        report((k + 1) * nz, total)
    return labels, names


def _segment_automatic(
    session: Any, report: Callable[[int, int], None], postprocess: str = "adapter"
) -> tuple[np.ndarray, dict[int, str]]:
    import torch

    from ..postprocess import apply_postprocessing

    nz = session.shape[0]
    out = np.zeros(session.shape, dtype=np.int16)
    todo = list(range(nz))
    while todo:
        try:
            for z, lab, _, _ in session.automatic_iter(todo):
                out[z] = lab
                todo.remove(z)
                report(nz - len(todo), nz)
        except torch.cuda.OutOfMemoryError:
            # The decoder runs session.batch_size slices at once; the encoder halves itself.
            if session.batch_size == 1:
                raise
            session.batch_size = max(1, session.batch_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    out = apply_postprocessing(out, postprocess, session.model)
    adapter = session.model.adapter
    names = {int(k): str(v) for k, v in (adapter.labels if adapter else {}).items()}
    num_classes = adapter.num_classes if adapter else 0
    for c in range(1, max(num_classes, int(out.max()) + 1)):
        names.setdefault(c, f"label_{c}")
    names.pop(0, None)
    return out.astype(_label_dtype(max(names, default=0)), copy=False), names


def _remove_unfinished(folder: Path) -> None:
    """Remove a case folder that holds no finished result (no valid case.json) and nothing but
    files a batch writes (a failed case leaves only its error row); anything else is kept."""
    if folder.is_symlink() or not folder.is_dir():
        return
    ours = {_LABELS_FILE, _SEG_FILE, _QC_FILE, _MARKER}
    entries = list(folder.iterdir())
    if all(p.is_file() and (p.name in ours or p.name.startswith(TMP_PREFIX)) for p in entries):
        for p in entries:
            p.unlink(missing_ok=True)
        folder.rmdir()


def _read_marker(folder: Path) -> dict[str, Any] | None:
    path = folder / _MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged marker means "not finished"
    return data if isinstance(data, dict) and data.get("status") == "ok" else None


@dataclass
class _Job:
    model: Any
    mode: str
    prompts: dict[str, list[ObjectPrompt]]
    formats: tuple[str, ...]
    intensity: object
    batch_size: int
    overwrite: bool
    qc: bool
    cache_dir: Path | None
    min_slice_iou: float
    postprocess: str
    settings: dict[str, Any]
    amp: bool | str = True


def _encoder_setting(model: Any) -> dict[str, str]:
    """How the encoder ran, for case.json (beside ``settings``, whose ``precision`` is the label
    that decides a resume): backend, precision, name, how it was chosen and why."""
    be = getattr(model, "encoder_backend", None)
    if be is not None:
        return be.describe()
    dev = str(getattr(model, "device", "cpu"))
    return {"backend": "torch", "device": dev, "chosen_by": "default"}


def _case_settings(job: _Job, case: CaseInput) -> dict[str, Any]:
    s = dict(job.settings)
    if job.mode == "prompted":
        s["prompts"] = [p.fingerprint() for p in job.prompts.get(case.case_id, [])]
    return s


def _run_case(job: _Job, case: CaseInput, folder: Path, emit: Callable[..., None]) -> CaseResult:
    from ..engine import Session
    from ..io import load_volume, save_dicom_seg, save_nifti
    from .qc import save_qc_png

    source = str(case.path) + (f" (series {case.series_uid})" if case.series_uid else "")
    result = CaseResult(case=case.case_id, source=source, status="error", mode=job.mode)
    if case.error:
        result.error = case.error
        return result
    emit("load")
    volume = load_volume(case.path, series_uid=case.series_uid)
    if job.mode == "prompted" and case.case_id not in job.prompts:
        known = ", ".join(sorted(job.prompts)) or "none"
        result.error = (
            f"no prompts for case {case.case_id!r} in the prompts file (cases there: {known})"
        )
        return result
    result.slices = volume.shape[0]
    session = Session(
        job.model,
        volume,
        intensity=job.intensity,
        batch_size=job.batch_size,
        cache_dir=job.cache_dir,
        amp=job.amp,
    )

    def report(done: int, total: int) -> None:
        emit("segment", done, total)

    if job.mode == "prompted":
        labels, names = _segment_prompted(
            session, volume, job.prompts[case.case_id], job.min_slice_iou, report
        )
    else:
        labels, names = _segment_automatic(session, report, job.postprocess)
    emit("write")
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    if "nifti" in job.formats:
        save_nifti(labels, volume, folder / _LABELS_FILE)
        outputs.append(_LABELS_FILE)
    if "dicom-seg" in job.formats and case.is_dicom:
        present = {v: n for v, n in names.items() if np.any(labels == v)}
        if present:
            # segment colours: samed.colors.label_color, the same as in qc.png
            save_dicom_seg(labels, volume, folder / _SEG_FILE, label_names=present)
            outputs.append(_SEG_FILE)
    if job.qc:
        window = None
        name = session.intensity_name
        if name.startswith("ct:"):
            from ..registry import CT_WINDOWS

            preset = CT_WINDOWS[name[3:]]
            window = (preset.low, preset.high)
        save_qc_png(folder / _QC_FILE, volume.array, labels, affine=volume.affine, window=window)
        outputs.append(_QC_FILE)
    result.labels = names
    result.volumes_ml = _volumes_ml(labels, names, volume.spacing)
    result.outputs = outputs
    result.status = "ok"
    return result


# ---------------------------------------------------------------------------------- the API
def _parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in out if f not in FORMATS]
    if bad or not out:
        raise ValueError(f"format {formats!r}: {bad or 'empty'} not in the allowed {list(FORMATS)}")
    return out


def segment_batch(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    prompts: str | os.PathLike | None = None,
    formats: str | Sequence[str] = FORMATS,
    device: str = "auto",
    batch_size: int | None = None,
    overwrite: bool = False,
    window: object = "auto",
    model: Any = "litemedsam",
    checkpoint: str | os.PathLike | None = None,
    qc: bool = True,
    cache_dir: str | os.PathLike | None = None,
    min_slice_iou: float = 0.7,
    postprocess: str = "adapter",
    precision: str = "auto",
    progress: ProgressCallback | None = None,
    backend: str = "torch",
) -> BatchSummary:
    """Segment every case found in ``inputs`` into ``out_dir`` (the Python form of ``samed segment``).

    Args:
        inputs: image files (NIfTI, NRRD, MHA) and folders (searched recursively for image files
            and DICOM series); see :func:`discover_cases` for the case ids.
        out_dir: output folder (created); must not lie inside an input folder.
        adapter: adapter name or folder (:func:`samed.registry.resolve_adapter`). An automatic
            adapter selects automatic mode; a prompted adapter tunes prompted mode.
        prompts: prompts file (:mod:`samed.batch.prompts`); selects prompted mode.
        formats: ``"nifti"`` and/or ``"dicom-seg"`` (comma-separated or a sequence); DICOM SEG is
            written for DICOM inputs only.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (``"cuda:N"``).
        batch_size: slices per encoder batch (default 16 on CUDA, 2 on CPU); on CUDA an
            out-of-memory error halves it and retries.
        overwrite: redo cases that an earlier run finished (default: skip them).
        window: intensity mapping in :func:`samed.intensity.parse_intensity`'s grammar:
            ``"auto"`` (CT: abdomen window), a preset of :data:`samed.registry.CT_WINDOWS`,
            ``"LOW,HIGH"`` (HU), ``(low, high)``, ``"percentile"``...
        model: a model kind of :data:`samed.registry.MODEL_KINDS` or a built
            :class:`samed.model.SamModel` (then ``device`` and ``checkpoint`` are ignored).
        checkpoint: checkpoint file for kinds without bundled weights.
        qc: write ``qc.png`` per case.
        min_slice_iou: prompted mode: stop propagating an object in one direction at the first
            slice whose mask has IoU below this with the previous slice's (0 disables; 0.7
            default).
        postprocess: automatic mode: ``"adapter"`` (what the adapter's metadata recommends, e.g.
            the largest 3D connected component per class), ``"none"`` or
            ``"largest_component"`` (see :mod:`samed.postprocess`).
        cache_dir: folder for on-disk embedding caches (keyed by volume content, model, adapter,
            intensity and encoder precision), so that a rerun with other prompts costs only the
            decoder; None: none.
        precision: encoder precision on CUDA: ``"auto"`` (fp16 autocast), ``"fp32"``,
            ``"fp16"`` or ``"bf16"`` (see :mod:`samed.precision`). On the CPU, with ``backend``,
            the encoder backend's precision (:mod:`samed.engine.backends`): ``"auto"``
            (measured), ``"fp32"``, ``"bf16"``, ``"int8"``.
        backend: CPU encoder backend, ``"torch"`` (default; with ``precision="auto"`` that is
            torch fp32), ``"openvino"`` or ``"auto"`` (measured, :mod:`samed.engine.backends`);
            ignored for a built ``model``. The
            encoder actually used is recorded as ``precision`` and ``encoder`` in case.json.
        progress: called with a :class:`ProgressEvent` as the batch advances.

    Returns:
        The :class:`BatchSummary` (also written to ``out_dir/summary.json`` and ``summary.csv``).

    Raises:
        ValueError: bad options (no mode, both modes, unknown format/window, unreadable prompts
            file), an output folder that is not writable, or an output path that is, holds or
            lies inside an input (:func:`samed.batch.outputs.check_outputs`). Errors of single
            cases are not raised: they are rows of the summary.

    Resume: a case folder with a ``case.json`` is skipped only when its settings and its
    input's content (SHA-256, :func:`samed.batch.outputs.input_fingerprint`) are this run's;
    otherwise the case is an error row naming what differs (``overwrite`` redoes it). A case is
    written into ``OUT/.tmp-<case>-*`` and swapped in whole when it succeeded; a failed case
    leaves only its row (an earlier finished result stays as it was).
    """
    import torch

    from ..intensity import parse_intensity
    from ..model import load_model
    from ..registry import cpu_request, resolve_adapter

    t_start = time.perf_counter()
    fmt = _parse_formats(formats)
    intensity = parse_intensity(window, "window")
    out = Path(out_dir).expanduser()
    check_output_location(out, inputs)
    cases = discover_cases(inputs)
    check_outputs(out, inputs, cases)
    if not 0.0 <= float(min_slice_iou) < 1.0:
        raise ValueError(f"min_slice_iou={min_slice_iou} must be in [0, 1)")
    from ..postprocess import POSTPROCESS_CHOICES, describe_postprocessing

    if postprocess not in POSTPROCESS_CHOICES:
        raise ValueError(f"postprocess={postprocess!r} must be one of {POSTPROCESS_CHOICES}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    from ..engine.backends import encoder_label
    from ..precision import amp_from_precision

    amp = amp_from_precision(precision)
    prompt_list = read_prompts(prompts) if prompts is not None else None
    adapter_path = resolve_adapter(adapter) if adapter is not None else None
    if isinstance(model, str):
        backend_, precision_ = cpu_request(backend, precision)
        net = load_model(
            model,
            checkpoint,
            adapter=adapter_path,
            device=device,
            backend=backend_,
            precision=precision_,
        )
    else:  # a built model is used as it is: not moved, not optimised
        net = load_model(model, adapter=adapter_path, optimize=False)
    automatic = net.adapter is not None and net.adapter.mode == "automatic"
    if automatic and prompt_list is not None:
        raise ValueError(
            f"adapter {adapter!r} is automatic (no prompts); drop --prompts or use a prompted adapter"
        )
    if not automatic and prompt_list is None:
        raise ValueError(
            "nothing to do: give a prompts file (--prompts, prompted mode) or an automatic adapter "
            "(--adapter, automatic mode; see `samed adapters`)"
        )
    mode = "automatic" if automatic else "prompted"
    dev = net.device
    bs = int(batch_size) if batch_size is not None else (16 if dev.type == "cuda" else 2)
    settings = {
        "mode": mode,
        "model": net.kind,
        "checkpoint_sha256": net.checkpoint_sha256,
        "adapter": net.adapter_name,
        "adapter_sha256": net.adapter_digest,
        "intensity": intensity.setting(),
        "formats": list(fmt),
        "min_slice_iou": float(min_slice_iou) if mode == "prompted" else None,
        "postprocess": describe_postprocessing(postprocess, net) if mode == "automatic" else None,
        "precision": encoder_label(net, amp),
    }
    job = _Job(
        model=_OomFallbackModel(net),
        mode=mode,
        prompts=prompts_by_case(prompt_list or []),
        formats=fmt,
        intensity=intensity,
        batch_size=bs,
        overwrite=overwrite,
        qc=qc,
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        min_slice_iou=float(min_slice_iou),
        postprocess=postprocess,
        settings=settings,
        amp=amp,
    )
    check_writable(out)
    clean_temporaries(out)
    summary = BatchSummary(out_dir=out, results=[], mode=mode)
    ids = {c.case_id for c in cases}
    stray = sorted(set(job.prompts) - ids)
    if stray:
        summary.warnings.append(
            f"the prompts file names cases that are not among the inputs (their prompts were not "
            f"used): {', '.join(stray[:10])}{' ...' if len(stray) > 10 else ''}; cases here: "
            f"{', '.join(sorted(ids)[:10])}"
        )
    for i, case in enumerate(cases):

        def emit(
            stage: str,
            done: int = 0,
            total: int = 0,
            result: CaseResult | None = None,
            i: int = i,
            case: CaseInput = case,
        ) -> None:
            if progress is not None:
                progress(ProgressEvent(i, len(cases), case.case_id, stage, done, total, result))

        emit("start")
        folder = out / case.case_id
        wanted = _case_settings(job, case)
        marker = _read_marker(folder)
        t0 = time.perf_counter()
        fingerprint: dict[str, Any] = {}
        other_input = ""
        if not case.error:
            try:
                fingerprint = input_fingerprint(case)
            except OSError as exc:
                case = replace(case, error=f"cannot read {case.path}: {exc}")
        if marker is not None and not overwrite and not case.error:
            other_input = fingerprint_differences(marker.get("input"), fingerprint)
        if marker is not None and not overwrite and other_input:
            row = CaseResult(
                case=case.case_id,
                source=str(case.path),
                status="error",
                mode=mode,
                error=f"{folder} was finished by an earlier run on another input: {other_input}; "
                "its results are kept and not reported for this input; rerun with --overwrite "
                "to replace them, or give the inputs distinct case ids (file names)",
            )
        elif marker is not None and not overwrite:
            if marker.get("settings") == wanted:
                row = CaseResult(
                    case=case.case_id,
                    source=str(marker.get("source", case.path)),
                    status="skipped",
                    seconds=0.0,
                    mode=str(marker.get("mode", mode)),
                    slices=int(marker.get("slices", 0)),
                    volumes_ml=dict(marker.get("volumes_ml", {})),
                    labels={int(k): v for k, v in marker.get("labels", {}).items()},
                    outputs=list(marker.get("outputs", [])),
                )
            else:
                diff = sorted(
                    k
                    for k in set(wanted) | set(marker.get("settings", {}))
                    if wanted.get(k) != marker.get("settings", {}).get(k)
                )
                row = CaseResult(
                    case=case.case_id,
                    source=str(case.path),
                    status="error",
                    mode=mode,
                    error=f"{folder} was finished by an earlier run with other settings "
                    f"(differing: {', '.join(diff)}); rerun with --overwrite to replace it",
                )
        else:
            tmp = new_case_folder(out, case.case_id)
            try:
                row = _run_case(job, case, tmp, emit)
                row.seconds = round(time.perf_counter() - t0, 3)
                if row.status == "ok":
                    write_json(
                        tmp / _MARKER,
                        {
                            **row.to_json(),
                            "settings": wanted,
                            "input": fingerprint,
                            "encoder": _encoder_setting(job.model),
                        },
                    )
                    commit_case_folder(tmp, folder)
                elif marker is None:
                    _remove_unfinished(folder)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - one bad case never stops the batch
                row = CaseResult(
                    case=case.case_id,
                    source=str(case.path),
                    status="error",
                    mode=mode,
                    error=f"{type(exc).__name__}: {exc}",
                )
                if not isinstance(exc, ValueError):
                    row.error += "\n" + "".join(traceback.format_exception(exc)[-3:]).strip()
                if marker is None:
                    _remove_unfinished(folder)
                else:
                    row.error += f"\n(the earlier finished result in {folder} is kept unchanged)"
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone after a commit; else a failed try
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            row.seconds = round(time.perf_counter() - t0, 3)
        summary.results.append(row)
        summary.seconds = time.perf_counter() - t_start
        write_summary(out, summary)
        emit("end", result=row)
    return summary
