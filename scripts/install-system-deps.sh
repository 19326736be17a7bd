#!/usr/bin/env bash
# System packages for the napari plugin's GUI tests: a virtual X server (Xvfb) and the
# OpenGL / xcb libraries Qt and vispy need; and for the DICOMweb tests a real PACS, Orthanc with
# its DICOMweb plugin (tests/batch/pacs_server.py runs it in its own network namespace, so it
# also needs unshare and ip: util-linux, iproute2). Debian/Ubuntu; needs root (or sudo).
# Without them the GUI / DICOMweb tests skip with a reason; the rest of the suite does not.
set -euo pipefail
PKGS="xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libgl1 libegl1 libgl1-mesa-dri
libxkbcommon-x11-0 libdbus-1-3 libxcb-cursor0 libfontconfig1 libglib2.0-0 libxcb-image0
libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xfixes0
orthanc orthanc-dicomweb iproute2 util-linux"
missing=$(dpkg-query -W -f='${Package} ${Status}\n' $PKGS 2>/dev/null | grep -vc "install ok installed" || true)
if command -v Xvfb >/dev/null 2>&1 && [ "$missing" = "0" ]; then
  echo "system packages for GUI and DICOMweb tests: already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "not root and no sudo: skipping system packages (GUI and DICOMweb tests will skip)" >&2; exit 0; fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $PKGS >/dev/null
# the package may start an Orthanc service on port 8042; the tests run their own, isolated one
echo "system packages for GUI and DICOMweb tests: installed"
