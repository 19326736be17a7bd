"""`samed segment --ray` on a real local Ray cluster (2 CPUs, one for the whole module: Ray
starts slowly on 2 cores): 3 small CT cases and a broken file, with a tiny random model and an
automatic adapter. The outputs equal a local run's voxel for voxel, the broken case is reported,
a worker killed mid-run (the test kills its process) is restarted and its case retried, the
summary is complete, and a re-run skips the finished cases."""

from __future__ import annotations

import argparse
import json
import os
import signal

import nibabel as nib
import numpy as np
import pytest
from realdata import shared_path

from samed.batch import add_parser, segment_batch

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-in")
    ct = nib.load(shared_path("totalsegmentator", "ct_3mm", "example_ct_sm.nii.gz"))
    paths = []
    for k, z0 in enumerate((4, 12, 20)):
        data = np.asarray(ct.dataobj)[:, :, z0 : z0 + 4]
        affine = ct.affine.copy()
        affine[:3, 3] = (ct.affine @ [0, 0, z0, 1])[:3]
        p = root / f"ct_{k}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), p)
        paths.append(p)
    broken = root / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not a NIfTI file" * 10)
    return [*paths, broken]


@pytest.fixture(scope="module")
def kwargs(tiny_automatic_adapter, make_tiny_model):
    def make() -> dict:
        return dict(
            adapter=tiny_automatic_adapter,
            model=make_tiny_model("tinyvit", seed=2),
            batch_size=2,
        )

    return make


def _arrays(folder):
    return {
        p.parent.name: np.asarray(nib.load(p).dataobj)
        for p in sorted(folder.glob("*/labels.nii.gz"))
    }


def test_ray_run_equals_local_survives_a_killed_worker_and_resumes(
    cluster, inputs, kwargs, tmp_path
):
    from samed.batch.distributed import worker_pids

    local = segment_batch(inputs, tmp_path / "local", **kwargs())
    assert [r.status for r in local.results] == ["ok", "ok", "ok", "error"]
    killed: list[int] = []

    def kill_a_worker(ev) -> None:  # the first case was just handed to a worker: kill it
        if ev.stage == "start" and not killed and worker_pids():
            killed.append(worker_pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    res = segment_batch(inputs, tmp_path / "ray", ray="local", progress=kill_a_worker, **kwargs())
    assert killed and len(worker_pids()) == 2
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # that worker is gone: its case ran again on a restarted one
    assert [r.case for r in res.results] == [r.case for r in local.results]  # complete, in order
    assert [r.status for r in res.results] == ["ok", "ok", "ok", "error"]
    assert "broken" in res.results[3].case and res.results[3].error
    assert res.exit_code == 1
    want, got = _arrays(tmp_path / "local"), _arrays(tmp_path / "ray")
    assert sorted(got) == sorted(want) == ["ct_0", "ct_1", "ct_2"]
    for case in want:
        np.testing.assert_array_equal(got[case], want[case])  # voxel for voxel
    for r_local, r_ray in zip(local.results[:3], res.results[:3], strict=True):
        assert r_ray.volumes_ml == r_local.volumes_ml
    # nothing partial anywhere: only case folders and the summary
    names = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert names == ["ct_0", "ct_1", "ct_2", "summary.csv", "summary.json"]
    data = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert data["counts"] == {"ok": 3, "skipped": 0, "error": 1}
    # a re-run skips the finished cases and reports the broken one again
    again = segment_batch(inputs, tmp_path / "ray", ray="local", **kwargs())
    assert [r.status for r in again.results] == ["skipped", "skipped", "skipped", "error"]


def test_cli_ray_option():
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    assert p.parse_args(["segment", "x", "-o", "o", "--ray"]).ray == "local"
    assert p.parse_args(["segment", "x", "-o", "o", "--ray", "auto"]).ray == "auto"
    assert p.parse_args(["segment", "x", "-o", "o"]).ray is None
