"""Evaluation on labeled datasets (``samed evaluate``); see :mod:`samed.evaluate.run`."""

from __future__ import annotations

from .run import EvalReport, add_parser, evaluate, evaluate_iter, run_evaluate, score_case

__all__ = ["EvalReport", "add_parser", "evaluate", "evaluate_iter", "run_evaluate", "score_case"]
