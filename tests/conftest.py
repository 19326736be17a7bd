"""Shared fixtures: the real data folder beside the checkout, tiny random models and tiny
synthetic volumes.

Fixtures defined here are visible in every test folder (``tests/plugin/conftest.py`` adds the
GUI ones). Heavy packages (torch, nibabel) are imported inside the fixtures, so a test that uses
none of them (the start-up checks, ``samed.annotation``'s pure-Python tests) loads none.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdata import SHARED_DATA, shared_path  # noqa: E402

if TYPE_CHECKING:
    from samed.io import Volume
    from samed.model import SamModel

__all__ = ["SHARED_DATA", "shared_path"]


@pytest.fixture
def shared_data() -> Path:
    """The ../shared/data folder (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


# ---------------------------------------------------------------- tiny random models
_BUILT: dict[tuple[str, int], tuple[Any, Any]] = {}


def _tiny_model(family: str = "tinyvit", seed: int = 0, device: str = "cpu") -> SamModel:
    """What :func:`samed.model.build_tiny_model` returns for these arguments, as a new,
    independent model on every call.

    On the CPU the first build per ``(family, seed)`` is kept and later calls get a deep copy
    of it (a TinyViT build costs ~0.4 s, a copy milliseconds). The copy has the same weights,
    buffers and attributes, and the global torch random state is left exactly where a fresh
    build leaves it (``build_tiny_model`` seeds it with ``seed``), so a test that draws random
    inputs after building its model draws the same numbers either way. Other devices build.
    """
    import torch

    from samed.model import build_tiny_model

    if device != "cpu":
        return build_tiny_model(family, seed=seed, device=device)
    key = (family, seed)
    if key not in _BUILT:
        model = build_tiny_model(family, seed=seed, device="cpu")
        _BUILT[key] = (copy.deepcopy(model), torch.get_rng_state())
        return model
    template, rng_state = _BUILT[key]
    torch.manual_seed(seed)  # as build_tiny_model does (all devices), then its draws on the CPU
    torch.set_rng_state(rng_state)
    return copy.deepcopy(template)


@pytest.fixture(scope="session")
def make_tiny_model() -> Callable[..., SamModel]:
    """Factory ``make_tiny_model(family="tinyvit", seed=0, device="cpu")`` with the arguments of
    :func:`samed.model.build_tiny_model`: each call returns a new model that the test may change
    (apply LoRA, load an adapter, patch ``encode``). ``"tinyvit"`` is LiteMedSAM-shaped (64x64
    embeddings, 256x256 low-res masks); ``"vit"`` a 2-block SAM ViT (16x16, 64x64). Use it for
    a second independent model, another family or seed, or in module-scoped fixtures."""
    return _tiny_model


@pytest.fixture
def tiny_model(make_tiny_model: Callable[..., SamModel]) -> SamModel:
    """A fresh tiny random TinyViT model (``build_tiny_model("tinyvit", seed=0)``, CPU, eval
    mode) for this test alone."""
    return make_tiny_model("tinyvit")


# ---------------------------------------------------------------- tiny synthetic volumes
def _tiny_volume(z: int = 3, y: int = 60, x: int = 80, seed: int = 0, modality: str = "") -> Volume:
    """A ``(z, y, x)`` float32 :class:`samed.io.Volume`: N(0, 1) noise with a bright block (+5)
    at rows 20:40, columns 30:60 (clipped to the grid), 1 mm voxels (identity affine)."""
    import numpy as np

    from samed.io import Volume

    rng = np.random.default_rng(seed)
    v = rng.normal(0, 1, (z, y, x)).astype(np.float32)
    v[:, 20:40, 30:60] += 5
    return Volume(v, np.eye(4), modality=modality)


@pytest.fixture(scope="session")
def make_tiny_volume() -> Callable[..., Volume]:
    """Factory ``make_tiny_volume(z=3, y=60, x=80, seed=0, modality="")``: a new small synthetic
    :class:`samed.io.Volume` per call (see :func:`_tiny_volume` for its content)."""
    return _tiny_volume


@pytest.fixture
def tiny_volume(make_tiny_volume: Callable[..., Volume]) -> Volume:
    """A 3 x 60 x 80 synthetic volume (noise plus a bright block), no modality, identity affine."""
    return make_tiny_volume()


@pytest.fixture(autouse=True)
def _isolated_user_adapters(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test sees an empty user adapter folder (``$SAMED_ADAPTER_DIR``,
    :func:`samed.registry.user_adapter_dir`), never the real ``~/.local/share/samed/adapters``."""
    d = tmp_path_factory.mktemp("user-adapters")
    monkeypatch.setenv("SAMED_ADAPTER_DIR", str(d))
    return d
