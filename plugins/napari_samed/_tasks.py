"""Long tasks of the samed widget, run in thread workers: embedding, propagation, automatic.

Each task is a generator job run by a superqt worker; it yields progress to the GUI thread, checks
a stop flag after every step (so *Stop* keeps what was computed) and returns its result or the
exception it met, which the widget shows as a notification.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from superqt.utils import create_worker

from samed.postprocess import apply_postprocessing

__all__ = ["TaskMixin"]


def _guarded(fn: Callable) -> Callable:
    """Run a slot; show any exception as a napari error notification instead of raising."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every error goes to a notification
            self._error(exc)
            return None

    return wrapper


class TaskMixin:
    """Methods of :class:`napari_samed._widget.SamedWidget` that run in workers (mixed in)."""

    def _start(
        self,
        task: str,
        job: Callable[[], Iterator[Any]],
        on_yield: Callable,
        on_done: Callable[[Any], None],
    ) -> None:
        if self.busy:
            raise RuntimeError(f"busy with {self._task}; press Stop (Shift-X) first")
        self._stop.clear()
        self._task = task
        worker = create_worker(_catching_gen(job))
        self._worker = worker
        worker.yielded.connect(on_yield)

        def returned(result: Any) -> None:
            try:
                if isinstance(result, BaseException):
                    self._error(result)
                else:
                    on_done(result)
            finally:
                self._worker, self._task = None, ""
                self.ui.progress.setVisible(False)
                self._update_buttons()
                if self._dirty:
                    self._dirty = False
                    self.update_prompts()
                then, self._then = self._then, None
                if then is not None:
                    then()

        worker.returned.connect(returned)
        self.ui.progress.setVisible(True)
        self.ui.progress.setValue(0)
        self._update_buttons()
        worker.start()

    def _progress(self, done: int, total: int, text: str) -> None:
        self.ui.progress.setMaximum(max(total, 1))
        self.ui.progress.setValue(done)
        self._status(text)

    @_guarded
    def stop(self) -> None:
        """Stop the running task after its current step (embedding keeps what it computed)."""
        if self.busy:
            self._stop.set()
            self._status(f"stopping {self._task} ...")

    @_guarded
    def embed(self) -> None:
        """Embed every slice in a worker, nearest to the current slice first."""
        ann = self._ensure()
        engine = ann.engine
        z0 = self._current_z()
        order = sorted(range(engine.shape[0]), key=lambda k: (abs(k - z0), k))
        stop = self._stop
        t0 = time.perf_counter()

        def job() -> Iterator[Any]:
            it = engine.embed_iter(order)
            try:
                for done, total in it:
                    yield done, total
                    if stop.is_set():
                        break
            finally:
                it.close()
            if stop.is_set() and engine.cache_dir is not None:
                engine.save_cache()

        def on_yield(v: tuple[int, int]) -> None:
            self._progress(v[0], v[1], f"embedding {v[0]}/{v[1]} slices")

        def on_done(_: Any) -> None:
            self.timings["embed_s"] = time.perf_counter() - t0
            self._status(f"embeddings ready ({self.timings['embed_s']:.1f} s)")

        self._start("embed", job, on_yield, on_done)

    @_guarded
    def propagate(self) -> None:
        """Propagate the current object through the volume (direction from the combo box)."""
        ann = self._ensure()
        if not self._require_idle(self.propagate):
            return
        seed = ann.seed_slice(self._current_z())
        if seed is None:
            raise ValueError("nothing to propagate: place a box or points on a slice first")
        engine = ann.engine
        direction = self.ui.direction_combo.currentText()
        opts = dict(self.propagate_options)
        stop = self._stop
        t0 = time.perf_counter()

        def job() -> Iterator[Any]:
            # The engine saves its disk cache after every look-ahead batch; save once instead.
            saved, engine.cache_dir = engine.cache_dir, None
            it = ann.propagate_iter(seed, direction, **opts)
            try:
                for step in it:
                    yield step
                    if stop.is_set():
                        break
            finally:
                it.close()
                engine.cache_dir = saved
            if saved is not None:
                engine.save_cache()

        def on_yield(step: Any) -> None:
            self._show_mask(step.z, None if step.stopped else step.mask)
            self._progress(step.done, step.total, f"propagating: slice {step.z}")

        def on_done(_: Any) -> None:
            self.timings["propagate_s"] = time.perf_counter() - t0
            self._sync_layers()
            n = sum(1 for m in ann.masks.values() if m.any())
            self._status(f"object on {n} slices ({self.timings['propagate_s']:.1f} s)")

        self._start("propagate", job, on_yield, on_done)

    @_guarded
    def automatic(self) -> None:
        """Fill all classes with the chosen automatic adapter (one undoable step)."""
        ann = self._ensure()
        if not self._require_idle(self.automatic):
            return
        engine = ann.engine
        adapter = engine.model.adapter
        if adapter is None or adapter.mode != "automatic":
            raise ValueError("automatic mode needs an automatic adapter: choose one under Adapter")
        preserve = self.ui.preserve_check.isChecked()
        stop = self._stop
        names = self.ui.adapter_labels()

        def job() -> Iterator[Any]:
            out = np.zeros(engine.shape, dtype=np.int32)
            for z, lab, done, total in engine.automatic_iter():
                out[z] = lab
                yield done, total
                if stop.is_set():
                    return None
            # the clean-up the adapter recommends (e.g. largest 3D component per class)
            return apply_postprocessing(out, "adapter", engine.model)

        def on_yield(v: tuple[int, int]) -> None:
            self._progress(v[0], v[1], f"automatic {v[0]}/{v[1]} slices")

        def on_done(result: Any) -> None:
            if result is None:
                self._status("automatic stopped; labels unchanged")
                return
            ann.fill(result, preserve=preserve, description="automatic")
            if names:
                self._labels.metadata["samed_label_names"] = names
            self._labels.refresh()
            self._status("automatic segmentation written")

        self._start("automatic", job, on_yield, on_done)

    def _require_idle(self, then: Callable[[], Any]) -> bool:
        """True when no task runs. A running embedding is stopped first (it competes for the
        CPU) and ``then`` runs when it has stopped; any other task must be stopped by the user."""
        if not self.busy:
            return True
        if self._task != "embed":
            raise RuntimeError(f"busy with {self._task}; press Stop (Shift-X) first")
        self._stop.set()
        self._then = then
        self._status("pausing the embedding ...")
        return False


def _catching(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap a function for a worker: exceptions are returned (shown by the GUI thread)."""

    def run() -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            return exc

    return run


def _catching_gen(job: Callable[[], Iterator[Any]]) -> Callable[[], Iterator[Any]]:
    """Wrap a generator job for a worker: its return value or its exception is returned."""

    def run() -> Iterator[Any]:
        try:
            return (yield from job())
        except Exception as exc:  # noqa: BLE001
            return exc

    return run
