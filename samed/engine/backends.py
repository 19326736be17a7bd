"""Image-encoder backends on the CPU: torch fp32 / bf16 autocast / mixed (bf16 autocast with the
convolutions in fp32), OpenVINO fp32 / bf16 / int8.

On a CPU the image encoder is nearly all of the time of a batch run, and the fastest way to run
it depends on the CPU: bf16 is fast where the CPU has native bf16 (AVX512-BF16, AMX) and ~40x
slower where it has not (AVX2); OpenVINO runs the same network with its own kernels, and NNCF
quantises it to int8 for VNNI/AMX. A *candidate* is one of :data:`CANDIDATES`; a model carries
the one chosen as ``model.encoder_backend`` (an :class:`EncoderBackend`), and
:meth:`samed.model.SamModel.encode` runs the encoder through it. The prompt encoder and the
mask decoder always stay in torch (the fast decoder).

:func:`set_encoder_backend` resolves a request (``backend`` ``auto|torch|openvino``,
``precision`` ``auto|fp32|bf16|int8|mixed``): a request that this machine cannot run (OpenVINO
not installed, bf16 on a CPU without native bf16, int8 without int8 instructions) falls back to
torch fp32 with a one-line notice on stderr; ``auto`` measures the candidates once per machine
and model (:mod:`samed.engine.backend_auto`) and picks the fastest one that meets the accuracy
bar, never one slower than torch fp32.

OpenVINO models (converted IR and NNCF int8 IR) are cached on disk under
:func:`backend_cache_dir`, keyed by a digest of the encoder's weights (so a merged LoRA adapter
is part of the key), written atomically. ``SAMED_NO_OPENVINO=1`` makes samed behave exactly as
if OpenVINO were not installed (the module is never imported).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..registry import BACKENDS, CPU_PRECISIONS

if TYPE_CHECKING:
    from ..model import SamModel

__all__ = [
    "BACKENDS",
    "CANDIDATES",
    "CPU_PRECISIONS",
    "EncoderBackend",
    "backend_cache_dir",
    "build_candidate",
    "cpu_features",
    "encoder_digest",
    "encoder_label",
    "native_bf16",
    "native_int8",
    "notice",
    "openvino_available",
    "set_encoder_backend",
]

# BACKENDS (``backend=`` of load_model, ``--backend`` of the CLIs) and CPU_PRECISIONS live in
# the torch-free samed.registry and are re-exported here
#: Every encoder candidate, ``<backend>-<precision>``.
CANDIDATES = (
    "torch-fp32",
    "torch-bf16",
    "torch-mixed",
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
)
_FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def notice(msg: str) -> None:
    """Print a one-line notice to stderr (``samed: <msg>``)."""
    print(f"samed: {msg}", file=sys.stderr, flush=True)


@lru_cache(maxsize=1)
def _proc_cpuinfo() -> tuple[str, frozenset[str]]:
    name, flags = "", frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return name, flags


def cpu_features() -> dict[str, Any]:
    """``{"model": CPU model name, "flags": [the flags of interest it has]}`` from
    /proc/cpuinfo (Linux); elsewhere the model from :func:`platform.processor` and no flags.

    ``SAMED_CPU_FLAGS`` (comma-separated, e.g. ``avx2,fma``) replaces the detected flags: to
    keep samed off an instruction set (or to test the AVX2 behaviour on a newer CPU)."""
    import platform

    name, flags = _proc_cpuinfo()
    env = os.environ.get("SAMED_CPU_FLAGS")
    if env is not None:
        flags = frozenset(f.strip() for f in env.split(",") if f.strip())
    if not name:
        name = platform.processor() or platform.machine()
    return {"model": name, "flags": [f for f in _FLAGS_OF_INTEREST if f in flags]}


def native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_features()["flags"]))


def native_int8() -> bool:
    """True when the CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX-INT8)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_features()["flags"]))


def openvino_available() -> bool:
    """True when OpenVINO (and NNCF, for int8) can be imported; always False when the
    environment variable ``SAMED_NO_OPENVINO=1`` is set (then samed never imports it)."""
    if os.environ.get("SAMED_NO_OPENVINO") == "1":
        return False
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def backend_cache_dir() -> Path:
    """Folder for converted encoders and ``auto`` choices: ``$SAMED_BACKEND_CACHE``, else
    ``$XDG_CACHE_HOME/samed/backends`` (default ``~/.cache/samed/backends``)."""
    env = os.environ.get("SAMED_BACKEND_CACHE")
    if env:
        return Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "samed" / "backends"


def encoder_digest(encoder: nn.Module) -> str:
    """SHA-256 (32 hex digits) of an encoder's weights and buffers (names, shapes, bytes): a
    merged adapter, Conv-BN folding or any other weight change gives another digest."""
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


@dataclass
class EncoderBackend:
    """How a model's image encoder runs (``model.encoder_backend``).

    Attributes:
        backend: ``"torch"`` or ``"openvino"``.
        precision: ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"mixed"`` (torch bf16 autocast with
            every convolution in fp32, :func:`_torch_mixed`).
        chosen_by: ``"request"`` (asked for), ``"auto"`` (measured) or ``"fallback"`` (the
            request could not run here; see ``note``).
        note: why this candidate (a fallback's reason, auto's measurement), or "".
        adapter_digest: the model's ``adapter_digest`` when the backend was built; if the
            model's adapter changes later (another digest or another adapter object, see
            :meth:`valid_for`), the model falls back to its torch encoder. Weights edited in
            place under the same adapter are not noticed: call :func:`set_encoder_backend`
            again after such an edit.
        run: (B, 3, S, S) normalised float32 -> (B, C, h, w) float32 embeddings; None for torch
            fp32 (the model's own encoder).
    """

    backend: str = "torch"
    precision: str = "fp32"
    chosen_by: str = "request"
    note: str = ""
    adapter_digest: str = ""
    run: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    adapter_id: int | None = field(default=None, repr=False)

    def bind(self, model: SamModel) -> EncoderBackend:
        """Remember ``model``'s adapter (digest and object) as the one this was built with."""
        self.adapter_digest = model.adapter_digest
        self.adapter_id = id(model.adapter) if model.adapter is not None else None
        return self

    def valid_for(self, model: SamModel) -> bool:
        """True while ``model`` carries the adapter this backend was built with."""
        current = id(model.adapter) if model.adapter is not None else None
        return self.adapter_digest == model.adapter_digest and self.adapter_id == current

    @property
    def name(self) -> str:
        """``<backend>-<precision>``, one of :data:`CANDIDATES`."""
        return f"{self.backend}-{self.precision}"

    @property
    def label(self) -> str:
        """What the embeddings were computed with, for cache keys and ``case.json``: ``"fp32"``
        for torch fp32 (the label CPU embeddings always had) and :attr:`name` otherwise."""
        return "fp32" if self.name == "torch-fp32" else self.name

    def describe(self) -> dict[str, str]:
        """JSON-ready summary (backend, precision, name, chosen_by, note)."""
        return {
            "backend": self.backend,
            "precision": self.precision,
            "name": self.name,
            "chosen_by": self.chosen_by,
            "note": self.note,
        }


def encoder_label(model: SamModel, amp: bool | str = True) -> str:
    """What a :class:`samed.engine.Session` over ``model`` runs its encoder in: on CUDA the
    autocast precision (:func:`samed.precision.encoder_precision`), on the CPU the label of
    ``model.encoder_backend`` (``"fp32"`` for torch fp32, else e.g. ``"openvino-int8"``)."""
    from ..precision import encoder_precision

    if model.device.type != "cpu":
        return encoder_precision(model.device, amp)
    be = getattr(model, "encoder_backend", None)
    return be.label if be is not None else "fp32"


# ------------------------------------------------------------------ torch candidates
def _torch_bf16(encoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return encoder(x).float()

    return run


def _torch_mixed(encoder: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """bf16 autocast with every convolution (``Conv2d``, the fused :class:`~.cpu.ConvGELU`) run
    in fp32, on a copy of ``encoder``: the Linear layers and the attention take bf16, the
    convolutions, whose bf16 rounding moved the automatic adapters' class maps most (measured on
    the calibration slices, docs/BENCHMARKS.md "Session 8"), stay in fp32."""
    import copy

    from .cpu import ConvGELU

    enc = copy.deepcopy(encoder).eval()

    def fp32_island(mod: nn.Module) -> None:
        fwd = mod.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", enabled=False):
                return fwd(x.float())

        mod.forward = forward  # type: ignore[method-assign]

    def walk(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, (nn.Conv2d, ConvGELU)):
                fp32_island(child)  # a ConvGELU's own Conv2d runs inside it, in fp32
            else:
                walk(child)

    walk(enc)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return enc(x).float()

    return run


# ------------------------------------------------------------------ OpenVINO candidates
def _plain_copy(encoder: nn.Module) -> nn.Module:
    """A copy of the encoder without oneDNN-only modules (ConvGELU -> Conv2d + GELU), float32,
    contiguous weights: what the OpenVINO converter can trace."""
    import copy

    from .cpu import ConvGELU

    enc = copy.deepcopy(encoder).float().to(memory_format=torch.contiguous_format)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, ConvGELU):
                setattr(parent, name, nn.Sequential(child.conv, nn.GELU()))
            else:
                swap(child)

    swap(enc)
    return enc.eval()


def _atomic_save(ov: Any, model: Any, folder: Path) -> None:
    """Write ``model`` as ``folder/encoder.xml`` + ``.bin``: into a temporary folder beside it,
    renamed into place (a reader never sees half a model; the first writer wins)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-samed-", dir=folder.parent))
    try:
        ov.save_model(model, str(tmp / "encoder.xml"), compress_to_fp16=False)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ov_model(
    encoder: nn.Module,
    image_size: int,
    precision: str,
    calibration: Callable[[], np.ndarray] | None,
    cache: Path | None,
) -> Any:
    """The OpenVINO model (fp32 IR, or the NNCF int8 IR for ``precision="int8"``) of the
    encoder, from the disk cache when there."""
    import openvino as ov

    plain = _plain_copy(encoder)
    digest = encoder_digest(plain)
    kind = "int8" if precision == "int8" else "fp32"
    folder = None if cache is None else cache / "openvino" / f"{digest}-{image_size}-{kind}"
    core = ov.Core()
    if folder is not None and (folder / "encoder.xml").is_file():
        return core.read_model(str(folder / "encoder.xml"))
    fp32 = None
    fp32_folder = None if cache is None else cache / "openvino" / f"{digest}-{image_size}-fp32"
    if kind == "int8" and fp32_folder is not None and (fp32_folder / "encoder.xml").is_file():
        fp32 = core.read_model(str(fp32_folder / "encoder.xml"))
    if fp32 is None:
        import warnings

        example = torch.zeros(1, 3, image_size, image_size)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            fp32 = ov.convert_model(plain, example_input=example)
        if fp32_folder is not None:
            _atomic_save(ov, fp32, fp32_folder)
    if kind == "fp32":
        return fp32
    import nncf

    if calibration is None:
        raise ValueError("precision='int8' needs calibration slices")
    x = calibration()  # (N, 3, S, S) normalised
    data = nncf.Dataset([x[i : i + 1] for i in range(len(x))])
    q = nncf.quantize(
        fp32,
        data,
        subset_size=len(x),
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED,
    )
    if folder is not None:
        _atomic_save(ov, q, folder)
    return q


def _openvino_run(
    model: SamModel,
    precision: str,
    calibration: Callable[[], np.ndarray] | None,
    cache: Path | None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov

    ovm = _ov_model(model.image_encoder, model.image_size, precision, calibration, cache)
    hint = "bf16" if precision == "bf16" else "f32"
    threads = torch.get_num_threads()
    compiled = ov.Core().compile_model(
        ovm,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
        },
    )
    return openvino_runner(compiled.create_infer_request())


def openvino_runner(request: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """``run(images) -> embeddings`` over an OpenVINO infer request of an encoder IR: (B, 3, S,
    S) float images in, (B, C, h, w) float32 embeddings out, one slice per call (the IR is traced
    at batch 1: TinyViT's reshapes freeze it)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = []
        for i in range(arr.shape[0]):
            res = request.infer({0: arr[i : i + 1]})
            out.append(torch.from_numpy(np.array(next(iter(res.values())), copy=True)))
        return torch.cat(out)

    return run


# ------------------------------------------------------------------ resolution
def unsupported_reason(backend: str, precision: str) -> str:
    """Why the candidate ``backend-precision`` cannot run on this machine ("" when it can)."""
    if backend == "openvino" and not openvino_available():
        return "OpenVINO is not installed (pip install 'samed[openvino]')"
    if precision in ("bf16", "mixed") and not native_bf16():
        return "this CPU has no native bf16 (avx512_bf16 / amx_bf16), where bf16 is ~40x slower"
    if precision == "mixed" and backend != "torch":
        return "mixed (bf16 with fp32 convolutions) runs through torch only"
    if precision == "int8" and backend == "torch":
        return "int8 runs through OpenVINO only (torch dynamic int8 gains nothing here)"
    if precision == "int8" and not native_int8():
        return (
            "this CPU has no int8 dot-product instructions (VNNI / AMX-INT8); measured on an "
            "AVX2-only AMD EPYC, NNCF int8 ran at 0.80-0.94x of OpenVINO fp32 with box Dice "
            "0.93-0.97 against fp32 (docs/BENCHMARKS.md, session 10)"
        )
    if precision == "int8":
        import importlib.util

        if importlib.util.find_spec("nncf") is None:
            return "NNCF (int8 quantisation) is not installed (pip install 'samed[openvino]')"
    return ""


def build_candidate(
    model: SamModel,
    name: str,
    *,
    calibration: Callable[[], np.ndarray] | None = None,
    cache: Path | None = None,
) -> EncoderBackend:
    """Build candidate ``name`` (one of :data:`CANDIDATES`) for ``model`` (CPU, eval); raises
    ValueError when it cannot run here (:func:`unsupported_reason`). ``calibration()`` returns
    (N, 3, S, S) normalised encoder inputs for int8; ``cache`` the disk-cache folder or None."""
    if name not in CANDIDATES:
        raise ValueError(f"encoder candidate {name!r} must be one of {', '.join(CANDIDATES)}")
    backend, precision = name.split("-")
    why = unsupported_reason(backend, precision)
    if why:
        raise ValueError(f"{name}: {why}")
    be = EncoderBackend(backend, precision).bind(model)
    if name == "torch-bf16":
        be.run = _torch_bf16(model.image_encoder)
    elif name == "torch-mixed":
        be.run = _torch_mixed(model.image_encoder)
    elif backend == "openvino":
        be.run = _openvino_run(model, precision, calibration, cache)
    return be


def set_encoder_backend(
    model: SamModel,
    backend: str = "auto",
    precision: str = "auto",
    *,
    cache_dir: str | os.PathLike | None | bool = True,
) -> EncoderBackend:
    """Choose and attach ``model.encoder_backend``; returns it.

    Args:
        model: a :class:`SamModel` on the CPU in eval mode (on CUDA nothing is attached: the
            Session's autocast decides there; a non-fp32 CPU request then prints a notice).
        backend: ``"auto"``, ``"torch"`` or ``"openvino"``.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"``, ``"int8"`` or ``"mixed"`` (``"fp16"``, a CUDA
            precision, means ``"fp32"`` on the CPU, with a notice).
        cache_dir: True for :func:`backend_cache_dir`, a folder, or None/False for no disk
            cache (converted models and ``auto`` choices are then redone every time).

    Returns:
        The attached :class:`EncoderBackend`. ``backend="torch", precision="fp32"`` is today's
        path (``run`` None). ``auto`` in either argument measures (see
        :func:`samed.engine.backend_auto.choose`); a candidate this machine cannot run falls
        back to torch fp32 with a notice (``chosen_by="fallback"``).

    Raises:
        ValueError: a backend or precision not in :data:`BACKENDS` / :data:`CPU_PRECISIONS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {', '.join(BACKENDS)}")
    if precision == "fp16" and model.device.type == "cpu":
        notice("precision fp16 is a CUDA precision; on the CPU the encoder runs fp32")
        precision = "fp32"
    if precision not in (*CPU_PRECISIONS, "fp16"):
        raise ValueError(f"precision={precision!r} must be one of {', '.join(CPU_PRECISIONS)}")
    cache = (
        backend_cache_dir()
        if cache_dir is True
        else (Path(cache_dir) if cache_dir not in (None, False) else None)
    )
    if model.device.type != "cpu":
        if backend == "openvino" or precision in ("int8", "mixed"):
            notice(
                f"backend={backend} precision={precision} is a CPU option; on "
                f"{model.device} the encoder runs in torch with CUDA autocast"
            )
        model.encoder_backend = None
        return EncoderBackend()
    if backend == "auto" or precision == "auto":
        from .backend_auto import choose

        be = choose(model, backend, precision, cache=cache)
    else:
        name = f"{backend}-{precision}"
        try:
            be = build_candidate(model, name, calibration=_calibration_fn(model), cache=cache)
        except ValueError as exc:
            notice(f"{exc}; running the encoder in torch fp32")
            be = EncoderBackend(chosen_by="fallback", note=str(exc))
    model.encoder_backend = be.bind(model)
    return be


def _calibration_fn(model: SamModel) -> Callable[[], np.ndarray]:
    def calib() -> np.ndarray:
        from .backend_auto import calibration_inputs

        return calibration_inputs(model)

    return calib
