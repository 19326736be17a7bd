"""The headless batch job behind ``samed segment``: discover cases, segment, write, summarise.

One bad case never stops a batch: its row in the summary carries the error and the job goes on.
Per case, ``OUT/<case id>/`` receives (each file written atomically):

* ``labels.nii.gz``: the label map on the source's exact voxel grid and affine;
* ``seg.dcm``: a DICOM SEG referencing the source series (DICOM inputs, ``dicom-seg`` format);
* ``qc.png``: a montage of slices with the labels overlaid (:mod:`samed.batch.qc`);
* ``case.json``: written last; its presence marks the case as finished (resume) and records the
  settings it was made with, so a later run with other settings reports it instead of silently
  keeping or replacing it.

``OUT/summary.csv`` and ``OUT/summary.json`` are rewritten after every case, so an interrupted
batch still leaves a truthful summary.

Modes: *prompted* (a prompts file, :mod:`samed.batch.prompts`: each object is segmented on its key
slice and propagated through the volume with :meth:`samed.engine.Session.propagate_volume`) and
*automatic* (an automatic adapter: every class on every slice, no prompt). Objects of one case
are merged into one label map in file order; a later object only fills voxels that are still
background, so where two objects overlap the one listed first keeps its voxels.
"""

from .cases import IMAGE_SUFFIXES, CaseInput, discover_cases
from .cli import add_parser, run_segment
from .run import FORMATS, segment_batch
from .summary import BatchSummary, CaseResult, ProgressEvent

__all__ = [
    "CaseInput",
    "CaseResult",
    "BatchSummary",
    "ProgressEvent",
    "FORMATS",
    "IMAGE_SUFFIXES",
    "discover_cases",
    "segment_batch",
    "add_parser",
    "run_segment",
]
