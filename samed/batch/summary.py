"""Rows of a batch, the summary files (``summary.csv``, ``summary.json``) and progress events."""

from __future__ import annotations

import csv
import io as _stdio
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CaseResult",
    "BatchSummary",
    "ProgressEvent",
    "ProgressCallback",
    "write_summary",
    "EXIT_CODES",
]

_STATUSES = ("ok", "skipped", "error")
#: Exit code of ``samed segment`` per kind of case error; the run exits with the largest among
#: its failed cases (0 when none failed; 2 is a bad command line, before any case runs).
EXIT_CODES = {"case": 1, "not-found": 3, "server": 4, "auth": 5}


@dataclass
class CaseResult:
    """One row of the summary.

    Attributes:
        case: case id.
        source: input file or DICOM folder (and series).
        status: ``"ok"`` (segmented now), ``"skipped"`` (finished by an earlier run) or ``"error"``.
        seconds: wall time of this run for the case (0 when skipped).
        mode: ``"prompted"`` or ``"automatic"``.
        slices: number of slices Z of the volume.
        volumes_ml: label name -> volume in millilitres (voxel count x voxel volume).
        labels: label value -> name.
        outputs: files written in the case folder (names relative to it).
        error: the error message (``""`` unless status is ``"error"``).
        error_kind: what failed, a key of :data:`EXIT_CODES` (``"case"``: reading or segmenting;
            ``"not-found"``, ``"server"``, ``"auth"``: the DICOMweb server); ``""`` unless error.
        uploaded: SOPInstanceUID of the DICOM SEG stored on the DICOMweb server (``--upload``).
        uncertainty: automatic mode with ``--uncertainty``: the case's uncertainty score
            (:func:`samed.uncertainty.case_score`; higher = review first), else None.
        preprocessing: what reached the model (:attr:`samed.engine.Session.preprocessing`:
            intensity applied and why, modality, pixel spacing, resampling).
    """

    case: str
    source: str
    status: str
    seconds: float = 0.0
    mode: str = ""
    slices: int = 0
    volumes_ml: dict[str, float] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    error_kind: str = ""
    uploaded: str = ""
    uncertainty: float | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return d


@dataclass
class BatchSummary:
    """What a batch did: one :class:`CaseResult` per case, in input order.

    Attributes:
        out_dir: the output folder.
        results: the rows.
        mode: ``"prompted"`` or ``"automatic"``.
        seconds: wall time of the whole run.
        warnings: things the user should know that are no case's error (e.g. prompts for case
            ids that are not among the inputs).
        skipped_series: the DICOM series that were not cases, with the reason
            (:class:`samed.batch.series.SkippedSeries`: non-image objects, localizers,
            ``--series-filter``).
    """

    out_dir: Path
    results: list[CaseResult]
    mode: str
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    skipped_series: list[Any] = field(default_factory=list)

    def count(self, status: str) -> int:
        """Number of rows with ``status`` (one of ``ok``, ``skipped``, ``error``)."""
        if status not in _STATUSES:
            raise ValueError(f"status {status!r} is not one of {list(_STATUSES)}")
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 when no case failed, else the largest :data:`EXIT_CODES` value of the failed cases
        (1: a case could not be read or segmented; 3: a study/series not on the DICOMweb
        server; 4: the server unreachable, timed out, gave an incomplete series or refused a
        store; 5: the server refused the credentials)."""
        codes = [
            EXIT_CODES.get(r.error_kind or "case", 1) for r in self.results if r.status == "error"
        ]
        return max(codes, default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "mode": self.mode,
            "seconds": round(self.seconds, 3),
            "counts": {s: self.count(s) for s in _STATUSES},
            "warnings": list(self.warnings),
            "skipped_series": [s.to_json() for s in self.skipped_series],
            "cases": [r.to_json() for r in self.results],
        }

    def table(self) -> str:
        """A plain-text table of the rows (what the CLI prints at the end)."""
        names = _volume_columns(self.results)
        head = ["case", "status", "seconds"] + [f"{n} ml" for n in names] + ["error"]
        rows = [
            [r.case, r.status, f"{r.seconds:.1f}"]
            + [f"{r.volumes_ml[n]:.1f}" if n in r.volumes_ml else "" for n in names]
            + [r.error.splitlines()[0][:100] if r.error else ""]
            for r in self.results
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
        lines = [
            "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
            for row in [head, *rows]
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of a batch, sent to the ``progress`` callback of :func:`segment_batch`.

    Attributes:
        case_index: 0-based index of the current case.
        n_cases: number of cases.
        case_id: the current case.
        stage: ``"start"``, ``"load"``, ``"segment"``, ``"write"`` or ``"end"``.
        done: work units (slices) done within the case's stage.
        total: work units of the stage (0 when unknown).
        result: the case's row on ``"end"``, else None.
    """

    case_index: int
    n_cases: int
    case_id: str
    stage: str
    done: int = 0
    total: int = 0
    result: CaseResult | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def write_json(path: Path, data: Any) -> None:
    from ..io import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_summary(out_dir: Path, summary: BatchSummary) -> None:
    from ..io import atomic_write

    write_json(out_dir / "summary.json", summary.to_json())
    names = _volume_columns(summary.results)
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["case", "source", "status", "seconds", "mode", "slices"]
        + [f"volume_ml_{n}" for n in names]
        + ["outputs", "error", "uncertainty"]
    )
    for r in summary.results:
        writer.writerow(
            [r.case, r.source, r.status, f"{r.seconds:.2f}", r.mode, r.slices]
            + [r.volumes_ml.get(n, "") for n in names]
            + [";".join(r.outputs), r.error]
            + ["" if r.uncertainty is None else f"{r.uncertainty:.6f}"]
        )
    with atomic_write(out_dir / "summary.csv") as tmp:
        tmp.write_text(buf.getvalue())


def _volume_columns(results: Sequence[CaseResult]) -> list[str]:
    names: dict[str, None] = {}
    for r in results:
        for n in r.volumes_ml:
            names.setdefault(n, None)
    return list(names)
