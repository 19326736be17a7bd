"""DICOMweb options without a server: credentials from a variable or a file (never shown),
the source's checks and ``--query`` parsing."""

from __future__ import annotations

import pytest

from samed.batch.dicomweb import DicomwebSource, parse_query, read_credentials


def test_credentials_from_a_file_or_variable(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("Bearer abc.def\n")
    cred = read_credentials(file=f)
    assert cred.kind == "bearer" and cred.secret == "abc.def" and "abc" not in repr(cred)
    monkeypatch.setenv("PACS_AUTH", "me:pw:with:colons")
    assert read_credentials(env="PACS_AUTH").secret == "pw:with:colons"
    monkeypatch.setenv("PACS_AUTH", "no-colon")
    with pytest.raises(ValueError, match="neither USER:PASSWORD") as exc:
        read_credentials(env="PACS_AUTH")
    assert "no-colon" not in str(exc.value)
    with pytest.raises(ValueError, match="not in the url"):
        DicomwebSource("http://u:p@host/dicom-web", studies=("1",))
    assert DicomwebSource("https://h/dicom-web", studies=("1",)).verify is True


def test_query_items():
    got = parse_query(["modality=CT", "date=20260101-20260131", "patient=X", "StudyTime=10"])
    assert got == (
        ("Modality", "CT"),
        ("StudyDate", "20260101-20260131"),
        ("PatientID", "X"),
        ("StudyTime", "10"),
    )
    for bad, message in (
        ("date=2026", "use YYYYMMDD"),
        ("date=-", "use YYYYMMDD"),
        ("colour=red", "nor a DICOM keyword"),
        ("modality", "expected KEY=VALUE"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_query([bad])
    with pytest.raises(ValueError, match="refusing to take the whole archive"):
        DicomwebSource("http://pacs/dicom-web")
    with pytest.raises(ValueError, match="must start with http"):
        DicomwebSource("pacs/dicom-web", studies=("1",))
