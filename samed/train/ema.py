"""Weight averaging and the keep rule of the quick recipe (:mod:`samed.train.quick`, issue #18):
``train.ema`` (an exponential moving average of the trained decoder weights) and
``validation.keep`` (``best`` or ``last``). The full loop (:func:`samed.train.finetune`) reads
neither and refuses them (:func:`samed.train.config.refuse_quick_only`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["WeightAverage", "ema_decay", "weights_record"]


def ema_decay(ema: float, t: int) -> float:
    """The decay of the ``t``-th average update (``t`` = optimiser steps done, 1 after the
    first): ``min(ema, (1 + t) / (10 + t))``, so the first updates follow the weights closely
    (2/11 after step 1) and the average starts forgetting the initial weights quickly."""
    return min(float(ema), (1.0 + t) / (10.0 + t))


class WeightAverage:
    """Exponential moving average of trained parameters, kept on their device.

    ``update(t)`` after optimiser step ``t``: ``avg = d * avg + (1 - d) * w`` with
    ``d = ema_decay(ema, t)``; the average starts as the weights at construction. ``applied()``
    puts the average into the parameters for a ``with`` block and restores the trained weights
    after it (training continues from those; the optimiser never sees the average).

    Args:
        params: the trained parameters (the order is kept).
        ema: the decay ceiling, in (0, 1).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], ema: float) -> None:
        self.params = list(params)
        self.ema = float(ema)
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, t: int) -> float:
        """Fold the current weights in after optimiser step ``t``; returns the decay used."""
        d = ema_decay(self.ema, t)
        for a, p in zip(self.average, self.params, strict=True):
            a.mul_(d).add_(p.detach(), alpha=1.0 - d)
        return d

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The parameters hold the average inside the block, the trained weights after it."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, trained, strict=True):
                    p.copy_(w)


def weights_record(keep: str, ema: float) -> dict[str, Any]:
    """metadata.json ``"weights"``: which weights the adapter holds."""
    what = (
        f"exponential moving average of the trained weights (decay min({ema:g}, (1+t)/(10+t)))"
        if ema
        else "the trained weights"
    )
    when = "the best held-back validation" if keep == "best" else "the last step"
    return {"keep": keep, "ema": ema, "description": f"{what} at {when}"}
