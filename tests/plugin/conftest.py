"""Plugin test set-up: GUI tests need napari, a Qt binding and an X display.

Run them under Xvfb with the xcb platform (``QT_QPA_PLATFORM=offscreen`` cannot create the
OpenGL context vispy needs): either pytest-xvfb starts Xvfb itself (install the ``xvfb`` apt
package), or wrap pytest in ``xvfb-run -a -s "-screen 0 1600x1200x24"``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# napari's settings (the plugin writes reader preferences into them) go to a throwaway file, never
# the user's; must be set before napari.settings is imported.
if "NAPARI_CONFIG" not in os.environ:
    _settings_dir = tempfile.mkdtemp(prefix="samed-napari-")
    atexit.register(shutil.rmtree, _settings_dir, ignore_errors=True)  # ours: made just above
    os.environ["NAPARI_CONFIG"] = os.path.join(_settings_dir, "settings.yaml")
# Must be set before the first QApplication exists; offscreen cannot render napari canvases.
if os.environ.get("QT_QPA_PLATFORM", "") in ("", "offscreen"):
    os.environ["QT_QPA_PLATFORM"] = "xcb"


def _gui_unavailable() -> str:
    for mod in ("napari", "qtpy", "npe2", "pytestqt"):
        try:
            __import__(mod)
        except Exception as exc:  # noqa: BLE001 - any import failure means no GUI stack
            return f"{mod} is not importable ({exc}); install samed[napari,dev]"
    try:
        import qtpy  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"no Qt binding ({exc})"
    if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        return "no display: run under Xvfb (apt install xvfb; pytest-xvfb starts it) or xvfb-run"
    return ""


@pytest.fixture
def gui_ready() -> None:
    """Skip with the reason when napari, Qt or a display is missing."""
    reason = _gui_unavailable()
    if reason:
        pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gui_unavailable()
    if not reason:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gui" in item.keywords:
            item.add_marker(skip)


class BoxModel:
    """A stand-in for :class:`samed.model.SamModel` whose mask is exactly the prompt box (plus a
    3 px disc per positive point, minus one per negative point), so widget tests can check
    geometry end to end: napari layer coordinates -> engine (x = column, y = row) -> preview."""

    image_size = 256
    low_res_size = 256
    kind = "box-fake"
    checkpoint_sha256 = "box-fake"
    adapter_digest = ""
    adapter = None  # SamModel.adapter: no adapter attached
    fast_decoder = False  # its decode takes no image_state
    num_mask_outputs = 1  # one multimask output, the same as the single one

    def __init__(self, encode_seconds: float = 0.02) -> None:
        import torch

        self.device = torch.device("cpu")
        self.encode_seconds = encode_seconds
        self.encoded = 0

    def encode(self, images):
        import time

        import torch

        time.sleep(self.encode_seconds * images.shape[0])  # observable worker progress
        self.encoded += images.shape[0]
        return torch.zeros(images.shape[0], 1, 4, 4)

    def decode(
        self,
        emb,
        boxes=None,
        points=None,
        mask_inputs=None,
        multimask_output=False,
        all_outputs=False,
    ):
        import torch

        n = self.low_res_size
        logits = torch.full((1, 1, n, n), -10.0)
        if boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in boxes.reshape(-1)[:4])
            logits[..., round(y0) : round(y1) + 1, round(x0) : round(x1) + 1] = 10.0
        if points is not None:
            yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
            for (x, y), lab in zip(points[0][0].tolist(), points[1][0].tolist(), strict=True):
                if lab < 0:
                    continue
                disc = (xx - x) ** 2 + (yy - y) ** 2 <= 12.0**2
                logits[0, 0][disc] = 10.0 if lab == 1 else -10.0
        if all_outputs:  # SamModel.decode(all_outputs=True): the single, then each multimask
            return logits.expand(1, 2, n, n).clone(), torch.ones(1, 2)
        return logits, torch.ones(1, 1)


@pytest.fixture
def box_model_session(tmp_path):
    """A :class:`napari_samed._session.PluginSession` whose model is a :class:`BoxModel`."""
    from napari_samed._session import PluginSession

    model = BoxModel()
    session = PluginSession(model_factory=lambda settings: model, cache_dir=None)
    session.fake_model = model
    return session
