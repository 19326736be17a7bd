"""A real Orthanc PACS (Debian packages ``orthanc`` + ``orthanc-dicomweb``) for the DICOMweb
tests, isolated in its own network namespace.

Orthanc 1.10 cannot bind to one address (it listens on 0.0.0.0), so it runs under
``unshare --net`` with only ``lo`` up: nothing outside can reach it. The test process reaches it
by moving its *calling thread* into that namespace with ``setns(2)`` (:func:`inside`) for the
duration of a test, and back afterwards (network namespaces are per thread). Needs root (or
CAP_SYS_ADMIN); :func:`unavailable` says why not when it cannot run.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ORTHANC = "/usr/sbin/Orthanc"
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
_CLONE_NEWNET = 0x40000000
USER, PASSWORD = "samed", "pacs-test-secret-3141"


def unavailable() -> str:
    """Why a namespaced Orthanc cannot run here ("" when it can)."""
    for exe in (ORTHANC, PLUGIN):
        if not Path(exe).exists():
            return f"{exe} is missing (apt-get install orthanc orthanc-dicomweb)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (util-linux / iproute2)"
    if os.geteuid() != 0:
        return "entering a network namespace needs root (setns(2) with CAP_SYS_ADMIN)"
    return ""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


@dataclass
class Orthanc:
    """A running Orthanc; ``url`` is its DICOMweb root inside its namespace."""

    proc: subprocess.Popen
    ns_fd: int
    port: int
    folder: Path

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/dicom-web"

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        """Run the block with this thread in Orthanc's network namespace."""
        home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            _setns(self.ns_fd)
            yield
        finally:
            _setns(home)
            os.close(home)

    def upload(self, files: list[Path]) -> None:
        """POST each file to /instances (Orthanc's REST API); call inside()."""
        import requests

        for f in files:
            r = requests.post(
                f"{self.root}/instances", data=f.read_bytes(), auth=(USER, PASSWORD), timeout=30
            )
            r.raise_for_status()

    def stop(self) -> None:
        """Stop Orthanc by its pid (the namespace stays, held by ``ns_fd``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(folder: Path, port: int = 8042) -> Orthanc:
    """Start Orthanc (authentication on, DICOM port off, storage in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "samed-test",
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "DicomServerEnabled": False,
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            f"ip link set lo up && exec {ORTHANC} {folder}/orthanc.json",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    ns_fd = -1
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # the namespace exists once unshare has run; the shell then execs Orthanc
            ns = os.readlink(f"/proc/{proc.pid}/ns/net")
            if ns != os.readlink("/proc/self/ns/net"):
                ns_fd = os.open(f"/proc/{proc.pid}/ns/net", os.O_RDONLY)
                break
        except OSError:
            pass
        time.sleep(0.05)
    if ns_fd < 0:
        proc.kill()
        raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
    server = Orthanc(proc, ns_fd, port, folder)
    import requests

    with server.inside():
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{server.root}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return server
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer: {(folder / 'orthanc.log').read_text()[-2000:]}")
