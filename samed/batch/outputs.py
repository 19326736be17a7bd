"""What keeps a batch's outputs honest: the check of every output path against every input, the
resume fingerprint of an input, temporary case folders swapped in atomically, and the clean-up of
temporaries a killed run left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..paths import TMP_PREFIX, swap_in_folder
from .cases import CaseInput

__all__ = [
    "SUMMARY_FILES",
    "TMP_PREFIX",
    "check_outputs",
    "check_writable",
    "input_fingerprint",
    "fingerprint_differences",
    "new_case_folder",
    "commit_case_folder",
    "clean_temporaries",
]

#: Files of the output folder itself.
SUMMARY_FILES = ("summary.csv", "summary.json")
#: Prefix of every temporary this package (and :func:`samed.io.atomic_write`) creates.
_HASH_CHUNK = 1 << 20


def _resolved(p: Path) -> Path:
    return Path(os.path.realpath(p.expanduser()))


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_outputs(
    out_dir: Path, inputs: Sequence[str | os.PathLike], cases: Iterable[CaseInput]
) -> None:
    """Refuse a batch whose outputs could touch an input, before anything is written.

    The outputs are ``out_dir/summary.csv``, ``out_dir/summary.json`` and every case folder
    ``out_dir/<case id>`` (replaced as a whole when a case is redone). The inputs are the command
    line's files and folders and every file of every case. All are resolved (symlinks followed);
    an output that is, contains or lies inside an input is refused, and so is an output folder
    inside an input folder.

    Raises:
        ValueError: naming the output and the input it would overwrite.
    """
    out = _resolved(out_dir)
    ins: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.exists():
            ins.append(_resolved(p))
    case_list = list(cases)
    for c in case_list:
        ins.extend(_resolved(f) for f in (c.files or (c.path,)) if Path(f).exists())
    for p in ins:
        if p.is_dir() and (out == p or p in out.parents):
            raise ValueError(
                f"output folder {out} is inside the input folder {p}; choose an output folder "
                "outside every input folder (inputs are never written to)"
            )
    outputs = [_resolved(out / name) for name in SUMMARY_FILES]
    outputs += [_resolved(out / c.case_id) for c in case_list]  # a symlinked case folder too
    for o in outputs:
        for p in ins:
            if _overlaps(o, p):
                raise ValueError(
                    f"output {o} would overwrite the input {p}; choose an output folder that "
                    "holds no input (inputs are never written to)"
                )


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and write a probe file into it.

    Raises:
        ValueError: naming the folder and the operating system's reason.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f"{TMP_PREFIX}probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(
            f"output folder {out_dir} is not writable: {exc.strerror or exc}"
        ) from None


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(_HASH_CHUNK), b""):
                h.update(chunk)
    return h.hexdigest()


def input_fingerprint(case: CaseInput) -> dict[str, Any]:
    """The identity and content of a case's input, recorded in ``case.json``.

    Files: every file of the case (the image file; all slices of a DICOM series, sorted by
    path), each with its resolved path, size and mtime, and one SHA-256 over the **full
    content** of all of them (file name, NUL, bytes; in path order). Only ``sha256`` and the
    sizes decide whether a finished case belongs to this input (a copied or touched archive is
    the same input); paths and mtimes are there for the message.

    Returns:
        ``{"files": [{"path", "size", "mtime"}...], "sha256": hex, "series_uid": str | None}``.
    """
    files = sorted(_resolved(Path(f)) for f in (case.files or (case.path,)))
    files = [f for f in files if f.is_file()]
    return {
        "files": [
            {"path": str(f), "size": f.stat().st_size, "mtime": f.stat().st_mtime} for f in files
        ],
        "sha256": _sha256(files),
        "series_uid": case.series_uid,
    }


def fingerprint_differences(old: Any, new: dict[str, Any]) -> str:
    """ "" when ``old`` (from ``case.json``) is the same input as ``new``, else what differs."""
    if not isinstance(old, dict):
        return "the earlier result records no input fingerprint (made by an older samed)"
    if old.get("sha256") == new["sha256"] and [f.get("size") for f in old.get("files", [])] == [
        f["size"] for f in new["files"]
    ]:
        return ""
    before = ", ".join(str(f.get("path")) for f in old.get("files", [])[:2]) or "?"
    now = ", ".join(f["path"] for f in new["files"][:2])
    return f"it was made from {before} (SHA-256 {str(old.get('sha256'))[:12]}...), this input is {now} (SHA-256 {new['sha256'][:12]}...)"


def new_case_folder(out_dir: Path, case_id: str) -> Path:
    """An empty temporary folder beside the case folder, where the case is written."""
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{case_id}-", dir=out_dir))


def commit_case_folder(tmp: Path, folder: Path) -> None:
    """Swap the finished temporary folder in for ``folder`` (which may hold an earlier result).

    Two renames within one folder: the old case folder moves aside, the new one takes its name,
    then the old one is removed. A crash between them leaves only ``.tmp-*`` folders, which
    :func:`clean_temporaries` removes on the next run.
    """
    swap_in_folder(tmp, folder, _remove_tree, TMP_PREFIX)


def _remove_tree(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def clean_temporaries(out_dir: Path) -> list[Path]:
    """Remove ``.tmp-*`` entries that a killed run left in ``out_dir`` and its case folders.

    Only names with this package's temporary prefix are touched, and only in the output folder
    (never in inputs: :func:`check_outputs` ran first). Two batches must not share one output
    folder at the same time.

    Returns:
        What was removed.
    """
    removed: list[Path] = []
    if not out_dir.is_dir():
        return removed
    candidates = list(out_dir.glob(f"{TMP_PREFIX}*"))
    for sub in out_dir.iterdir():
        if sub.is_dir() and not sub.is_symlink() and not sub.name.startswith(TMP_PREFIX):
            candidates.extend(sub.glob(f"{TMP_PREFIX}*"))
    for p in candidates:
        with contextlib.suppress(OSError):
            _remove_tree(p)
            removed.append(p)
    return removed
