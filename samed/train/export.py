"""``samed finetune --export DIR``: copy the trained adapter to ``DIR/<name>`` without risk to
anything else in DIR.

The copy is written into a temporary folder beside the destination (``DIR/.tmp-export-*``) and
renamed into place, so a failed export leaves the destination as it was. An existing destination
is replaced only when it is a samed adapter folder holding nothing but adapter files; any other
folder, a file or a symlink there is refused. Nothing is ever deleted recursively: an old adapter
is removed file by file (its known files), then its empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..lora_config import (
    ADAPTER_CONFIG,
    ADAPTER_METADATA,
    ADAPTER_WEIGHTS,
)
from ..lora_config import (
    remove_adapter_folder as _remove_adapter_folder,
)
from ..paths import safe_name, swap_in_folder

__all__ = ["export_adapter", "check_export", "ADAPTER_FILES"]

#: The files an adapter folder consists of (what is copied and what may be replaced).
ADAPTER_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_METADATA)
_TMP_PREFIX = ".tmp-export-"


def _is_replaceable_adapter(folder: Path) -> str:
    """ "" when ``folder`` is a samed adapter holding only adapter files, else why it is not."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder (a file or a symlink)"
    names = {p.name for p in folder.iterdir()}
    extra = sorted(names - set(ADAPTER_FILES))
    if extra:
        return f"it holds files that are not part of an adapter: {extra[:5]}"
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"it has no readable {ADAPTER_CONFIG}"
    if not isinstance(cfg, dict) or cfg.get("format") != "samed-lora":
        return f"its {ADAPTER_CONFIG} is not a samed adapter config"
    return ""


def _clean_stale(dest_dir: Path) -> None:
    """Remove temporaries of an export that was killed (only names this module creates)."""
    for p in dest_dir.glob(f"{_TMP_PREFIX}*"):
        if (
            p.is_dir()
            and not p.is_symlink()
            and {q.name for q in p.iterdir()} <= set(ADAPTER_FILES)
        ):
            _remove_adapter_folder(p)


def check_export(dest_dir: str | os.PathLike, name: str) -> Path:
    """Check, before training, that ``dest_dir/name`` may be written; returns that path.

    Raises:
        ValueError: an unsafe ``name`` (:func:`samed.paths.safe_name`), or a destination that
            exists and is not a samed adapter folder holding only adapter files.
    """
    safe_name(name, "adapter name")
    dst = Path(dest_dir).expanduser() / name
    if dst.exists() or dst.is_symlink():
        why = _is_replaceable_adapter(dst)
        if why:
            raise ValueError(
                f"export destination {dst} exists and is not replaced because {why}; "
                "choose another --export folder or remove it yourself"
            )
    return dst


def export_adapter(adapter: str | os.PathLike, dest_dir: str | os.PathLike, name: str) -> Path:
    """Copy the adapter folder ``adapter`` to ``dest_dir/name`` atomically.

    Args:
        adapter: the trained adapter folder (``OUT/adapter``).
        dest_dir: the folder to export into (created if missing).
        name: the adapter's name; checked with :func:`samed.paths.safe_name`.

    Returns:
        The exported folder ``dest_dir/name``.

    Raises:
        ValueError: an unsafe name; a destination that exists and is not a samed adapter folder
            holding only adapter files; a destination that is (or contains, or lies inside) the
            source.
    """
    dst = check_export(dest_dir, name)
    root = dst.parent
    src = Path(adapter).resolve()
    rdst = dst.resolve()
    if rdst == src or src in rdst.parents or rdst in src.parents:
        raise ValueError(f"export destination {dst} overlaps the trained adapter {src}")
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root))
    try:
        for f in ADAPTER_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / f)
        swap_in_folder(tmp, dst, _remove_adapter_folder, _TMP_PREFIX)
    except BaseException:
        if tmp.exists():
            _remove_adapter_folder(tmp)
        raise
    return dst
