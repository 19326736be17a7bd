"""One case of a batch: load (or retrieve), segment, write its files into a folder.

Shared by the local run (:mod:`samed.batch.run`) and the Ray workers
(:mod:`samed.batch.distributed`), so that both give the same outputs, voxel for voxel.
"""

from __future__ import annotations

import shutil
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .cases import CaseInput
from .prompts import ObjectPrompt, resolve_prompt
from .summary import CaseResult

__all__ = [
    "MARKER",
    "LABELS_FILE",
    "SEG_FILE",
    "QC_FILE",
    "UNCERTAINTY_FILE",
    "Job",
    "case_settings",
    "run_case",
]

MARKER = "case.json"
LABELS_FILE = "labels.nii.gz"
SEG_FILE = "seg.dcm"
UNCERTAINTY_FILE = "uncertainty.nii.gz"
QC_FILE = "qc.png"


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
    out = apply_postprocessing(out, postprocess, session.model, session.orientation, session.image)
    return _automatic_names(session, out)


def _automatic_names(session: Any, out: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """The label map in its output dtype and the adapter's label names."""
    adapter = session.model.adapter
    names = {int(k): str(v) for k, v in (adapter.labels if adapter else {}).items()}
    num_classes = adapter.num_classes if adapter else 0
    for c in range(1, max(num_classes, int(out.max()) + 1)):
        names.setdefault(c, f"label_{c}")
    names.pop(0, None)
    return out.astype(_label_dtype(max(names, default=0)), copy=False), names


@dataclass
class Job:
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
    series_filter: Any = None
    uncertainty: str | None = None
    dicomweb: Any = None

    def without_model(self) -> Job:
        """This job with ``model=None`` (what a Ray worker receives; it holds its own model)."""
        return replace(self, model=None)


def case_settings(job: Job, case: CaseInput) -> dict[str, Any]:
    s = dict(job.settings)
    if job.mode == "prompted":
        s["prompts"] = [p.fingerprint() for p in job.prompts.get(case.case_id, [])]
    return s


def run_case(job: Job, case: CaseInput, folder: Path, emit: Callable[..., None]) -> CaseResult:
    """Segment one case into ``folder`` (created); returns its row (``status`` ok or error).

    A DICOMweb case (``case.remote``) is first retrieved by WADO-RS into a temporary folder
    (removed afterwards) and then runs as a local DICOM folder. Raises what loading or
    segmenting raises (the caller turns it into an error row), :class:`samed.batch.dicomweb.
    DicomwebError` and :class:`samed.batch.dicomweb.SeriesExcluded`.
    """
    if case.remote is None or case.error:
        return _run_local(job, case, folder, emit)
    from ..paths import TMP_PREFIX
    from .dicomweb import retrieve_case

    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}dicomweb-"))
    try:
        emit("retrieve")
        local = retrieve_case(job.dicomweb, case, tmp, job.series_filter)
        row = _run_local(job, local, folder, emit)
        row.source = case.remote.describe()
        return row
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_local(job: Job, case: CaseInput, folder: Path, emit: Callable[..., None]) -> CaseResult:
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
    result.preprocessing = dict(session.preprocessing)

    def report(done: int, total: int) -> None:
        emit("segment", done, total)

    if job.mode == "prompted":
        labels, names = _segment_prompted(
            session, volume, job.prompts[case.case_id], job.min_slice_iou, report
        )
    elif job.uncertainty:
        from ..uncertainty import automatic_uncertainty

        unc = automatic_uncertainty(
            session, job.uncertainty, postprocess=job.postprocess, progress=report
        )
        labels, names = _automatic_names(session, unc.labels)
        result.uncertainty = round(unc.score, 6)
    else:
        labels, names = _segment_automatic(session, report, job.postprocess)
    emit("write")
    folder.mkdir(parents=True, exist_ok=True)
    outputs = []
    if "nifti" in job.formats:
        save_nifti(labels, volume, folder / LABELS_FILE)
        outputs.append(LABELS_FILE)
    if job.uncertainty and job.mode == "automatic":
        save_nifti(unc.uncertainty, volume, folder / UNCERTAINTY_FILE)  # the source grid
        outputs.append(UNCERTAINTY_FILE)
    if "dicom-seg" in job.formats and case.is_dicom:
        present = {v: n for v, n in names.items() if np.any(labels == v)}
        if present:
            # segment colours: samed.colors.label_color, the same as in qc.png
            save_dicom_seg(labels, volume, folder / SEG_FILE, label_names=present)
            outputs.append(SEG_FILE)
    if job.qc:
        window = None
        name = session.intensity_name
        if name.startswith("ct:"):
            from ..registry import CT_WINDOWS

            preset = CT_WINDOWS[name[3:]]
            window = (preset.low, preset.high)
        elif name.startswith("window:"):  # e.g. an adapter's recorded window:-125:275
            window = tuple(float(v) for v in name.split(":")[1:3])
        save_qc_png(folder / QC_FILE, volume.array, labels, affine=volume.affine, window=window)
        outputs.append(QC_FILE)
    result.labels = names
    result.volumes_ml = _volumes_ml(labels, names, volume.spacing)
    result.outputs = outputs
    result.status = "ok"
    return result


def error_row(job: Job, case: CaseInput, exc: BaseException) -> CaseResult:
    """The summary row of a case whose run raised ``exc`` (a DICOMweb failure keeps its kind)."""
    from .dicomweb import DicomwebError

    row = CaseResult(
        case=case.case_id,
        source=case.remote.describe() if case.remote is not None else str(case.path),
        status="error",
        mode=job.mode,
        error=str(exc) if isinstance(exc, DicomwebError) else f"{type(exc).__name__}: {exc}",
        error_kind=exc.kind if isinstance(exc, DicomwebError) else "case",
    )
    if not isinstance(exc, (ValueError, DicomwebError)):
        row.error += "\n" + "".join(traceback.format_exception(exc)[-3:]).strip()
    return row


def attempt_case(
    job: Job, case: CaseInput, folder: Path, emit: Callable[..., None]
) -> tuple[CaseResult | Any, bool]:
    """:func:`run_case`, with every failure of the case turned into its row.

    Returns:
        ``(row, raised)``: the row (``raised`` True when it comes from an exception), or
        ``(SkippedSeries, False)`` when the retrieved series is one the rules skip.
    """
    from .dicomweb import SeriesExcluded

    try:
        row = run_case(job, case, folder, emit)
        if row.status == "error" and not row.error_kind:
            row.error_kind = (case.remote.error_kind if case.remote is not None else "") or "case"
        return row, False
    except (KeyboardInterrupt, SystemExit):
        raise
    except SeriesExcluded as exc:
        return exc.skipped, False
    except Exception as exc:  # noqa: BLE001 - one bad case never stops the batch
        return error_row(job, case, exc), True
