"""``import samed`` (and every samed submodule) must not import napari or a Qt binding."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import samed

GUI = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy")


def _submodules() -> list[str]:
    names = ["samed"]
    for info in pkgutil.walk_packages(samed.__path__, prefix="samed."):
        names.append(info.name)
    return sorted(names)


def test_import_samed_pulls_no_gui():
    code = (
        "import sys, samed\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import samed imported GUI modules: {out.stdout.strip()}"


def test_every_samed_submodule_imports_without_gui():
    mods = _submodules()
    assert "samed.annotation" in mods
    code = (
        "import importlib, sys\n"
        f"mods = {mods!r}\n"
        "failed = []\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except ImportError as exc:\n"
        "        failed.append(f'{m}: {exc}')\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI!r})\n"
        "print('GUI=' + ','.join(bad))\n"
        "print('FAILED=' + ' | '.join(failed))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert lines.get("GUI", "") == "", f"samed submodules imported GUI modules: {lines['GUI']}"
    # An optional dependency that is absent must not break this check, but a GUI import would.
    assert "napari" not in lines.get("FAILED", "") and "Qt" not in lines.get("FAILED", "")


def test_registry_and_the_intensity_grammar_import_without_torch():
    # samed info, the plugin's menus and every CLI's choices read these before any model exists
    mods = "samed.registry, samed.intensity, samed.precision, samed.postprocess"
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {mods}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert "samed.registry" in imported and "samed.intensity" in imported  # the check ran
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "monai"))
    assert heavy == [], f"{mods} imported {heavy[:5]}"
