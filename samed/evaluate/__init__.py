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

from .cli import add_parser, run_evaluate
from .metrics import dice, score_case
from .report import EvalReport
from .run import EvalOptions, evaluate, evaluate_iter

__all__ = [
    "EvalOptions",
    "EvalReport",
    "add_parser",
    "dice",
    "evaluate",
    "evaluate_iter",
    "run_evaluate",
    "score_case",
]
