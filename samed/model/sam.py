"""The SAM-family model wrapper shared by LiteMedSAM, SAM and MedSAM.

Only nn.Modules and their tensor conventions live here; state (embeddings, prompts) lives in
:mod:`samed.engine`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ModelSpec
from .adapter import AdapterState
from .fast_decoder import ImageState, fast_mask_decoder, prepare_image_state

__all__ = ["SamModel"]

_IMAGENET_MEAN = (123.675, 116.28, 103.53)
_IMAGENET_STD = (58.395, 57.12, 57.375)


class SamModel(nn.Module):
    """Image encoder + prompt encoder + mask decoder with explicit tensor contracts.

    Args:
        spec: the registry entry for this model kind (input size, normalisation).
        image_encoder: maps (B, 3, S, S) to (B, C, S/16 or 64, ...) embeddings.
        prompt_encoder: SAM ``PromptEncoder``.
        mask_decoder: SAM ``MaskDecoder`` (a prompted decoder has 3 multimask outputs + 1;
            an automatic one has ``num_classes`` multimask outputs, see :mod:`samed.lora`).
        checkpoint_sha256: SHA-256 of the checkpoint the weights came from ("" for random).

    Attributes:
        image_size: S, the side of the square model input in pixels.
        embedding_size: (h, w) of the image embedding grid.
        low_res_size: side of the low-resolution mask logits (4 x embedding side).
        adapter: the attached adapter (:class:`samed.model.adapter.AdapterState`), or None;
            set by :mod:`samed.lora` only. ``adapter_name``, ``adapter_digest``,
            ``adapter_labels``, ``adapter_postprocessing``, ``lora_config`` and ``lora_targets``
            are read-only views of it.
    """

    def __init__(
        self,
        spec: ModelSpec,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
        checkpoint_sha256: str = "",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.checkpoint_sha256 = checkpoint_sha256
        self.adapter: AdapterState | None = None
        #: CPU copies of the pretrained decoder / prompt encoder, kept by samed.lora when the
        #: first adapter is applied so that remove_adapter can restore them
        self.base_parts: dict[str, nn.Module] | None = None
        #: run clicks through the re-associated decoder (see samed.model.fast_decoder)
        self.fast_decoder = True
        #: how the image encoder runs on the CPU (samed.engine.backends.EncoderBackend; None:
        #: torch fp32); set by samed.engine.backends.set_encoder_backend / load_model
        self.encoder_backend: object | None = None
        self.image_size = int(prompt_encoder.input_image_size[0])
        self.embedding_size = tuple(int(s) for s in prompt_encoder.image_embedding_size)
        self.low_res_size = 4 * self.embedding_size[0]
        self.register_buffer(
            "pixel_mean", torch.tensor(_IMAGENET_MEAN).view(-1, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(_IMAGENET_STD).view(-1, 1, 1), persistent=False
        )

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ------------------------------------------------------------ views of ``adapter``
    @property
    def adapter_name(self) -> str | None:
        """Name of the attached adapter, or None."""
        return self.adapter.name if self.adapter is not None else None

    @property
    def adapter_digest(self) -> str:
        """SHA-256 of the attached adapter's weights ("" without one or for an unsaved one)."""
        return self.adapter.digest if self.adapter is not None else ""

    @property
    def adapter_labels(self) -> dict[int, str]:
        """Class index -> name of the attached adapter (``{}`` without one)."""
        return self.adapter.labels if self.adapter is not None else {}

    @adapter_labels.setter
    def adapter_labels(self, labels: dict[int, str]) -> None:
        if self.adapter is None:
            raise ValueError(
                "the model carries no adapter to label; call samed.lora.apply_lora first"
            )
        self.adapter.labels = {int(k): str(v) for k, v in labels.items()}

    @property
    def adapter_postprocessing(self) -> dict:
        """The attached adapter's post-processing recommendation (``{}`` without one)."""
        return self.adapter.postprocessing if self.adapter is not None else {}

    @property
    def lora_config(self) -> object | None:
        """The attached adapter's :class:`samed.lora.LoraConfig`, or None."""
        return self.adapter.config if self.adapter is not None else None

    @property
    def lora_targets(self) -> list[str]:
        """Module paths of the LoRA-wrapped layers (``[]`` without an adapter)."""
        return list(self.adapter.targets) if self.adapter is not None else []

    @property
    def num_mask_outputs(self) -> int:
        """Number of multimask outputs of the decoder (3 for a prompted SAM decoder)."""
        return int(self.mask_decoder.num_mask_tokens) - 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings.

        Args:
            images: (B, 3, S, S) float in [0, 1], already resized (longest side S) and padded
                bottom/right with zeros, S = ``image_size``.

        Returns:
            (B, C, h, w) embeddings, (h, w) = ``embedding_size``.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.image_size:
            raise ValueError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}); got {tuple(images.shape)}"
            )
        if self.spec.normalisation == "sam_imagenet":
            images = (images * 255.0 - self.pixel_mean) / self.pixel_std
        be = self.encoder_backend
        run = getattr(be, "run", None)
        if run is not None and not torch.is_grad_enabled() and images.device.type == "cpu":
            if be.valid_for(self):  # type: ignore[attr-defined]
                return run(images)
            # the adapter changed since the backend was built: its compiled encoder is stale
            import sys

            print(
                f"samed: the adapter changed after the {be.name} encoder was built; "  # type: ignore[attr-defined]
                "running the encoder in torch fp32",
                file=sys.stderr,
            )
            self.encoder_backend = None
        return self.image_encoder(images)

    def decode(
        self,
        embeddings: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_inputs: torch.Tensor | None = None,
        multimask_output: bool = False,
        image_state: ImageState | None = None,
        all_outputs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits for prompts on precomputed embeddings.

        Without gradients and for one slice, the decoder runs through
        :func:`samed.model.fast_decoder.fast_mask_decoder` (same result, about half the
        arithmetic); ``image_state`` (from :meth:`image_state`, no mask prompt) skips the
        per-slice part too. Set ``model.fast_decoder = False`` to use SAM's module as is.

        Args:
            embeddings: (B, C, h, w) from :meth:`encode` (B = 1 is broadcast to the prompts).
            boxes: (B, 4) XYXY in model-input pixels (0..S), or None.
            points: ((B, N, 2) XY in model-input pixels, (B, N) labels 1 = positive,
                0 = negative, -1 = padding), or None.
            mask_inputs: (B, 1, L, L) low-resolution logits (L = ``low_res_size``), or None.
            multimask_output: return all multimask outputs (prompted: 3; automatic: one per
                class) instead of the single-mask output.
            all_outputs: return every output of one decoder pass, the single-mask output first
                and then each multimask output (K = 1 + :attr:`num_mask_outputs`); what asking
                for each of them in turn gives, at the cost of one.

        Returns:
            (logits (B, K, L, L), iou predictions (B, K)).
        """
        sparse, dense = self.prompt_encoder(
            points=points,
            boxes=boxes[:, None, :] if boxes is not None and boxes.ndim == 2 else boxes,
            masks=mask_inputs,
        )
        fast = (
            self.fast_decoder
            and not torch.is_grad_enabled()
            and embeddings.shape[0] == 1
            and (mask_inputs is None or mask_inputs.shape[0] == 1)
        )
        if image_state is not None or fast:
            if image_state is None:
                image_state = self.image_state(embeddings, mask_inputs)
            elif mask_inputs is not None:
                raise ValueError(
                    "image_state covers the no-mask-prompt case only; pass mask_inputs without it"
                )
            return fast_mask_decoder(
                self.mask_decoder,
                image_state,
                sparse.to(embeddings.dtype),
                multimask_output,
                all_outputs=all_outputs,
            )
        if embeddings.shape[0] == 1 and sparse.shape[0] > 1:
            embeddings = embeddings.expand(sparse.shape[0], -1, -1, -1)
        if embeddings.shape[0] != sparse.shape[0]:
            # prompt encoder returns batch 1 when no prompt was given at all (automatic mode)
            sparse = sparse.expand(embeddings.shape[0], -1, -1)
            dense = dense.expand(embeddings.shape[0], -1, -1, -1)
        image_pe = self._dense_pe(embeddings.dtype)
        args = {
            "image_embeddings": embeddings,
            "image_pe": image_pe,
            "sparse_prompt_embeddings": sparse.to(embeddings.dtype),
            "dense_prompt_embeddings": dense.to(embeddings.dtype),
        }
        if all_outputs:  # every output token, the single-mask one first
            return self.mask_decoder.predict_masks(**args)
        return self.mask_decoder(**args, multimask_output=multimask_output)

    def image_state(
        self, embedding: torch.Tensor, mask_inputs: torch.Tensor | None = None
    ) -> ImageState:
        """The prompt-independent part of the decoder for one slice's (1, C, h, w) embedding
        (optionally with a (1, 1, L, L) mask prompt): computed once, reused by every click."""
        if mask_inputs is None:
            h, w = embedding.shape[-2:]
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                1, -1, h, w
            )
        else:
            dense = self.prompt_encoder._embed_masks(mask_inputs)
        return prepare_image_state(
            self.mask_decoder, embedding, dense.to(embedding.dtype), self._dense_pe(embedding.dtype)
        )

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Encode then decode: (B, 3, S, S) + (B, 4) boxes -> (B, 1, L, L) logits
        (automatic decoders without boxes: (B, num_classes, L, L))."""
        emb = self.encode(images)
        automatic = boxes is None and self.num_mask_outputs != 3
        logits, _ = self.decode(emb, boxes=boxes, multimask_output=automatic)
        return logits

    def _dense_pe(self, dtype: torch.dtype) -> torch.Tensor:
        """The prompt encoder's (1, C, h, w) positional encoding, computed once per encoder
        state (it depends only on a fixed random buffer), so a click does not recompute it."""
        buf = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (id(self.prompt_encoder), buf.data_ptr(), buf._version, buf.device, dtype)
        cached = getattr(self, "_pe_cache", None)
        if cached is None or cached[0] != key or torch.is_grad_enabled():
            with torch.no_grad():
                pe = self.prompt_encoder.get_dense_pe().to(dtype)
            self._pe_cache = (key, pe)
            return pe
        return cached[1]

    @torch.no_grad()
    def fuse_for_inference(self) -> SamModel:
        """Fold eval-mode BatchNorm into the preceding convolutions (TinyViT ``Conv2d_BN``).

        Saves about 10% of encoder time on CPU and changes no output beyond float rounding
        (tested). Irreversible: do not train a fused model. Returns self.
        """

        def _swap(parent: nn.Module) -> None:
            for name, child in parent.named_children():
                if type(child).__name__ == "Conv2d_BN" and hasattr(child, "fuse"):
                    # TinyViT's fuse() builds the new Conv2d on the default device: move it back
                    w = child.c.weight
                    setattr(parent, name, child.fuse().to(device=w.device, dtype=w.dtype))
                else:
                    _swap(child)

        self.eval()
        _swap(self.image_encoder)
        return self


def upscale_logits(
    logits: torch.Tensor, input_hw: tuple[int, int], original_hw: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Low-res logits -> logits on the original slice grid.

    Args:
        logits: (B, K, L, L) decoder output.
        input_hw: (h, w) of the resized (unpadded) image inside the S x S model input.
        original_hw: (H, W) of the source slice in pixels.
        image_size: S.

    Returns:
        (B, K, H, W) float logits (bilinear, as LiteMedSAM's own post-processing).
    """
    logits = logits.float()
    if logits.shape[-1] != image_size:  # SAM: 256 -> 1024 first, as segment-anything does
        logits = F.interpolate(
            logits, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    logits = logits[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(logits, size=original_hw, mode="bilinear", align_corners=False)
