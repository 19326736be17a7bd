"""Write ACDC patients' image + label volumes as an annotations folder (what the napari Train
adapter panel exports), for ``samed finetune --from-annotations`` comparisons.

    python bench/export_acdc_pairs.py OUT [--split labeled_3]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("SAMED_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--split", default="labeled_3")
    args = ap.parse_args()
    from samed.datasets import load_dataset
    from samed.io import load_label_map, load_volume
    from samed.train.annotations import export_pair

    ds = load_dataset(DATA / "acdc")
    names = {k: v for k, v in ds.labels.items() if k}
    for case in ds.split(args.split):
        vol = load_volume(case.image)
        lab = np.asarray(load_label_map(case.label, reference=vol).array).astype(np.int16)
        export_pair(args.out, case.case_id, vol, lab, names, source=str(case.image))
        print(case.case_id, vol.shape)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
