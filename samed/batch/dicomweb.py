"""A DICOMweb server (a PACS) as the source of ``samed segment``, and STOW-RS of its DICOM SEGs.

Through ``dicomweb-client``: QIDO-RS finds the series (by StudyInstanceUID, SeriesInstanceUID or
a query), WADO-RS retrieves each one into a temporary folder just before it is segmented, and
the case then runs exactly as a local DICOM folder (:func:`samed.batch.segment.run_case`). With
``--upload`` each finished case's ``seg.dcm`` (which references the source series) is stored
back by STOW-RS before the case is committed: a case whose upload fails is an error and leaves
no result, so a rerun does it again.

Credentials come from an environment variable or a file, never from the command line: the
content is ``USER:PASSWORD`` (HTTP basic) or ``Bearer TOKEN``. They are never logged, never
written to a summary or ``case.json``, and :class:`Credentials` hides them in its ``repr``.

Every failure is a :class:`DicomwebError` with a ``kind`` that decides the exit code
(:data:`samed.batch.summary.EXIT_CODES`): ``auth`` (401/403), ``not-found`` (404, or a query
that names a study/series the server does not have), ``server`` (unreachable, timeout, any
other HTTP error, an incomplete retrieval, a rejected store).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cases import CaseInput, _dicom_case_id_from, _sanitize, _short_hash, series_skip_reason
from .series import SeriesFilter, SkippedSeries

__all__ = [
    "Credentials",
    "DicomwebError",
    "DicomwebSource",
    "RemoteSeries",
    "SeriesExcluded",
    "read_credentials",
    "parse_query",
    "list_remote_cases",
    "retrieve_case",
    "upload_seg",
]

#: QIDO-RS search keys accepted by ``--query`` (``date`` is StudyDate, ``YYYYMMDD[-YYYYMMDD]``).
QUERY_KEYS = {
    "modality": "Modality",
    "date": "StudyDate",
    "patient": "PatientID",
    "accession": "AccessionNumber",
    "description": "StudyDescription",
}
_NON_IMAGE = {"SEG", "RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "REG", "DOC"}


class DicomwebError(RuntimeError):
    """A DICOMweb failure of one case; ``kind`` is ``auth``, ``not-found`` or ``server``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class SeriesExcluded(Exception):
    """A retrieved series turned out to be one the rules skip (e.g. a localizer by ImageType)."""

    def __init__(self, skipped: SkippedSeries) -> None:
        super().__init__(skipped.reason)
        self.skipped = skipped


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials: ``kind`` ``"none"``, ``"basic"`` or ``"bearer"``; never printed."""

    kind: str = "none"
    user: str = ""
    secret: str = field(default="", repr=False)
    origin: str = ""

    def __repr__(self) -> str:
        return f"Credentials(kind={self.kind!r}, from {self.origin or 'nowhere'})"


def read_credentials(env: str | None = None, file: str | os.PathLike | None = None) -> Credentials:
    """Read credentials from the environment variable named ``env`` or from ``file``.

    The content (surrounding whitespace stripped) is ``USER:PASSWORD`` (basic) or
    ``Bearer TOKEN`` (bearer).

    Raises:
        ValueError: both or an unset/empty variable, an unreadable/empty file, or content in
            neither form (the message never contains the content).
    """
    if env and file:
        raise ValueError("give the DICOMweb credentials by --auth-env or --auth-file, not both")
    if not env and not file:
        return Credentials()
    if env:
        raw = os.environ.get(env, "")
        origin = f"environment variable {env}"
    else:
        try:
            raw = Path(file).expanduser().read_text()  # type: ignore[arg-type]
        except OSError as exc:
            raise ValueError(
                f"--auth-file {file}: cannot read it ({exc.strerror or exc})"
            ) from None
        origin = f"file {file}"
    raw = raw.strip()
    if not raw:
        raise ValueError(f"DICOMweb credentials: {origin} is empty or unset")
    m = re.fullmatch(r"(?i:bearer)\s+(\S+)", raw)
    if m:
        return Credentials("bearer", "", m.group(1), origin)
    user, sep, password = raw.partition(":")
    if not sep or not user or "\n" in raw:
        raise ValueError(
            f"DICOMweb credentials in {origin} are neither USER:PASSWORD nor 'Bearer TOKEN'"
        )
    return Credentials("basic", user, password, origin)


def parse_query(items: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """``--query KEY=VALUE`` items as QIDO-RS attribute filters.

    Keys: ``modality`` (Modality of the series), ``date`` (StudyDate, ``YYYYMMDD`` or a range
    ``YYYYMMDD-YYYYMMDD``, either end may be open), ``patient``, ``accession``,
    ``description`` (StudyDescription), or any DICOM keyword (e.g. ``StudyTime=...``).

    Raises:
        ValueError: an item without ``=``, an unknown keyword or a malformed date.
    """
    from pydicom.datadict import tag_for_keyword

    out = []
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--query {item!r}: expected KEY=VALUE (e.g. modality=CT)")
        key = QUERY_KEYS.get(key.strip().lower(), key.strip())
        if tag_for_keyword(key) is None:
            raise ValueError(
                f"--query {item!r}: {key!r} is neither one of {sorted(QUERY_KEYS)} nor a DICOM keyword"
            )
        if key == "StudyDate" and (
            not re.fullmatch(r"(\d{8})?-?(\d{8})?", value) or value in ("", "-")
        ):
            raise ValueError(f"--query date={value!r}: use YYYYMMDD or YYYYMMDD-YYYYMMDD")
        out.append((key, value.strip()))
    return tuple(out)


@dataclass(frozen=True)
class DicomwebSource:
    """A DICOMweb server and what to take from it.

    Attributes:
        url: the DICOMweb root (e.g. ``http://pacs:8042/dicom-web``); no credentials in it.
        studies: StudyInstanceUIDs (every series of each).
        series: SeriesInstanceUIDs.
        query: QIDO-RS filters (:func:`parse_query`); study-level keys select studies,
            ``Modality`` selects their series.
        credentials: :func:`read_credentials`.
        verify: TLS certificate verification: True (default), False, or a CA bundle path.
        timeout: seconds per HTTP request (connect and read).
    """

    url: str
    studies: tuple[str, ...] = ()
    series: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    credentials: Credentials = field(default_factory=Credentials)
    verify: bool | str = True
    timeout: float = 60.0

    def __post_init__(self) -> None:
        if not re.match(r"https?://", self.url):
            raise ValueError(f"DICOMweb url {self.url!r} must start with http:// or https://")
        if re.match(r"https?://[^/]*@", self.url):
            raise ValueError("put DICOMweb credentials in --auth-env/--auth-file, not in the url")
        if not (self.studies or self.series or self.query):
            raise ValueError(
                "a DICOMweb source needs --study, --series or --query (refusing to take the "
                "whole archive)"
            )
        if not self.timeout > 0:
            raise ValueError(f"DICOMweb timeout={self.timeout} must be > 0 seconds")

    def client(self) -> Any:
        """A ``dicomweb_client.DICOMwebClient`` with this source's session (auth, TLS, timeout)."""
        import requests
        from dicomweb_client import DICOMwebClient

        session = requests.Session()
        session.verify = self.verify
        if self.credentials.kind == "basic":
            session.auth = (self.credentials.user, self.credentials.secret)
        elif self.credentials.kind == "bearer":
            session.headers["Authorization"] = f"Bearer {self.credentials.secret}"
        client = DICOMwebClient(self.url.rstrip("/"), session=session, timeout=self.timeout)
        client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=200)
        return client

    def setting(self) -> dict[str, Any]:
        """What identifies the source in summaries (no credentials)."""
        return {"url": self.url, "auth": self.credentials.kind, "verify": bool(self.verify)}


@dataclass(frozen=True)
class RemoteSeries:
    """Where a case's series is on a DICOMweb server (what :func:`retrieve_case` fetches)."""

    url: str
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...] = ()
    error_kind: str = ""

    def describe(self) -> str:
        return f"{self.url} study {self.study_uid} series {self.series_uid}"


def _error(exc: BaseException, what: str, source: DicomwebSource) -> DicomwebError:
    """A :class:`DicomwebError` for an exception of requests / dicomweb-client."""
    import requests

    if isinstance(exc, DicomwebError):
        return exc
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        if code in (401, 403):
            origin = f" from {source.credentials.origin}" if source.credentials.origin else ""
            return DicomwebError(
                "auth",
                f"HTTP {code} {'Unauthorized' if code == 401 else 'Forbidden'}: the server refused "
                f"the credentials (auth {source.credentials.kind}{origin}) for {what}",
            )
        if code == 404:
            return DicomwebError("not-found", f"HTTP 404: not on the server: {what}")
        reason = exc.response.reason or ""
        return DicomwebError("server", f"HTTP {code} {reason}: server error for {what}")
    if isinstance(exc, requests.Timeout):
        return DicomwebError(
            "server", f"timeout: no answer within {source.timeout:g} s from {source.url} for {what}"
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return DicomwebError("server", f"TLS verification failed for {source.url} ({exc}): {what}")
    if isinstance(exc, requests.ConnectionError):
        return DicomwebError("server", f"cannot reach {source.url} (server down?) for {what}")
    return DicomwebError("server", f"{type(exc).__name__}: {exc} ({what})")


def _value(item: dict[str, Any], tag: str, default: Any = "") -> Any:
    vals = item.get(tag, {}).get("Value") or []
    return vals[0] if vals else default


def _remote_error_case(
    source: DicomwebSource, unit: str, exc: BaseException, study: str = "", series: str = ""
) -> CaseInput:
    err = _error(exc, unit, source)
    return CaseInput(
        case_id=f"dicomweb_{_sanitize(unit.split()[0], 16)}_{_short_hash(unit)}",
        path=Path(source.url),
        series_uid=series or None,
        error=str(err),
        remote=RemoteSeries(source.url, study, series, error_kind=err.kind),
    )


def _series_case(
    client: Any,
    source: DicomwebSource,
    study: str,
    item: dict[str, Any],
    series_filter: SeriesFilter,
    skipped: list[SkippedSeries],
) -> CaseInput | None:
    uid = str(_value(item, "0020000E"))
    modality = str(_value(item, "00080060"))
    description = str(_value(item, "0008103E"))
    n_files = int(_value(item, "00201209", 0) or 0)
    reason = series_filter.rejects(
        modality=modality,
        description=description,
        n_files=n_files if n_files else series_filter.min_slices,
        is_image=modality.upper() not in _NON_IMAGE,
    )
    if reason:
        skipped.append(SkippedSeries(source.url, uid, modality, description, n_files, reason))
        return None
    instances = client.search_for_instances(
        study, uid, fields=["SOPInstanceUID"], get_remaining=True
    )
    sops = tuple(sorted(str(_value(i, "00080018")) for i in instances))
    patient = str(_value(item, "00100020"))
    case_id = _dicom_case_id_from(patient, description or modality, uid)
    return CaseInput(
        case_id=case_id,
        path=Path(source.url),
        series_uid=uid,
        remote=RemoteSeries(source.url, study, uid, sops),
    )


def list_remote_cases(
    source: DicomwebSource,
    series_filter: SeriesFilter | None = None,
    skipped: list[SkippedSeries] | None = None,
) -> list[CaseInput]:
    """Find the series a DICOMweb source selects (QIDO-RS); one case per series.

    Case ids are those a local run of the same series gives (``<PatientID>_<SeriesDescription>
    _<8 hex of sha1(SeriesInstanceUID)>``). Series rejected by the rules (non-image modalities,
    scouts by description, ``series_filter``) go to ``skipped``. A study, series or query that
    fails (server down, 401/403, timeout, nothing found) becomes one case that fails with that
    error (kind in ``case.remote.error_kind``); the other units go on.
    """
    rules = series_filter or SeriesFilter()
    skipped = skipped if skipped is not None else []
    fields = ["SeriesDescription", "Modality", "NumberOfSeriesRelatedInstances", "PatientID"]
    client = source.client()
    cases: list[CaseInput] = []
    units: list[tuple[str, str, dict[str, str]]] = [(f"study {s}", s, {}) for s in source.studies]
    for uid in source.series:
        try:
            found = client.search_for_series(
                search_filters={"SeriesInstanceUID": uid}, fields=fields
            )
            if not found:
                raise DicomwebError(
                    "not-found", f"not on the server (QIDO-RS found nothing): series {uid}"
                )
            study = str(_value(found[0], "0020000D"))
            case = _series_case(client, source, study, found[0], rules, skipped)
            if case is not None:
                cases.append(case)
        except Exception as exc:  # noqa: BLE001 - one unit's failure is that unit's error row
            cases.append(_remote_error_case(source, f"series {uid}", exc, series=uid))
    if source.query:
        series_keys = {k: v for k, v in source.query if k == "Modality"}
        study_keys = {k: v for k, v in source.query if k != "Modality"}
        if "Modality" in series_keys:
            study_keys["ModalitiesInStudy"] = series_keys["Modality"]
        what = "query " + " ".join(f"{k}={v}" for k, v in source.query)
        try:
            studies = client.search_for_studies(search_filters=study_keys, get_remaining=True)
            if not studies:
                raise DicomwebError(
                    "not-found", f"not on the server (QIDO-RS found no study): {what}"
                )
            units += [
                (f"study {_value(s, '0020000D')}", str(_value(s, "0020000D")), series_keys)
                for s in studies
            ]
        except Exception as exc:  # noqa: BLE001
            cases.append(_remote_error_case(source, what, exc))
    for unit, study, filters in units:
        try:
            found = client.search_for_series(
                study, search_filters=filters or None, fields=fields, get_remaining=True
            )
            if not found:
                raise DicomwebError(
                    "not-found", f"not on the server (QIDO-RS found no series): {unit}"
                )
            for item in found:
                case = _series_case(client, source, study, item, rules, skipped)
                if case is not None:
                    cases.append(case)
        except Exception as exc:  # noqa: BLE001
            cases.append(_remote_error_case(source, unit, exc, study=study))
    seen: set[str] = set()
    return [c for c in cases if not (c.case_id in seen or seen.add(c.case_id))]  # type: ignore[func-returns-value]


def remote_fingerprint(case: CaseInput) -> dict[str, Any]:
    """The resume fingerprint of a remote case, from QIDO-RS alone (no retrieval): its series
    and the SHA-256 of its sorted SOPInstanceUIDs (a series that gained or lost instances is
    another input)."""
    sops = "\n".join(case.remote.sop_uids)
    return {
        "files": [],
        "sha256": hashlib.sha256(sops.encode()).hexdigest(),
        "series_uid": case.series_uid,
        "instances": len(case.remote.sop_uids),
        "source": case.remote.describe(),
    }


def retrieve_case(
    source: DicomwebSource, case: CaseInput, folder: Path, series_filter: SeriesFilter | None = None
) -> CaseInput:
    """Retrieve a remote case's series by WADO-RS into ``folder``; the local case to run.

    Raises:
        DicomwebError: the retrieval failed or returned other instances than QIDO-RS listed
            (``server``: "incomplete").
        SeriesExcluded: the retrieved files are a series the rules skip (e.g. ImageType
            LOCALIZER, known only from the files).
    """
    import pydicom

    from ..io import list_series

    rs = case.remote
    what = f"retrieving series {rs.series_uid} of study {rs.study_uid}"
    got: list[str] = []
    try:
        client = source.client()
        # transfer-syntax=*: as stored (a server without a JPEG 2000 codec cannot transcode)
        for ds in client.iter_series(
            rs.study_uid, rs.series_uid, media_types=(("application/dicom", "*"),)
        ):
            sop = str(ds.get("SOPInstanceUID", "") or f"instance{len(got)}")
            pydicom.dcmwrite(
                folder / f"{_sanitize(sop, 80) or len(got)}.dcm", ds, enforce_file_format=True
            )
            got.append(sop)
    except Exception as exc:  # noqa: BLE001
        err = _error(exc, what, source)
        raise DicomwebError(
            err.kind, f"{err} after {len(got)} of {len(rs.sop_uids)} instances"
        ) from None
    missing = sorted(set(rs.sop_uids) - set(got))
    if missing or len(got) != len(rs.sop_uids):
        raise DicomwebError(
            "server",
            f"{what}: incomplete, got {len(got)} of {len(rs.sop_uids)} instances"
            + (
                f" (missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})"
                if missing
                else ""
            ),
        )
    infos = [s for s in list_series(folder) if s.series_uid == rs.series_uid]
    if len(infos) != 1:
        raise DicomwebError("server", f"{what}: the retrieved files do not hold that series")
    info = infos[0]
    reason = series_skip_reason(info, series_filter or SeriesFilter())
    if reason:
        raise SeriesExcluded(
            SkippedSeries(
                rs.describe(),
                info.series_uid,
                info.modality,
                info.description,
                info.n_files,
                reason,
            )
        )
    return CaseInput(
        case.case_id, folder, series_uid=rs.series_uid, files=tuple(sorted(info.paths)), remote=rs
    )


def upload_seg(source: DicomwebSource, path: Path) -> str:
    """Store one DICOM SEG by STOW-RS; returns its SOPInstanceUID.

    Raises:
        DicomwebError: the store failed or the server reported the instance as failed.
    """
    import pydicom

    ds = pydicom.dcmread(path)
    uid = str(ds.SOPInstanceUID)
    what = f"storing the DICOM SEG {uid} (STOW-RS)"
    try:
        answer = source.client().store_instances([ds], study_instance_uid=str(ds.StudyInstanceUID))
    except Exception as exc:  # noqa: BLE001
        raise _error(exc, what, source) from None
    failed = list(answer.get("FailedSOPSequence", []) or [])
    if failed:
        reason = failed[0].get("FailureReason", "?")
        raise DicomwebError("server", f"{what}: the server rejected it (FailureReason {reason})")
    return uid
