"""Make samed napari's reader for the medical formats it reads (run when the plugin activates).

napari asks which plugin should read a file when several can (File > Open, drag and drop,
``viewer.open(path, plugin=None)``) and preselects its own builtins reader, which reads DICOM
folders, NRRD and NIfTI as bare arrays: no spacing, no geometry, no radiological view, no DICOM
SEG export. The answer napari remembers is ``settings.plugins.extension2reader`` (file pattern ->
plugin); :func:`prefer_samed_reader` puts samed there for the patterns that have no choice yet,
so a choice the user made is never overridden. Folders: samed reads DICOM series and hands any
other folder to napari's builtins reader (see :func:`napari_samed._reader.get_reader`).

napari 0.9's ``viewer.open(path)`` defaults to ``plugin="napari"`` (builtins), which bypasses
these settings: scripts pass ``plugin=None`` (use the settings) or ``plugin="samed"``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PLUGIN", "READER_PATTERNS", "prefer_samed_reader", "activate"]

#: The npe2 plugin name (``name`` in napari.yaml).
PLUGIN = "samed"
#: napari reader-preference patterns (``fnmatch`` against the real path; a folder ends with /).
READER_PATTERNS = (
    "*.nii",
    "*.nii.gz",
    "*.nrrd",
    "*.nhdr",
    "*.mha",
    "*.mhd",
    "*.mgz",
    "*.mgh",
    "*.dcm",
    "*/",
)


def prefer_samed_reader() -> list[str]:
    """Make samed the preferred reader for :data:`READER_PATTERNS` that have no preference.

    Returns:
        The patterns set now (empty when every pattern already had a preferred reader).
    """
    from napari.settings import get_settings

    plugins = get_settings().plugins
    current = dict(plugins.extension2reader)
    added = [p for p in READER_PATTERNS if p not in current]
    if added:
        plugins.extension2reader = {**current, **dict.fromkeys(added, PLUGIN)}
    return added


def activate(_context: Any = None) -> None:
    """npe2 ``on_activate`` hook: see :func:`prefer_samed_reader` (never raises: a settings
    problem must not stop the plugin from loading)."""
    try:
        prefer_samed_reader()
    except Exception:  # noqa: BLE001 - napari without settings (e.g. headless npe2 use)
        pass
