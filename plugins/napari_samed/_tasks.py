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

    # ------------------------------------------------------------------ model
    @property
    def model_loading(self) -> bool:
        """Whether the model is being loaded in a worker."""
        return self._model_worker is not None

    def _model_ready(self, then: Callable[[], Any] | None = None) -> bool:
        """True when the model is loaded; otherwise start loading it in a worker (the GUI stays
        responsive) and run ``then`` when it is ready."""
        if self.session.model_loaded:
            return True
        if then is not None and then not in self._after_model:
            self._after_model.append(then)
        self.load_model()
        return False

    def load_model(self) -> None:
        """Load the chosen model (and adapter) in a worker; the state label says how it went."""
        if self.session.model_loaded or self._model_worker is not None:
            return
        session = self.session
        settings = session.settings
        what = settings.model_kind + (f" + {settings.adapter}" if settings.adapter else "")
        t0 = time.perf_counter()
        worker = create_worker(_catching(lambda: session.build_model(settings)))
        self._model_worker = worker
        self._model_state(f"loading {what} ...")
        self.ui.model_progress.setVisible(True)

        def done(result: Any) -> None:
            self._model_worker = None
            try:
                self.ui.model_progress.setVisible(False)
            except RuntimeError:  # the widget was closed while the model loaded: nothing to show
                return
            then, self._after_model = self._after_model, []
            if isinstance(result, BaseException):
                self._model_state(f"not loaded: {result}")
                if then:  # the user asked for something that needs the model
                    self._error(result)
                return
            if not session.set_model(settings, result):
                self._after_model = then
                self.load_model()  # the settings changed while loading: load the new choice
                return
            dev = getattr(result, "device", "cpu")
            self.timings["model_load_s"] = time.perf_counter() - t0
            from ._encoder_controls import encoder_name

            enc = encoder_name(result)
            on = f"{dev}, encoder {enc}" if enc else f"{dev}"
            self._model_state(f"ready: {what} on {on} ({self.timings['model_load_s']:.1f} s)")
            for fn in then:
                fn()

        worker.returned.connect(done)
        worker.start()

    def _model_state(self, text: str) -> None:
        self.ui.model_state.setText(f"Model: {text}")

    # ------------------------------------------------------------------ embedding
    @_guarded
    def embed(self) -> None:
        """Embed every slice in a worker, nearest to the current slice first.

        The worker embeds one slice per step on the CPU (a batch per step on a GPU), so *Stop*
        waits for one slice at most; a stopped run keeps the slices it embedded in memory (the
        disk cache is written by the next complete run or propagation)."""
        if not self._model_ready(self.embed):
            return
        ann = self._ensure()
        engine = ann.engine
        z0 = self._current_z()
        order = sorted(range(engine.shape[0]), key=lambda k: (abs(k - z0), k))
        order = [z for z in order if not engine.is_embedded(z)]
        gpu = str(getattr(engine.model, "device", "cpu")).startswith("cuda")
        step = engine.batch_size if gpu else 1
        stop = self._stop
        t0 = time.perf_counter()

        def job() -> Iterator[Any]:
            saved, engine.cache_dir = engine.cache_dir, None  # one save at the end, not per step
            try:
                yield 0, len(order)
                for i in range(0, len(order), step):
                    if stop.is_set():
                        return "stopped", i, len(order)
                    for _ in engine.embed_iter(order[i : i + step]):
                        pass
                    yield min(i + step, len(order)), len(order)
            finally:
                engine.cache_dir = saved
            if saved is not None and order:
                engine.save_cache()
            return "done", len(order), len(order)

        def on_yield(v: tuple[int, int]) -> None:
            self._progress(v[0], v[1], f"embedding {v[0]}/{v[1]} slices")

        def on_done(result: tuple[str, int, int]) -> None:
            what, n, total = result
            self.timings["embed_s"] = time.perf_counter() - t0
            if what == "stopped":
                self._status(f"embedding stopped: {n} of {total} slices embedded")
            else:
                self._status(f"embeddings ready ({self.timings['embed_s']:.1f} s)")

        self._start("embed", job, on_yield, on_done)

    # ------------------------------------------------------------------ propagation
    def slice_range(self) -> tuple[int, int] | None:
        """The (first, last) slice the object may reach (inclusive), or None for the whole
        volume (the widget's *Slices from / to* boxes)."""
        if not self.ui.range_check.isChecked():
            return None
        lo, hi = int(self.ui.range_from.value()), int(self.ui.range_to.value())
        return (min(lo, hi), max(lo, hi))

    @_guarded
    def propagate(self) -> None:
        """Propagate the current object through the volume (direction from the combo box),
        within the slice range when one is set."""
        if not self._model_ready(self.propagate):
            return
        ann = self._ensure()
        if not self._require_idle(self.propagate):
            return
        seed = ann.seed_slice(self._current_z())
        if seed is None:
            raise ValueError("nothing to propagate: place a box or points on a slice first")
        engine = ann.engine
        direction = self.ui.direction_combo.currentText()
        runs = _propagation_runs(seed, direction, self.slice_range(), engine.shape[0])
        opts = dict(self.propagate_options)
        stop = self._stop
        before = {z for z, m in ann.masks.items() if m.any()}
        t0 = time.perf_counter()

        def job() -> Iterator[Any]:
            # The engine saves its disk cache after every look-ahead batch; save once instead.
            saved, engine.cache_dir = engine.cache_dir, None
            recorded = 0
            try:
                for d, limit in runs:
                    it = ann.propagate_iter(seed, d, **opts, max_distance=limit)
                    try:
                        for step in it:
                            yield step
                            if stop.is_set():
                                break
                    finally:
                        it.close()  # records the run as one undoable step
                        recorded += 1
                    if stop.is_set():
                        break
            finally:
                engine.cache_dir = saved
            if saved is not None:
                engine.save_cache()
            return recorded

        def on_yield(step: Any) -> None:
            self._show_mask(step.z, None if step.stopped else step.mask)
            self._progress(step.done, step.total, f"propagating: slice {step.z}")

        def on_done(recorded: int) -> None:
            self.timings["propagate_s"] = time.perf_counter() - t0
            lost = before - {z for z, m in ann.masks.items() if m.any()}
            if self._stop.is_set() and lost:
                # a stopped run would drop slices an earlier propagation had filled: take it
                # back as a whole (Redo brings the partial result back)
                for _ in range(recorded):
                    ann.undo()
                self._sync_layers()
                self._status(
                    f"propagation stopped: the object is as before it ({len(before)} slices; "
                    "Redo shows the partial result)"
                )
                return
            self._sync_layers()
            n = sum(1 for m in ann.masks.values() if m.any())
            word = "stopped: " if self._stop.is_set() else ""
            self._status(f"{word}object on {n} slices ({self.timings['propagate_s']:.1f} s)")

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
            # the clean-up the adapter recommends (e.g. largest 3D component per class, kidneys
            # by the side of the midline: the volume's orientation says which side is right)
            return engine.postprocess(out, "adapter")

        def on_yield(v: tuple[int, int]) -> None:
            self._progress(v[0], v[1], f"automatic {v[0]}/{v[1]} slices")

        def on_done(result: Any) -> None:
            if result is None:
                self._status("automatic stopped; labels unchanged")
                return
            ann.fill(result, preserve=preserve, description="automatic")
            meta = self._labels.metadata
            if names:
                meta.setdefault("samed_label_names", {}).update(names)
            kinds = meta.setdefault("samed_label_algorithm", {})
            for v in np.unique(result):  # the adapter's classes, no person involved
                if v:
                    kinds[int(v)] = "AUTOMATIC"
            self.ui.label_table.show_layer(self._labels, int(self.ui.label_spin.value()))
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


def _propagation_runs(
    seed: int, direction: str, limits: tuple[int, int] | None, depth: int
) -> list[tuple[str, int | None]]:
    """(direction, max_distance) runs of one propagation: the direction as chosen without a slice
    range; with a range (first, last), one run per direction that stops at its end."""
    if direction not in ("both", "forward", "backward"):
        raise ValueError(f"direction {direction!r} must be 'both', 'forward' or 'backward'")
    if limits is None:
        return [(direction, None)]
    lo, hi = max(0, limits[0]), min(depth - 1, limits[1])
    if not lo <= seed <= hi:
        raise ValueError(
            f"the object's slice {seed} is outside the slice range {lo}-{hi}: widen the range "
            "or prompt a slice inside it"
        )
    runs: list[tuple[str, int | None]] = []
    if direction in ("both", "forward"):
        runs.append(("forward", hi - seed))
    if direction in ("both", "backward"):
        runs.append(("backward", seed - lo))
    return runs


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
