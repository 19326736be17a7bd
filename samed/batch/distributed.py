"""``samed segment --ray``: the cases of a batch on a Ray cluster, one model per worker.

The driver (the process running ``samed segment``) plans every case exactly as a local run
(:meth:`samed.batch.run.Batch.plan`: finished cases are skipped, other settings refused), then
hands the rest to a pool of Ray actors, at most one case per actor at a time. Each actor holds
one model (loaded once: the bundled kind, or the driver's model object for a built one), runs
:func:`samed.batch.segment.attempt_case` into a temporary folder of its own machine and returns
the row and the case's files as bytes. The driver writes them into a temporary case folder,
uploads (``--upload``), writes ``case.json`` and swaps the folder in, and rewrites the summary
after every case, in input order: the same folder, summary, resume and error isolation as a
local run, and the same outputs voxel for voxel (the same code on the same bytes).

A worker that dies mid-case (killed, out of memory, machine lost) is restarted by Ray and the
case is retried on it (``max_restarts``/``max_task_retries`` = :data:`RETRIES`); nothing of the
dead attempt reaches the output folder, because only a returned result is written. A case
whose retries are exhausted is an error row. Inputs must be readable by the workers (a shared
file system for local files; DICOMweb series are retrieved by the worker itself).

Workers: ``ray_workers`` or one per GPU of the cluster (each actor asks for 1 GPU), else one per
:data:`CPUS_PER_WORKER` CPUs (each actor asks for that many CPUs). On the CPU every worker uses
the driver's torch thread count: a float sum split over another number of threads rounds
differently (measured: 6 of 49,288 voxels of a tiny model's label map differ between 1 and 2
threads), and the outputs must equal a local run's voxel for voxel.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["RETRIES", "CPUS_PER_WORKER", "run_on_ray", "worker_pids"]

#: Restarts of a dead worker and retries of its case.
RETRIES = 3
#: CPUs each CPU-only worker asks for (and torch threads it uses).
CPUS_PER_WORKER = 1
_PIDS: list[int] = []


def worker_pids() -> list[int]:
    """Process ids of the workers of the running (or last) Ray batch, as they started."""
    return list(_PIDS)


class _CaseWorker:
    """One Ray actor: a model, and cases run with it."""

    def __init__(self, model: Any, spec: tuple[Any, ...], threads: int) -> None:
        import torch

        from ..model import load_model
        from .segment import _OomFallbackModel

        if threads > 0:
            torch.set_num_threads(threads)
        if model is None:
            kind, checkpoint, adapter_path, device, backend, precision = spec
            model = load_model(
                kind,
                checkpoint,
                adapter=adapter_path,
                device=device,
                backend=backend,
                precision=precision,
            )
        self.model = _OomFallbackModel(model)

    def pid(self) -> int:
        return os.getpid()

    def run(self, job: Any, case: Any) -> tuple[str, Any, dict[str, bytes], bool]:
        """Run one case; ``("row", row, files, raised)`` or ``("skipped", SkippedSeries, {}, False)``."""
        from dataclasses import replace

        from ..paths import TMP_PREFIX
        from .segment import attempt_case
        from .series import SkippedSeries

        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}ray-"))
        try:
            got, raised = attempt_case(replace(job, model=self.model), case, tmp, _ignore)
            if isinstance(got, SkippedSeries):
                return "skipped", got, {}, False
            files = {}
            if got.status == "ok":
                files = {p.name: p.read_bytes() for p in tmp.iterdir() if p.is_file()}
            return "row", got, files, raised
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _connect(address: str | None) -> bool:
    """Connect to (or start) a cluster; True when this call started Ray in this process."""
    import ray

    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        ray.init(include_dashboard=False, log_to_driver=False)
    elif address == "auto" or address.startswith("ray://") or ":" in address:
        ray.init(address=address, log_to_driver=False)
    else:
        raise ValueError(f"--ray {address!r}: use auto, ray://HOST:PORT, HOST:PORT or no address")
    return True


def run_on_ray(
    batch: Any,
    address: str | None,
    workers: int | None,
    model: Any,
    spec: tuple[Any, ...],
) -> None:
    """Run ``batch`` (a :class:`samed.batch.run.Batch`) on Ray; rows go into its summary.

    Args:
        batch: the planned batch.
        address: ``"local"``/None (start a local cluster unless Ray is already initialised in
            this process), ``"auto"``, ``"ray://host:port"`` or ``"host:port"``.
        workers: number of actors (None: one per GPU, else one per :data:`CPUS_PER_WORKER`
            CPUs of the cluster); never more than the cases to run.
        model: a built model to ship to the workers, or None to load ``spec`` there.
        spec: ``(kind, checkpoint, adapter path, device, backend, precision)`` (the
            :func:`samed.model.load_model` arguments) for workers that load their model.

    Raises:
        ValueError: a bad address or worker count.
    """
    import ray
    from ray.exceptions import RayError

    from .outputs import new_case_folder
    from .summary import CaseResult

    if workers is not None and int(workers) < 1:
        raise ValueError(f"ray_workers={workers} must be >= 1")
    started = _connect(address)
    actors: list[Any] = []
    try:
        todo = []
        for i in range(len(batch.cases)):
            row = batch.plan(i)
            if row is None:
                todo.append(i)
            else:
                batch.emit(i, "start")
                batch.record(i, row)
        if not todo:
            return
        import torch

        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        # the driver's intra-op thread count: float sums (and so a few voxels) depend on it
        threads = torch.get_num_threads()
        if gpus:
            n, opts = gpus, {"num_gpus": 1, "num_cpus": 1}
        else:
            n = max(1, int(res.get("CPU", 1)) // CPUS_PER_WORKER)
            opts = {"num_cpus": CPUS_PER_WORKER}
        n = min(int(workers) if workers is not None else n, len(todo))
        remote = ray.remote(max_restarts=RETRIES, max_task_retries=RETRIES)(_CaseWorker)
        model_ref = ray.put(model) if model is not None else None
        actors = [remote.options(**opts).remote(model_ref, spec, threads) for _ in range(n)]
        _PIDS[:] = ray.get([a.pid.remote() for a in actors])
        job_ref = ray.put(batch.job.without_model())
        idle = list(actors)
        flying: dict[Any, tuple[int, Any, float]] = {}
        while todo or flying:
            while todo and idle:
                i, actor = todo.pop(0), idle.pop(0)
                batch.emit(i, "start")
                flying[actor.run.remote(job_ref, batch.cases[i])] = (i, actor, time.perf_counter())
            done, _ = ray.wait(list(flying), num_returns=1)
            i, actor, t0 = flying.pop(done[0])
            idle.append(actor)
            case = batch.cases[i]
            try:
                kind, got, files, raised = ray.get(done[0])
            except RayError as exc:  # the worker died RETRIES + 1 times on this case
                kind, files, raised = "row", {}, True
                got = CaseResult(
                    case=case.case_id,
                    source=str(case.path),
                    status="error",
                    mode=batch.job.mode,
                    error=f"the Ray worker died on this case {RETRIES + 1} times: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                    error_kind="case",
                )
            if kind == "skipped":
                batch.pending.pop(i, None)
                batch.record(i, got)
                continue
            tmp = new_case_folder(batch.out, case.case_id)
            try:
                for name, data in files.items():
                    (tmp / name).write_bytes(data)
                row = batch.finish(i, got, tmp, raised)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            row.seconds = round(time.perf_counter() - t0, 3)
            batch.record(i, row)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        if started:
            ray.shutdown()
