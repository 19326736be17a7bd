"""Evaluation: the one Dice (:func:`dice`), per-volume scores, runs over labeled splits, reports.

Modules: :mod:`~samed.evaluate.metrics` (Dice, HD95, NSD; numpy Dice, MONAI distances),
:mod:`~samed.evaluate.run` (:func:`evaluate`, :func:`evaluate_iter`), :mod:`~samed.evaluate.report`
(:class:`EvalReport`) and :mod:`~samed.evaluate.cli` (``samed evaluate``). Labeled datasets
are read by :mod:`samed.datasets`, shared with training.

Python::

    from samed.evaluate import evaluate
    report = evaluate(build_model(), "../shared/data/acdc", "val", prompt="box", limit=1)
    print(report.table(), report.mean_dice)
"""

from __future__ import annotations

from .._lazy import lazy_exports

# imported on first use: `samed finetune --help` / `samed evaluate --help` stay torch-free
_LAZY = {
    "EvalOptions": ".run",
    "EvalReport": ".report",
    "add_parser": ".cli",
    "dataset_from_config": ".data",
    "dice": ".metrics",
    "evaluate": ".run",
    "evaluate_iter": ".run",
    "run_evaluate": ".cli",
    "score_case": ".metrics",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
