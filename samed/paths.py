"""Path safety: the one rule for every user-supplied name that becomes a file or folder name.

Adapter names (``name:`` of a fine-tuning config, ``--export DIR/<name>``), batch case ids and
anything else a user or a file header names and samed turns into a path component go through
:func:`safe_name`. A name that could climb out of its folder (``..``), address the folder itself
(``.``, ``""``), hide a separator or a NUL, be read as an option (leading ``-``), or be unusable on
Windows (reserved device names, ``<>:"|?*``, trailing dot or space) is refused; nothing is
silently rewritten, so the name a user sees is the folder that is written.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["safe_name", "swap_in_folder", "TMP_PREFIX", "MAX_NAME_LENGTH", "WINDOWS_RESERVED"]

#: Longest accepted name in characters (file systems allow 255 bytes; keep room for suffixes).
MAX_NAME_LENGTH = 120
#: Device names Windows refuses as file names (with any extension).
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"]
    + [f"COM{i}" for i in range(1, 10)]
    + [f"LPT{i}" for i in range(1, 10)]
)
_FORBIDDEN = re.compile(r'[/\\<>:"|?*\x00-\x1f\x7f]')


#: Prefix of every temporary name samed writes beside an output (atomic writes, batch case
#: folders): only names with it are ever cleaned up, so a user's own ``.tmp-*`` files are safe.
TMP_PREFIX = ".tmp-samed-"


def safe_name(name: object, what: str = "name") -> str:
    """Return ``name`` unchanged if it is safe as one path component, else raise.

    Args:
        name: the candidate name (must be a ``str``).
        what: how to call it in the error message (e.g. ``"adapter name"``, ``"case id"``).

    Returns:
        ``name`` itself.

    Raises:
        ValueError: naming the value and the rule it breaks: not a string; empty; ``.`` or
            ``..``; a path separator (``/`` or ``\\``), NUL or another control character, or one of
            ``<>:"|?*``; a leading ``-``; a leading or trailing space or a trailing dot; a
            Windows-reserved device name (``CON``, ``NUL``, ``COM1``...); longer than
            :data:`MAX_NAME_LENGTH` characters.
    """
    if not isinstance(name, str):
        raise ValueError(f"{what} {name!r} must be a string")
    allowed = (
        "a single folder/file name: not empty, '.' or '..', no '/', '\\', NUL or control "
        f"characters, none of <>:\"|?*, no leading '-', at most {MAX_NAME_LENGTH} characters"
    )
    problem = ""
    if name in ("", ".", ".."):
        problem = (
            "is empty or refers to a folder itself" if name != ".." else "climbs out of its folder"
        )
    elif _FORBIDDEN.search(name):
        bad = sorted(set(_FORBIDDEN.findall(name)))
        problem = f"contains {', '.join(repr(c) for c in bad)}"
    elif name.startswith("-"):
        problem = "starts with '-' (would be read as an option)"
    elif name != name.strip() or name.endswith("."):
        problem = "starts or ends with a space, or ends with '.'"
    elif name.split(".")[0].upper() in WINDOWS_RESERVED:
        problem = "is a reserved device name on Windows"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"is {len(name)} characters long"
    if problem:
        raise ValueError(f"{what} {name!r} {problem}; allowed: {allowed}")
    return name


def swap_in_folder(
    tmp: Path, folder: Path, remove_old: Callable[[Path], None], tmp_prefix: str
) -> None:
    """Put the finished folder ``tmp`` in place of ``folder`` (which may hold an earlier result).

    Two renames in one parent folder: the old folder moves aside under ``tmp_prefix`` + a unique
    name, ``tmp`` takes its name, then ``remove_old`` removes the old one (the caller decides
    what may be removed). A crash between the renames leaves only ``tmp_prefix`` folders, which
    the callers clean on their next run; ``folder`` is never half old, half new.
    """
    if folder.exists() or folder.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix}old-{folder.name}-", dir=folder.parent))
        old.rmdir()
        os.rename(folder, old)
        os.rename(tmp, folder)
        remove_old(old)
    else:
        os.rename(tmp, folder)
