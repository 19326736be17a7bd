"""napari plugin for samed: reader, writer, sample data and an interactive segmentation widget.

Importing this package is cheap and imports neither Qt nor torch; napari loads the modules named in
``napari.yaml`` only when a contribution is used.
"""

from ._compat import block_triton_after_gl

__version__ = "0.1.0"

__all__ = ["__version__"]

# Every contribution module is imported through this package, so this runs before samed loads
# torch in a napari process (see _compat for the crash it prevents).
block_triton_after_gl()
