"""`samed segment` against a real PACS: Orthanc with its DICOMweb plugin, authentication on, in its
own network namespace (tests/batch/pacs_server.py). The TotalSegmentator CT series and a TCIA MR
study are uploaded; a batch retrieves them by WADO-RS, segments them with a tiny random model
and an automatic adapter, and stores the DICOM SEGs back by STOW-RS; the SEGs on the server
reference the right series and read back (highdicom) equal to a local run's label maps. A wrong
password, an unknown study, a timeout, a series that loses an instance mid-run and a stopped
server each give their documented error and exit code.
"""

from __future__ import annotations

import json
import socket

import numpy as np
import pacs_server as orthanc_mod
import pydicom
import pytest
from pydicom.uid import generate_uid
from realdata import shared_path

pytest.importorskip("dicomweb_client")

from samed.batch import segment_batch
from samed.batch.dicomweb import Credentials, DicomwebSource
from samed.cli import main
from samed.io import load_label_map, read_dicom_seg

BTP_STUDY = "04-02-1992-FH-HEADBrain Protocols-79896"
RULES = ["description=T1post|Body"]
GOOD = Credentials("basic", orthanc_mod.USER, orthanc_mod.PASSWORD, "test")

pytestmark = pytest.mark.skipif(
    bool(orthanc_mod.unavailable()), reason=orthanc_mod.unavailable() or "available"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, copy_slices) -> dict:
    """Local copies of what the PACS receives: the TotalSegmentator CT series (4 of its 20
    slices, with the UIDs its anonymised files lack) and the TCIA study's three series
    (4 slices each)."""
    root = tmp_path_factory.mktemp("pacs-data")
    ts = root / "ts" / "ct"
    copy_slices(shared_path("totalsegmentator", "dicom_ct", "example_ct_dicom"), ts, 4, start=8)
    study_uid = generate_uid(entropy_srcs=["samed test TS study"])
    series_uid = generate_uid(entropy_srcs=["samed test TS series"])
    for f in sorted(ts.iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
            "TS-EXAMPLE",
            study_uid,
            series_uid,
        )
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["samed test TS", f.name])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    btp = root / "btp" / BTP_STUDY
    src = shared_path("tcia_btp", "PGBM-001", BTP_STUDY)
    for sub in ("11-T1post-80644", "35623-FLAIRreg-79237", "5388-MaskTumor-63335"):
        copy_slices(src / sub, btp / sub, 4, start=10)
    t1 = pydicom.dcmread(next((btp / "11-T1post-80644").iterdir()), stop_before_pixels=True)
    return {
        "ts": ts,
        "ts_study": study_uid,
        "ts_series": series_uid,
        "btp": btp,
        "btp_t1": btp / "11-T1post-80644",
        "btp_study": str(t1.StudyInstanceUID),
        "btp_series": str(t1.SeriesInstanceUID),
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, data):
    srv = orthanc_mod.start(tmp_path_factory.mktemp("orthanc"))
    try:
        with srv.inside():
            srv.upload(sorted(p for p in data["ts"].iterdir()))
            srv.upload(sorted(p for p in data["btp"].rglob("*.dcm")))
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def pacs(server):
    """The server, with this test's thread inside its network namespace."""
    with server.inside():
        yield server


@pytest.fixture(scope="module")
def run_kwargs(tiny_automatic_adapter, make_tiny_model):
    def kwargs() -> dict:
        return dict(
            adapter=tiny_automatic_adapter,
            model=make_tiny_model("tinyvit", seed=2),
            series_filter=RULES,
            qc=False,
            batch_size=4,
        )

    return kwargs


@pytest.fixture(scope="module")
def local_run(data, run_kwargs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    res = segment_batch([data["ts"], data["btp_t1"]], out, **run_kwargs())
    assert [r.status for r in res.results] == ["ok", "ok"], res.results
    return out, res


def _source(pacs, **kw) -> DicomwebSource:
    kw.setdefault("credentials", GOOD)
    return DicomwebSource(pacs.url, timeout=kw.pop("timeout", 20), **kw)


def _segs_on_server(pacs, study: str) -> list[pydicom.Dataset]:
    client = _source(pacs, studies=(study,)).client()
    found = client.search_for_series(study, search_filters={"Modality": "SEG"})
    out = []
    for item in found:
        series = item["0020000E"]["Value"][0]
        for inst in client.search_for_instances(study, series):
            out.append(client.retrieve_instance(study, series, inst["00080018"]["Value"][0]))
    return out


def test_segment_by_dicomweb_with_upload_matches_the_local_run(
    pacs, data, local_run, run_kwargs, tmp_path
):
    import highdicom as hd

    local_out, local = local_run
    out = tmp_path / "web"
    source = _source(pacs, series=(data["ts_series"],), studies=(data["btp_study"],))
    res = segment_batch([], out, dicomweb=source, upload=True, **run_kwargs())
    assert [r.status for r in res.results] == ["ok", "ok"], [r.error for r in res.results]
    # the same case ids as the local run of the same files (PatientID, description, series UID)
    assert sorted(r.case for r in res.results) == sorted(r.case for r in local.results)
    skipped = {s.description: s.reason for s in res.skipped_series}
    assert set(skipped) == {"FLAIR_reg", "Mask_Tumor"} and "description=" in skipped["FLAIR_reg"]
    refs = {data["ts_series"]: data["ts"], data["btp_series"]: data["btp_t1"]}
    for row in res.results:
        web = load_label_map(out / row.case / "labels.nii.gz").array
        mine = load_label_map(local_out / row.case / "labels.nii.gz").array
        np.testing.assert_array_equal(web, mine)  # voxel for voxel
        assert row.uploaded and "dicomweb" not in row.error
    # the server holds one SEG per series, referencing it, equal to the local label map
    segs = _segs_on_server(pacs, data["ts_study"]) + _segs_on_server(pacs, data["btp_study"])
    assert len(segs) == 2
    for ds in segs:
        seg = hd.seg.Segmentation.from_dataset(ds)
        ref = str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        assert ref in refs
        row = next(r for r in res.results if r.uploaded == str(ds.SOPInstanceUID))
        path = tmp_path / f"{row.case}.dcm"
        ds.save_as(path)
        back = read_dicom_seg(path, refs[ref]).array
        want = load_label_map(local_out / row.case / "labels.nii.gz").array
        np.testing.assert_array_equal(back, want)
    # credentials are nowhere in what the run wrote
    for f in out.rglob("*.json"):
        assert orthanc_mod.PASSWORD not in f.read_text()
    # a rerun skips both from QIDO-RS alone and uploads nothing new
    again = segment_batch([], out, dicomweb=source, upload=True, **run_kwargs())
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    assert {r.uploaded for r in again.results} == {r.uploaded for r in res.results}
    assert len(_segs_on_server(pacs, data["ts_study"])) == 1


def test_wrong_password_is_an_auth_error_exit_5(
    pacs, data, run_kwargs, tmp_path, monkeypatch, capsys
):
    bad = Credentials("basic", orthanc_mod.USER, "wrong-password-2718", "test")
    res = segment_batch(
        [],
        tmp_path / "o",
        dicomweb=_source(pacs, studies=(data["btp_study"],), credentials=bad),
        **run_kwargs(),
    )
    assert [r.error_kind for r in res.results] == ["auth"] and res.exit_code == 5
    assert "HTTP 401" in res.results[0].error and "wrong-password" not in res.results[0].error
    # the CLI reads them from an environment variable; the exit code is 5, the secret not shown
    monkeypatch.setenv("SAMED_TEST_PACS", f"{orthanc_mod.USER}:wrong-password-2718")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"case": "x", "label": 1, "slice": 0, "box": [1, 1, 5, 5]}]))
    argv = [
        "segment",
        "-o",
        str(tmp_path / "cli"),
        "--dicomweb",
        pacs.url,
        "--study",
        data["btp_study"],
        "--auth-env",
        "SAMED_TEST_PACS",
        "--prompts",
        str(prompts),
        "--quiet",
    ]
    assert main(argv) == 5
    printed = capsys.readouterr()
    assert "401" in printed.out and "wrong-password" not in printed.out + printed.err
    assert "wrong-password" not in (tmp_path / "cli" / "summary.json").read_text()


def test_unknown_study_is_not_found_exit_3(pacs, data, run_kwargs, tmp_path):
    source = _source(pacs, studies=("1.2.3.4.5.6.7.8.9", data["btp_study"]))
    res = segment_batch([], tmp_path / "o", dicomweb=source, **run_kwargs())
    rows = {r.status: r for r in res.results}
    assert sorted(rows) == ["error", "ok"]  # the batch went on with the known study
    assert rows["error"].error_kind == "not-found" and "1.2.3.4.5.6.7.8.9" in rows["error"].error
    assert res.exit_code == 3
    assert not rows["ok"].uploaded
    # a later run with --upload stores the SEG of the case finished without it, once
    before = len(_segs_on_server(pacs, data["btp_study"]))
    source = _source(pacs, studies=(data["btp_study"],))
    for _ in range(2):
        again = segment_batch([], tmp_path / "o", dicomweb=source, upload=True, **run_kwargs())
        assert [r.status for r in again.results] == ["skipped"] and again.results[0].uploaded
    assert len(_segs_on_server(pacs, data["btp_study"])) == before + 1


def test_timeout_is_a_server_error_exit_4(pacs, run_kwargs, tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        source = DicomwebSource(f"http://127.0.0.1:{port}/dicom-web", studies=("1.2.3",), timeout=1)
        res = segment_batch([], tmp_path / "o", dicomweb=source, **run_kwargs())
    assert res.results[0].error_kind == "server" and "timeout" in res.results[0].error
    assert res.exit_code == 4


def test_half_retrieved_series_is_an_error_and_nothing_is_uploaded(
    pacs, data, run_kwargs, tmp_path
):
    import requests

    client = _source(pacs, studies=(data["btp_study"],)).client()
    flair = next(
        s["0020000E"]["Value"][0]
        for s in client.search_for_series(data["btp_study"])
        if s.get("0008103E", {}).get("Value") == ["FLAIR_reg"]
    )
    before = len(_segs_on_server(pacs, data["btp_study"]))

    def lose_an_instance(ev) -> None:  # after QIDO listed the series, before WADO retrieves it
        if ev.stage == "start":
            found = requests.post(
                f"{pacs.root}/tools/find",
                auth=(orthanc_mod.USER, orthanc_mod.PASSWORD),
                json={"Level": "Instance", "Query": {"SeriesInstanceUID": flair}},
                timeout=10,
            ).json()
            requests.delete(
                f"{pacs.root}/instances/{found[0]}",
                auth=(orthanc_mod.USER, orthanc_mod.PASSWORD),
                timeout=10,
            ).raise_for_status()

    kw = run_kwargs()
    kw["series_filter"] = ["description=FLAIR"]
    source = _source(pacs, series=(flair,))
    res = segment_batch(
        [], tmp_path / "o", dicomweb=source, upload=True, progress=lose_an_instance, **kw
    )
    row = res.results[0]
    assert row.status == "error" and row.error_kind == "server" and res.exit_code == 4
    assert "incomplete, got 3 of 4 instances" in row.error
    assert not (tmp_path / "o" / row.case).exists()
    assert len(_segs_on_server(pacs, data["btp_study"])) == before


def test_stopped_server_is_unreachable_exit_4(server, data, run_kwargs, tmp_path):
    server.stop()
    with server.inside():
        source = _source(server, studies=(data["btp_study"],))
        res = segment_batch([], tmp_path / "o", dicomweb=source, **run_kwargs())
    assert res.results[0].error_kind == "server" and res.exit_code == 4
    assert "cannot reach" in res.results[0].error and "server down" in res.results[0].error
