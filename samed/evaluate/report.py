"""An evaluation's results: per-(case, class) rows, per-class means, JSON / CSV / text tables."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EvalReport", "nan_to_none"]


def nan_to_none(x: float | None) -> float | None:
    """``x`` as a float, or None when it is None, NaN or infinite (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class EvalReport:
    """Evaluation results.

    Attributes:
        rows: one dict per (case, class): case, label, name, dice, hd95, nsd, seconds.
        labels: class value -> name.
        settings: protocol, model, adapter, split, data folder.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[int, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def per_class(self) -> dict[str, dict[str, float | None]]:
        """Mean of each metric per class name over cases (NaN entries skipped)."""
        out: dict[str, dict[str, float | None]] = {}
        for c, name in sorted(self.labels.items()):
            if c == 0:
                continue
            rows = [r for r in self.rows if r["label"] == c]
            stats: dict[str, float | None] = {}
            for m in ("dice", "hd95", "nsd"):
                vals = [r[m] for r in rows if r[m] is not None and math.isfinite(r[m])]
                stats[m] = float(np.mean(vals)) if vals else None
            stats["n"] = len([r for r in rows if r["dice"] is not None])
            out[name] = stats
        return out

    @property
    def mean_dice(self) -> float:
        """Mean over classes of the per-class mean Dice."""
        vals = [s["dice"] for s in self.per_class().values() if s["dice"] is not None]
        return float(np.mean(vals)) if vals else math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content: settings, labels, per-class means, mean Dice and the case rows."""
        return {
            "settings": self.settings,
            "labels": {str(k): v for k, v in self.labels.items()},
            "per_class": self.per_class(),
            "mean_dice": nan_to_none(self.mean_dice),
            "cases": self.rows,
        }

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as indented JSON (atomically; NaN as null); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=nan_to_none) + "\n")
        os.replace(tmp, path)
        return path

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write one row per (case, class) (atomically; missing values empty); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        cols = ["case", "label", "name", "dice", "hd95", "nsd", "seconds"]
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
        os.replace(tmp, path)
        return path

    def case_table(self) -> str:
        """Human-readable 3D Dice per volume: one line per case, one column per class (label
        value), and the case's mean over the classes that have a Dice ("-": class absent from
        the label, see :func:`samed.evaluate.metrics.dice`)."""
        classes = [(c, n) for c, n in sorted(self.labels.items()) if c != 0]
        width = max([len("case"), *(len(str(r["case"])) for r in self.rows)]) + 2
        lines = [
            f"{'case':<{width}}" + "".join(f"{n[:9]:>10}" for _, n in classes) + f"{'mean':>10}"
        ]
        cases: dict[str, dict[int, float | None]] = {}
        for r in self.rows:
            cases.setdefault(str(r["case"]), {})[int(r["label"])] = r["dice"]
        for case, d in cases.items():
            vals = [d.get(c) for c, _ in classes]
            ok = [v for v in vals if v is not None and math.isfinite(v)]
            cells = "".join(
                f"{v:>10.4f}" if v is not None and math.isfinite(v) else f"{'-':>10}" for v in vals
            )
            mean = f"{float(np.mean(ok)):>10.4f}" if ok else f"{'-':>10}"
            lines.append(f"{case:<{width}}{cells}{mean}")
        return "\n".join(lines)

    def table(self) -> str:
        """Human-readable per-class table (mean over volumes of the per-volume 3D Dice, HD95
        and NSD; ``n`` volumes)."""
        lines = [f"{'class':<16}{'n':>4}{'dice':>9}{'hd95':>9}{'nsd':>8}"]
        for name, s in self.per_class().items():

            def f(v: float | None, w: int) -> str:
                return f"{v:>{w}.4f}" if v is not None else f"{'-':>{w}}"

            lines.append(f"{name:<16}{s['n']:>4}{f(s['dice'], 9)}{f(s['hd95'], 9)}{f(s['nsd'], 8)}")
        return "\n".join(lines)
