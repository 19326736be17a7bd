"""The batch job: plan every case (finished earlier? other settings?), run the rest one after
another here or on a Ray cluster (:mod:`samed.batch.distributed`), upload, commit, record."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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
from .prompts import prompts_by_case, read_prompts
from .segment import (  # noqa: F401 - _OomFallbackModel and _propagate: re-exported for tests
    LABELS_FILE,
    MARKER,
    QC_FILE,
    SEG_FILE,
    UNCERTAINTY_FILE,
    Job,
    _OomFallbackModel,
    _propagate,
    attempt_case,
    case_settings,
)
from .series import SeriesFilter, SkippedSeries, parse_series_filter
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
_MARKER, _LABELS_FILE, _SEG_FILE, _QC_FILE = MARKER, LABELS_FILE, SEG_FILE, QC_FILE


def _remove_unfinished(folder: Path) -> None:
    """Remove a case folder that holds no finished result (no valid case.json) and nothing but
    files a batch writes (a failed case leaves only its error row); anything else is kept."""
    if folder.is_symlink() or not folder.is_dir():
        return
    ours = {_LABELS_FILE, _SEG_FILE, _QC_FILE, _MARKER, UNCERTAINTY_FILE}
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


def _encoder_setting(model: Any) -> dict[str, str]:
    """How the encoder ran, for case.json (beside ``settings``, whose ``precision`` is the label
    that decides a resume): backend, precision, name, how it was chosen and why."""
    be = getattr(model, "encoder_backend", None)
    if be is not None:
        return be.describe()
    dev = str(getattr(model, "device", "cpu"))
    return {"backend": "torch", "device": dev, "chosen_by": "default"}


def _require(module: str, option: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{option} needs the {module} package: pip install 'samed[{extra}]'")


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
    series_filter: SeriesFilter | Sequence[str] | None = None,
    dicomweb: Any = None,
    upload: bool = False,
    ray: str | None = None,
    ray_workers: int | None = None,
    uncertainty: str | None = None,
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
        progress: called with a :class:`ProgressEvent` as the batch advances.
        series_filter: which DICOM series are cases (:mod:`samed.batch.series`; ``KEY=VALUE``
            rules or a :class:`SeriesFilter`); non-image objects and localizers are always
            skipped, and every skipped series is in ``summary.skipped_series`` with the reason.
        dicomweb: a :class:`samed.batch.dicomweb.DicomwebSource`: its series are cases too
            (retrieved by WADO-RS just before each is segmented).
        upload: store each case's DICOM SEG on ``dicomweb``'s server by STOW-RS before the case
            is committed (a failed upload makes the case an error and leaves no result).
        ray: run the cases on a Ray cluster (:mod:`samed.batch.distributed`): ``"local"``
            (start one here), ``"auto"`` or ``"ray://host:port"``; None: in this process.
        ray_workers: Ray actors (one model each); default: one per GPU, else one per CPU.
        uncertainty: automatic mode: a :data:`samed.uncertainty.METHODS` name to also write
            ``uncertainty.nii.gz`` per case (source grid) and the case score in the summary's
            ``uncertainty`` column; None (default) skips it.
        backend: CPU encoder backend, ``"torch"`` (default here; ``samed segment`` passes
            :func:`samed.registry.default_backend`), ``"openvino"`` or ``"auto"``; ignored for a
            built ``model``. The encoder actually used is recorded as ``precision`` and
            ``encoder`` in case.json.

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
    from ..intensity import parse_intensity
    from ..model import load_model
    from ..registry import resolve_adapter

    t_start = time.perf_counter()
    fmt = _parse_formats(formats)
    intensity = parse_intensity(window, "window")
    rules = (
        series_filter
        if isinstance(series_filter, SeriesFilter)
        else parse_series_filter(series_filter)
    )
    if upload and dicomweb is None:
        raise ValueError("upload=True (--upload) needs a DICOMweb source (--dicomweb)")
    if upload and "dicom-seg" not in fmt:
        raise ValueError(
            f"upload=True (--upload) stores DICOM SEGs: formats {list(fmt)} lack dicom-seg"
        )
    out = Path(out_dir).expanduser()
    check_output_location(out, inputs)
    skipped: list[SkippedSeries] = []
    cases = discover_cases(inputs, rules, skipped)
    if ray is not None:
        _require("ray", "--ray", "ray")
    if dicomweb is not None:
        _require("dicomweb_client", "--dicomweb", "pacs")
        from .dicomweb import list_remote_cases

        local_ids = {c.case_id.lower(): c for c in cases}
        for c in list_remote_cases(dicomweb, rules, skipped):
            if c.case_id.lower() in local_ids:
                raise ValueError(
                    f"the DICOMweb series {c.series_uid} and the input {local_ids[c.case_id.lower()].path} "
                    f"both give case id {c.case_id!r}; give the series once"
                )
            cases.append(c)
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
    # the library default (torch, precision auto) is today's torch fp32 on the CPU
    cpu_precision = "fp32" if (backend, precision) == ("torch", "auto") else precision
    if isinstance(model, str):
        net = load_model(
            model,
            checkpoint,
            adapter=adapter_path,
            device=device,
            backend=backend,
            precision=cpu_precision,
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
    if uncertainty is not None:
        from ..uncertainty import METHODS

        if uncertainty not in METHODS:
            raise ValueError(f"uncertainty={uncertainty!r} must be one of {METHODS}")
        if mode != "automatic":
            raise ValueError("--uncertainty needs an automatic adapter (automatic mode)")
        settings["uncertainty"] = uncertainty
    job = Job(
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
        series_filter=rules,
        dicomweb=dicomweb,
        uncertainty=uncertainty,
    )
    check_writable(out)
    clean_temporaries(out)
    summary = BatchSummary(out_dir=out, results=[], mode=mode, skipped_series=skipped)
    ids = {c.case_id for c in cases}
    stray = sorted(set(job.prompts) - ids)
    if stray:
        summary.warnings.append(
            f"the prompts file names cases that are not among the inputs (their prompts were not "
            f"used): {', '.join(stray[:10])}{' ...' if len(stray) > 10 else ''}; cases here: "
            f"{', '.join(sorted(ids)[:10])}"
        )
    batch = Batch(out, job, cases, summary, progress, upload, t_start)
    if ray is not None:
        from .distributed import run_on_ray

        spec = model if isinstance(model, str) else None
        run_on_ray(
            batch,
            ray,
            ray_workers,
            net if spec is None else None,
            (spec, checkpoint, adapter_path, device, backend, cpu_precision),
        )
    else:
        for i in range(len(cases)):
            batch.run_here(i, dev.type == "cuda")
    return summary


@dataclass
class Batch:
    """A batch in progress: the plan of every case, the commit of finished ones, the summary.

    :meth:`plan` decides, per case, whether it is finished already (skipped), an error row
    without running (an earlier result from other settings or another input), or to run;
    :meth:`finish` takes a run's row and its temporary folder (uploads, writes ``case.json``,
    swaps the folder in); :meth:`record` puts a row into the summary (input order) and rewrites
    the summary files. The local loop (:meth:`run_here`) and the Ray driver use the same three.
    """

    out: Path
    job: Job
    cases: list[CaseInput]
    summary: BatchSummary
    progress: ProgressCallback | None
    upload: bool
    t_start: float
    rows: dict[int, CaseResult] = field(default_factory=dict)
    pending: dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]] = field(
        default_factory=dict
    )

    def emit(
        self, i: int, stage: str, done: int = 0, total: int = 0, result: CaseResult | None = None
    ) -> None:
        if self.progress is not None:
            n = len(self.cases)
            self.progress(ProgressEvent(i, n, self.cases[i].case_id, stage, done, total, result))

    def plan(self, i: int) -> CaseResult | None:
        """The row of case ``i`` when it needs no run (skipped, or refused), else None."""
        case, job, mode = self.cases[i], self.job, self.job.mode
        folder = self.out / case.case_id
        wanted = case_settings(job, case)
        marker = _read_marker(folder)
        fingerprint: dict[str, Any] = {}
        other_input = ""
        if not case.error:
            try:
                if case.remote is not None:
                    from .dicomweb import remote_fingerprint

                    fingerprint = remote_fingerprint(case)
                else:
                    fingerprint = input_fingerprint(case)
            except OSError as exc:
                case = self.cases[i] = replace(case, error=f"cannot read {case.path}: {exc}")
        if marker is not None and not job.overwrite and not case.error:
            other_input = fingerprint_differences(marker.get("input"), fingerprint)
        if marker is not None and not job.overwrite and other_input:
            return CaseResult(
                case=case.case_id,
                source=str(case.path),
                status="error",
                mode=mode,
                error=f"{folder} was finished by an earlier run on another input: {other_input}; "
                "its results are kept and not reported for this input; rerun with --overwrite "
                "to replace them, or give the inputs distinct case ids (file names)",
                error_kind="case",
            )
        if marker is not None and not job.overwrite:
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
                    uploaded=str(marker.get("uploaded", "")),
                    uncertainty=marker.get("uncertainty"),
                )
                if self.upload and not row.uploaded and _SEG_FILE in row.outputs:
                    row = self._upload_finished(row, folder, marker)
                return row
            diff = sorted(
                k
                for k in set(wanted) | set(marker.get("settings", {}))
                if wanted.get(k) != marker.get("settings", {}).get(k)
            )
            return CaseResult(
                case=case.case_id,
                source=str(case.path),
                status="error",
                mode=mode,
                error=f"{folder} was finished by an earlier run with other settings "
                f"(differing: {', '.join(diff)}); rerun with --overwrite to replace it",
                error_kind="case",
            )
        self.pending[i] = (wanted, fingerprint, marker)
        return None

    def _upload_finished(self, row: CaseResult, folder: Path, marker: dict[str, Any]) -> CaseResult:
        """--upload of a case an earlier run finished without uploading it."""
        from .dicomweb import DicomwebError, upload_seg

        try:
            row.uploaded = upload_seg(self.job.dicomweb, folder / _SEG_FILE)
        except DicomwebError as exc:
            row.status, row.error, row.error_kind = (
                "error",
                f"upload of the finished {folder / _SEG_FILE} failed: {exc}",
                exc.kind,
            )
            return row
        write_json(folder / _MARKER, {**marker, "uploaded": row.uploaded})
        return row

    def finish(self, i: int, row: CaseResult, tmp: Path, raised: bool) -> CaseResult:
        """Upload and commit a run's ``tmp`` folder when ``row`` is ok; clean up otherwise."""
        case = self.cases[i]
        wanted, fingerprint, marker = self.pending.pop(i)
        folder = self.out / case.case_id
        if row.status == "ok" and self.upload and _SEG_FILE in row.outputs:
            from .dicomweb import DicomwebError, upload_seg

            try:
                row.uploaded = upload_seg(self.job.dicomweb, tmp / _SEG_FILE)
            except DicomwebError as exc:
                row = replace(
                    row,
                    status="error",
                    error=f"segmented, but the upload failed: {exc}; nothing was committed (a "
                    "rerun redoes the case)",
                    error_kind=exc.kind,
                )
        if row.status == "ok":
            write_json(
                tmp / _MARKER,
                {
                    **row.to_json(),
                    "settings": wanted,
                    "input": fingerprint,
                    "encoder": _encoder_setting(self.job.model),
                },
            )
            commit_case_folder(tmp, folder)
        elif marker is None:
            _remove_unfinished(folder)
        elif raised:
            row.error += f"\n(the earlier finished result in {folder} is kept unchanged)"
        return row

    def record(self, i: int, row: CaseResult | SkippedSeries) -> None:
        """Put case ``i``'s row (or, for a retrieved series the rules skip, its skipped entry)
        into the summary and rewrite the summary files."""
        if isinstance(row, SkippedSeries):
            self.summary.skipped_series.append(row)
        else:
            self.rows[i] = row
        self.summary.results = [self.rows[k] for k in sorted(self.rows)]
        self.summary.seconds = time.perf_counter() - self.t_start
        write_summary(self.out, self.summary)
        self.emit(i, "end", result=row if isinstance(row, CaseResult) else None)

    def run_here(self, i: int, cuda: bool = False) -> None:
        """Plan, run (in this process), finish and record case ``i``."""
        import torch

        self.emit(i, "start")
        t0 = time.perf_counter()
        row = self.plan(i)
        if row is None:
            case = self.cases[i]
            tmp = new_case_folder(self.out, case.case_id)
            try:

                def emit(stage: str, done: int = 0, total: int = 0) -> None:
                    self.emit(i, stage, done, total)

                got, raised = attempt_case(self.job, case, tmp, emit)
                if isinstance(got, SkippedSeries):
                    self.pending.pop(i, None)
                    self.record(i, got)
                    return
                got.seconds = round(time.perf_counter() - t0, 3)
                row = self.finish(i, got, tmp, raised)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone after a commit; else a failed try
                if cuda:
                    torch.cuda.empty_cache()
            row.seconds = round(time.perf_counter() - t0, 3)
        self.record(i, row)
