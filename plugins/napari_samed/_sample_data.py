"""Sample data from an installed package (pydicom's test files; no download)."""

from __future__ import annotations

from typing import Any

from ._reader import volume_layer_data

__all__ = ["sample_ct"]


def sample_ct() -> list[tuple[Any, dict[str, Any], str]]:
    """A 128 x 128 CT slice (``CT_small.dcm``, shipped inside pydicom) read through samed.io.

    Raises:
        FileNotFoundError: if pydicom's test file is missing from the installation.
    """
    from pydicom.data import get_testdata_file

    from samed.io import load_volume

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        raise FileNotFoundError("pydicom's test file CT_small.dcm is not installed")
    return [volume_layer_data(load_volume(path), name="CT_small (pydicom)")]
