"""A segmentation session over one volume: cached embeddings, prompts -> masks, propagation.

The model sees axial slices ``array[z]`` of a (Z, Y, X) volume. Every mask returned is on the
slice's own pixel grid (Y, X); coordinates are (x, y) pixels of that grid (x = column).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..model.fast_decoder import ImageState, decoder_fingerprint
from ..model.sam import SamModel
from ..precision import check_amp, encoder_precision
from .backends import encoder_label
from .canvas import canvas_automatic_iter, plain_automatic_iter, resampling_record, session_canvas
from .interactive import InteractiveMixin
from .interactive import mask_digest as _mask_digest
from .orientation import axis_codes, check_orientation
from .preprocess import (
    _pair,
    box_to_model,
    check_volume_array,
    choose_intensity,
    inplane_spacing,
    points_to_model,
    prepare_slices,
    resolve_intensity,
    slice_geometry,
)
from .propagation import PropagationMixin
from .results import Prediction, PropagationStep

__all__ = ["Session", "PropagationStep", "Prediction"]

ProgressFn = Callable[[int, int], None]
_STATE_SLICES = 4
_LOGIT_ENTRIES = 256  # remembered (slice, mask) -> low-res logits, float16 (~32 MB)


class Session(PropagationMixin, InteractiveMixin):
    """Embeddings and prompt-based segmentation for one (Z, Y, X) volume.

    Embeddings are computed once per slice (lazily, or in batches with :meth:`embed`), kept in
    memory and optionally on disk keyed by the volume's content hash, the model checkpoint, the
    adapter and the intensity mapping, so that a click costs only the prompt encoder and decoder.
    Attaching another adapter to the model invalidates the cache automatically.

    Args:
        model: a :class:`samed.model.SamModel` (optionally carrying an adapter).
        volume: (Z, Y, X) array (intensities in the modality's units: HU for CT), or an object with
            ``.array`` and ``.modality`` (a :class:`samed.io.Volume`). Not modified.
        intensity: see :func:`samed.engine.preprocess.resolve_intensity` (``"auto"`` default).
        modality: ``"CT"``, ``"MR"`` or ``""`` (taken from ``volume.modality`` when present).
        batch_size: slices per encoder batch.
        cache_dir: folder for the on-disk embedding cache, or None (memory only).
        amp: mixed precision for the encoder on CUDA: True (fp16 autocast,
            :data:`samed.precision.DEFAULT_AMP`), False (float32), ``"fp16"`` or ``"bf16"``
            autocast. Ignored on the CPU, where the model's encoder backend decides
            (``load_model(backend=..., precision=...)``, :mod:`samed.engine.backends`; reported
            by :attr:`encoder`). The decoder always runs in float32.
        spacing: in-plane (row, column) pixel spacing in mm (taken from ``volume.affine`` when
            present); with an adapter that records a training spacing, :meth:`automatic`
            resamples to it (:mod:`samed.engine.canvas`). None: unknown.
        orientation: axis codes of the (x, y, z) voxel axes (``"LPS"``...; default: those of
            ``volume.affine``; None without one: slices as stored), for adapters that record a
            training orientation (:mod:`samed.engine.orientation`).

    ``intensity="auto"`` applies the adapter's recorded ``preprocessing.intensity`` when there
    is one (it always wins over the automatic decision), else
    :func:`samed.intensity.decide_intensity` (DICOM modality, then the values);
    :attr:`preprocessing` records what was applied and why.
    """

    def __init__(
        self,
        model: SamModel,
        volume: np.ndarray | object,
        *,
        intensity: object = "auto",
        modality: str = "",
        batch_size: int = 4,
        cache_dir: str | os.PathLike | None = None,
        amp: bool | str = True,
        spacing: object = None,
        orientation: str | None = None,
    ) -> None:
        array = getattr(volume, "array", volume)
        affine = getattr(volume, "affine", None)
        if spacing is None and affine is not None:
            spacing = inplane_spacing(affine)
        if orientation is None and affine is not None:
            orientation = axis_codes(affine)
        self.orientation = check_orientation(orientation, "orientation") if orientation else None
        modality = modality or str(getattr(volume, "modality", "") or "")
        array = check_volume_array(array)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model
        self.modality = modality
        self.batch_size = int(batch_size)
        self.amp = check_amp(amp)
        intensity, self.preprocessing = choose_intensity(intensity, model, array, modality)
        self.spacing = None if spacing is None else _pair(spacing, "spacing")
        self.preprocessing["spacing_mm"] = None if self.spacing is None else list(self.spacing)
        self.preprocessing.update(resampling_record(model, self.spacing, self.orientation))
        self.intensity_name, fn = resolve_intensity(intensity, array, modality)
        self.preprocessing["intensity_name"] = self.intensity_name
        image = np.asarray(fn(array), dtype=np.float32)
        if not np.all(np.isfinite(image)):
            image = np.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        self.image = image
        self.shape = tuple(int(s) for s in image.shape)
        self.geometry = slice_geometry(self.shape[1:], model.image_size)
        self._cache: dict[int, torch.Tensor] = {}
        self._canvas = None  # the CanvasGrid of samed.engine.canvas, once asked for
        self._canvas_cache: dict[int, torch.Tensor] = {}  # canvas embeddings (automatic)
        self._cache_key = ""
        # prompt-independent decoder tensors of the last few clicked slices (~10 MB each)
        self._states: OrderedDict[int, ImageState] = OrderedDict()
        # low-res logits behind masks this session produced, to feed them back as mask prompts
        self._logits: OrderedDict[tuple[int, bytes], torch.Tensor] = OrderedDict()
        self._content_hash = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:32]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._check_cache()
        if self.cache_dir is not None:
            self._load_disk_cache()

    # ------------------------------------------------------------------ embeddings
    @property
    def cache_key(self) -> str:
        """Hash of (volume content, intensity mapping, model checkpoint, adapter, precision).

        An adapter that leaves the image encoder as is (no encoder LoRA targets, e.g. the
        click-aware decoder adapter) keeps the base model's key: its embeddings are the same."""
        adapter = self.model.adapter
        parts = [
            self._content_hash,
            self.intensity_name,
            self.model.kind,
            self.model.checkpoint_sha256,
            self.model.adapter_digest if adapter is not None and adapter.targets else "",
        ]
        # always part of the key: before fp16 became the CUDA default, bf16 embeddings were
        # cached under keys without it, which must never be read back as another precision
        # on the CPU the encoder backend's label ("fp32" for torch fp32, as before; e.g.
        # "openvino-int8" otherwise), so that embeddings of different backends never collide
        parts.append("precision=" + encoder_label(self.model, self.amp))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]

    @property
    def encoder(self) -> str:
        """What the embeddings are computed with: ``"fp32"`` / ``"fp16"`` / ``"bf16"`` on CUDA;
        on the CPU ``"fp32"`` (torch) or the backend's name (e.g. ``"openvino-bf16"``), see
        :func:`samed.engine.backends.encoder_label`."""
        return encoder_label(self.model, self.amp)

    def _check_cache(self) -> None:
        key = self.cache_key
        if key != self._cache_key:
            self._cache.clear()
            self._canvas_cache.clear()
            self._canvas = None
            self._states.clear()
            self._logits.clear()
            self._cache_key = key

    def _disk_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"emb-{self.cache_key}.safetensors"

    def _load_disk_cache(self) -> None:
        path = self._disk_path()
        if path is None or not path.is_file():
            return
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError):
            return  # a damaged cache file is ignored and rewritten
        for k, v in tensors.items():
            if k.startswith("z") and k[1:].isdigit() and int(k[1:]) < self.shape[0]:
                self._cache[int(k[1:])] = v

    def save_cache(self) -> Path | None:
        """Write the in-memory embeddings to the disk cache (atomically). Returns the path."""
        path = self._disk_path()
        if path is None or not self._cache:
            return None
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({f"z{z}": t.contiguous() for z, t in self._cache.items()}, str(tmp))
        os.replace(tmp, path)
        return path

    def is_embedded(self, z: int) -> bool:
        self._check_cache()
        return int(z) in self._cache

    def _check_z(self, z: int) -> int:
        if not isinstance(z, int | np.integer) or not 0 <= int(z) < self.shape[0]:
            raise ValueError(f"slice index z={z!r} must be an integer in [0, {self.shape[0] - 1}]")
        return int(z)

    @torch.inference_mode()
    def _encode(self, zs: list[int]) -> None:
        dev = self.model.device
        x = prepare_slices(self.image[zs], self.model.image_size).to(dev)
        prec = encoder_precision(dev, self.amp)
        ctx = (
            contextlib.nullcontext()
            if prec == "fp32"
            else torch.autocast("cuda", dtype=torch.bfloat16 if prec == "bf16" else torch.float16)
        )
        with ctx:
            emb = self.model.encode(x)
        emb = emb.float()
        if dev.type == "cuda":
            emb = emb.cpu()
        for z, e in zip(zs, emb, strict=True):
            self._cache[z] = e.clone()

    def embed_iter(self, slices: Iterable[int] | None = None) -> Iterator[tuple[int, int]]:
        """Compute missing embeddings in batches; yields (slices done, slices to do) after each
        batch so that callers can show progress or stop early (closing the generator stops)."""
        self._check_cache()
        todo = [self._check_z(z) for z in (range(self.shape[0]) if slices is None else slices)]
        todo = [z for z in dict.fromkeys(todo) if z not in self._cache]
        total = len(todo)
        yield 0, total
        for i in range(0, total, self.batch_size):
            self._encode(todo[i : i + self.batch_size])
            yield min(i + self.batch_size, total), total
        if total and self.cache_dir is not None:
            self.save_cache()

    def embed(
        self, slices: Iterable[int] | None = None, progress: ProgressFn | None = None
    ) -> None:
        """Compute embeddings for ``slices`` (default: all); ``progress(done, total)``."""
        for done, total in self.embed_iter(slices):
            if progress is not None:
                progress(done, total)

    def embedding(self, z: int) -> torch.Tensor:
        """(1, C, h, w) embedding of slice z on the model's device (computed if missing)."""
        z = self._check_z(z)
        self._check_cache()
        if z not in self._cache:
            self._encode([z])
        return self._cache[z][None].to(self.model.device)

    def _image_state(self, z: int, emb: torch.Tensor) -> ImageState:
        """Slice z's prompt-independent decoder part, reused across clicks (LRU of 4)."""
        st = self._states.get(z)
        if st is None or st.fingerprint != decoder_fingerprint(self.model.mask_decoder):
            st = self.model.image_state(emb)
            self._states[z] = st
            while len(self._states) > _STATE_SLICES:
                self._states.popitem(last=False)
        self._states.move_to_end(z)
        return st

    # ------------------------------------------------------------------ prompts
    @torch.inference_mode()
    def predict_full(
        self,
        z: int,
        *,
        box: np.ndarray | list[float] | None = None,
        points: np.ndarray | list | None = None,
        point_labels: np.ndarray | list | None = None,
        mask_input: torch.Tensor | np.ndarray | None = None,
        threshold: float = 0.0,
        mask_output: int | None = None,
    ) -> Prediction:
        """Segment one object on slice z from a box, points and/or a previous low-res mask.

        Args:
            z: slice index.
            box: (4,) XYXY in slice pixels (x = column), or None.
            points: (N, 2) XY in slice pixels, or None.
            point_labels: (N,) 1 = positive (object), 0 = negative (background).
            mask_input: (L, L) low-resolution logits from an earlier :class:`Prediction`.
            threshold: logit threshold (0.0 = probability 0.5).
            mask_output: None for the single-mask output (what MedSAM/LiteMedSAM were trained
                for); k in 0..2 picks SAM's k-th multimask output instead (0 is the coarsest:
                with LiteMedSAM it fits large objects such as the whole brain better).

        Returns:
            A :class:`Prediction` with the (Y, X) bool mask.
        """
        if mask_output is not None:
            n = self.model.num_mask_outputs
            if not isinstance(mask_output, int) or not 0 <= mask_output < n:
                raise ValueError(
                    f"mask_output={mask_output!r} must be None or an integer in [0, {n - 1}]"
                )
        logits, iou = self._decode(
            z, box, points, point_labels, mask_input, "single" if mask_output is None else "multi"
        )
        if mask_output is not None:
            logits = logits[:, mask_output : mask_output + 1]
            iou = iou[:, mask_output : mask_output + 1]
        return self._prediction(z, logits[0, 0], float(iou[0, 0]), threshold)

    @torch.inference_mode()
    def predict_outputs(
        self,
        z: int,
        *,
        box: np.ndarray | list[float] | None = None,
        points: np.ndarray | list | None = None,
        point_labels: np.ndarray | list | None = None,
        mask_input: torch.Tensor | np.ndarray | None = None,
        threshold: float = 0.0,
    ) -> list[Prediction]:
        """Every answer of the decoder for one prompt, from one decoder pass: the single-mask
        output (``predict_full(..., mask_output=None)``), then each multimask output
        (``mask_output=0, 1, ...``); the same masks as asking for each in turn.

        Args: as :meth:`predict_full`.

        Returns:
            1 + ``model.num_mask_outputs`` :class:`Prediction` objects with (Y, X) bool masks.
        """
        logits, iou = self._decode(z, box, points, point_labels, mask_input, "all")
        return [
            self._prediction(z, logits[0, k], float(iou[0, k]), threshold)
            for k in range(logits.shape[1])
        ]

    def _decode(
        self,
        z: int,
        box: np.ndarray | list[float] | None,
        points: np.ndarray | list | None,
        point_labels: np.ndarray | list | None,
        mask_input: torch.Tensor | np.ndarray | None,
        outputs: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, K, L, L) low-res logits and (1, K) predicted IoU for slice z's prompts; ``outputs``
        ``"single"``, ``"multi"`` or ``"all"`` (single first, then the multimask outputs)."""
        if box is None and points is None and mask_input is None:
            raise ValueError("give at least one prompt: box, points or mask_input")
        if points is not None and point_labels is None:
            point_labels = np.ones(len(np.asarray(points).reshape(-1, 2)), dtype=np.int64)
        geo = self.geometry
        dev = self.model.device
        emb = self.embedding(z)
        boxes_t = None
        if box is not None:
            boxes_t = torch.as_tensor(box_to_model(box, geo), device=dev)[None]
        pts = None
        if points is not None:
            p, lab = points_to_model(points, point_labels, geo)
            if box is None:  # SAM pads point-only prompts with a "not a point" entry
                p = np.concatenate([p, np.zeros((1, 2), np.float32)])
                lab = np.concatenate([lab, [-1]])
            pts = (torch.as_tensor(p, device=dev)[None], torch.as_tensor(lab, device=dev)[None])
        masks_t = None
        if mask_input is not None:
            m = torch.as_tensor(mask_input, dtype=torch.float32, device=dev)
            low = self.model.low_res_size
            if m.shape[-2:] != (low, low):
                raise ValueError(
                    f"mask_input must be ({low}, {low}) low-res logits; got {tuple(m.shape)}"
                )
            masks_t = m.reshape(1, 1, low, low)
        # the slice's prompt-independent decoder part, reused across clicks (SamModel only)
        extra = {}
        if masks_t is None and self.model.fast_decoder:
            extra["image_state"] = self._image_state(z, emb)
        return self.model.decode(
            emb,
            boxes=boxes_t,
            points=pts,
            mask_inputs=masks_t,
            multimask_output=outputs == "multi",
            all_outputs=outputs == "all",
            **extra,
        )

    def _prediction(
        self, z: int, logits: torch.Tensor, score: float, threshold: float
    ) -> Prediction:
        """The :class:`Prediction` of one (L, L) low-res answer on slice z (upscaled to the slice;
        its logits remembered for :meth:`known_logits`)."""
        geo = self.geometry
        full = geo.upscale(logits[None, None])
        mask = (full[0, 0] > threshold).cpu().numpy()
        low_res = logits.float().cpu()
        self.remember_logits(z, mask, low_res)
        return Prediction(mask=mask, score=score, low_res_logits=low_res)

    def remember_logits(self, z: int, mask: np.ndarray, logits: torch.Tensor) -> None:
        """Remember the (L, L) low-res ``logits`` behind the (Y, X) ``mask`` of slice z, so that a
        later correction of that mask can feed them back (:meth:`known_logits`)."""
        key = (int(z), _mask_digest(mask))
        self._logits[key] = torch.as_tensor(logits).detach().to("cpu", torch.float16)
        self._logits.move_to_end(key)
        while len(self._logits) > _LOGIT_ENTRIES:
            self._logits.popitem(last=False)

    def known_logits(self, z: int, mask: np.ndarray) -> torch.Tensor | None:
        """(L, L) float32 low-res logits this session produced ``mask`` (Y, X) of slice z from,
        or None when it did not (e.g. a painted or blended mask)."""
        t = self._logits.get((int(z), _mask_digest(mask)))
        return None if t is None else t.float()

    def predict(self, z: int, **prompts: object) -> np.ndarray:
        """Like :meth:`predict_full` but returns only the (Y, X) bool mask."""
        return self.predict_full(z, **prompts).mask  # type: ignore[arg-type]

    # ------------------------------------------------------------------ automatic
    @torch.inference_mode()
    def automatic_iter(
        self, slices: Iterable[int] | None = None
    ) -> Iterator[tuple[int, np.ndarray, int, int]]:
        """Prompt-free multi-class segmentation with an automatic adapter.

        Yields:
            (z, labels (Y, X) int16 argmax over classes, done, total) per slice.

        Raises:
            ValueError: the model carries no automatic adapter.
        """
        adapter = self.model.adapter
        if adapter is None or adapter.mode != "automatic":
            raise ValueError(
                "automatic segmentation needs an automatic adapter (e.g. load_adapter(model, "
                "'acdc-cardiac-mri')); this model has "
                + ("none" if adapter is None else f"a {adapter.mode} adapter")
            )
        zs = [self._check_z(z) for z in (range(self.shape[0]) if slices is None else slices)]
        self._check_cache()
        grid = session_canvas(self)
        if grid is not None:  # the adapter's training spacing: resample, predict, map back
            yield from canvas_automatic_iter(self, zs, grid)
        else:
            yield from plain_automatic_iter(self, zs)

    def automatic(
        self,
        slices: Iterable[int] | None = None,
        progress: ProgressFn | None = None,
        postprocess: str | dict | None = "adapter",
    ) -> np.ndarray:
        """(Z, Y, X) int16 label map from an automatic adapter (slices not listed stay 0).

        Args:
            postprocess: ``"adapter"`` applies what the adapter's metadata recommends (e.g. the
                largest 3D connected component per class), ``"none"`` gives the raw per-slice
                argmax, ``"largest_component"`` forces it (see :mod:`samed.postprocess`).
        """
        from ..postprocess import POSTPROCESS_CHOICES

        if isinstance(postprocess, str) and postprocess not in POSTPROCESS_CHOICES:
            # checked before the (long) inference, not after it
            raise ValueError(
                f"postprocess={postprocess!r} must be one of {POSTPROCESS_CHOICES} or a mapping"
            )
        out = np.zeros(self.shape, dtype=np.int16)
        for z, lab, done, total in self.automatic_iter(slices):
            out[z] = lab
            if progress is not None:
                progress(done, total)
        return self.postprocess(out, postprocess)

    def postprocess(self, labels: np.ndarray, spec: str | dict | None = "adapter") -> np.ndarray:
        """Post-process a (Z, Y, X) label map of this volume as :meth:`automatic` does (with
        this volume's :attr:`orientation`, so ``lateral_pairs`` know the patient's right, and its
        image for the body midline). ``spec``: as ``postprocess`` of :meth:`automatic`."""
        from ..postprocess import apply_postprocessing

        return apply_postprocessing(labels, spec, self.model, self.orientation, self.image)
