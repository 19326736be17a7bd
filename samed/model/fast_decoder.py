"""An exact, cheaper evaluation of SAM's mask decoder for interactive clicks.

SAM's ``MaskDecoder`` runs a two-way transformer between a handful of prompt tokens (N ~ 5-15)
and M = 64 x 64 = 4096 image tokens of width C = 256. Nearly all of its cost is on the image
side: every attention layer projects all M image tokens (an (M, C) x (C, D) matmul each for
q/k/v/out), about 1.3 G multiply-adds per click. Two facts make most of that unnecessary:

1. **Nothing on the image side of layer 0 depends on the prompt until layer 0's image-to-token
   attention.** With no mask prompt, ``src = embedding + no_mask_embed`` is fixed per slice, and
   so are layer 0's token-to-image keys/values and its image-to-token queries. They are
   computed once per slice (:func:`prepare_image_state`) and reused by every click.
2. **The projections are linear and the token side is tiny, so they can be moved to the token
   side** (re-association of matrix products, exact in real arithmetic):

   * token-to-image scores ``q_h (W_k,h x + b_k,h)^T = (q_h W_k,h) x^T + q_h . b_k,h``; the
     second term is constant along the softmax axis and drops out;
     values ``A_h (x W_v,h^T + b_v,h) = (A_h x) W_v,h^T + b_v,h`` since softmax rows sum to 1;
   * image-to-token scores ``(x W_q,h^T + b_q,h) k_h^T = x (W_q,h^T k_h^T) + b_q,h k_h^T``;
     output ``concat_h(A_h v_h) W_o^T = sum_h A_h (v_h W_o,h^T)``.

   Each (M, C) x (C, D) projection becomes an (M, C) x (C, H*N) product with H*N = 8 heads x
   ~7 tokens = 56 < D = 128.

The result equals ``MaskDecoder.forward`` to float rounding (tests compare within 1e-4 on the
real LiteMedSAM weights). Only the needed mask tokens go through the hypernetwork MLPs, and the
two stride-2 transposed convolutions run as matmuls on sub-pixel rows (no pixel shuffle).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_CHUNK_TOKENS = 1024

__all__ = ["ImageState", "prepare_image_state", "fast_mask_decoder", "decoder_fingerprint"]


@dataclass
class ImageState:
    """Prompt-independent tensors of one slice for one decoder (see module docstring).

    Shapes (M = h*w image tokens, C = transformer width, D = attention internal width):
    ``x`` (1, M, C) image tokens (embedding + dense prompt), ``pe`` (1, M, C) positional
    encoding, ``k0``/``v0`` (1, M, D) layer 0 token-to-image keys/values, ``q0t`` (H, D/H, M)
    layer 0 image-to-token queries, transposed per head (H heads); ``hw`` = (h, w);
    ``fingerprint`` ties it to the decoder's
    weights (see :func:`decoder_fingerprint`).
    """

    x: torch.Tensor
    pe: torch.Tensor
    k0: torch.Tensor
    v0: torch.Tensor
    q0t: torch.Tensor
    hw: tuple[int, int]
    fingerprint: tuple


def decoder_fingerprint(decoder: nn.Module) -> tuple:
    """Identity + in-place version of every decoder parameter: changes whenever the weights do
    (optimizer step, adapter switch, ``load_state_dict``), so a stale :class:`ImageState` is
    never reused."""
    return tuple((p.data_ptr(), _version(p)) for p in decoder.parameters())


def _version(p: torch.Tensor) -> int:
    try:
        return p._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _heads(w: torch.Tensor, h: int) -> torch.Tensor:
    """(D, C) projection weight -> (h, D/h, C) per-head rows."""
    return w.reshape(h, w.shape[0] // h, w.shape[1])


@torch.no_grad()
def prepare_image_state(
    decoder: nn.Module, embedding: torch.Tensor, dense: torch.Tensor, image_pe: torch.Tensor
) -> ImageState:
    """Precompute the prompt-independent part of the decoder for one slice (inference only:
    no gradients flow through the state).

    Args:
        decoder: a SAM ``MaskDecoder`` (TwoWayTransformer inside).
        embedding: (1, C, h, w) image embedding.
        dense: (1, C, h, w) dense prompt embedding (no-mask embedding or a mask prompt's).
        image_pe: (1, C, h, w) dense positional encoding.
    """
    if embedding.ndim != 4 or embedding.shape[0] != 1:
        raise ValueError(f"embedding must be (1, C, h, w); got {tuple(embedding.shape)}")
    layer0 = decoder.transformer.layers[0]
    c, h, w = embedding.shape[-3:]
    # token-major (1, M, C) tensors: every later per-click pass over them is then contiguous;
    # each is written in one pass from the channel-major inputs
    x = torch.empty(1, h * w, c, dtype=embedding.dtype, device=embedding.device)
    torch.add(embedding.flatten(2).transpose(1, 2), dense.flatten(2).transpose(1, 2), out=x)
    pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    xp = x + pe
    t2i, i2t = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
    # image-to-token queries, transposed per head: (H, d, M) = W_q (D, C) x xp^T (C, M) + b_q
    q0t = torch.addmm(i2t.q_proj.bias[:, None], i2t.q_proj.weight, xp[0].T)
    return ImageState(
        x=x,
        pe=pe,
        k0=t2i.k_proj(xp),
        v0=t2i.v_proj(x),
        q0t=q0t.reshape(i2t.num_heads, i2t.internal_dim // i2t.num_heads, -1),
        hw=(int(h), int(w)),
        fingerprint=decoder_fingerprint(decoder),
    )


def _token_to_image(
    attn: nn.Module, q_in: torch.Tensor, x: torch.Tensor, xp: torch.Tensor
) -> torch.Tensor:
    """Attention(q=q_in, k=xp, v=x) for tokens q_in (B, N, C) over image tokens x, xp
    (B or 1, M, C), evaluated on the token side."""
    nh = attn.num_heads
    b, n, _ = q_in.shape
    q = attn.q_proj(q_in)  # (B, N, D)
    d = q.shape[-1] // nh
    qh = q.reshape(b, n, nh, d).transpose(1, 2)  # (B, H, N, d)
    g = torch.matmul(qh, _heads(attn.k_proj.weight, nh))  # (B, H, N, C)
    g = g.reshape(b, nh * n, -1) / math.sqrt(d)
    scores = torch.matmul(g, xp.transpose(1, 2))  # (B, H*N, M)
    a = torch.softmax(scores, dim=-1)
    ax = torch.matmul(a, x).reshape(b, nh, n, -1)  # (B, H, N, C)
    out = torch.matmul(ax, _heads(attn.v_proj.weight, nh).transpose(1, 2))  # (B, H, N, d)
    out = out + attn.v_proj.bias.reshape(nh, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, nh * d))


def _token_to_image_cached(
    attn: nn.Module, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Attention(q=q_in, ...) with the image-side keys/values k, v (1, M, D) already projected."""
    nh = attn.num_heads
    b, n, _ = q_in.shape
    q = attn.q_proj(q_in)
    d = q.shape[-1] // nh
    qh = q.reshape(b, n, nh, d).transpose(1, 2)
    kh = k.reshape(1, -1, nh, d).transpose(1, 2)
    vh = v.reshape(1, -1, nh, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh.expand(b, -1, -1, -1), vh.expand(b, -1, -1, -1))
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, nh * d))


def _image_to_token(
    attn: nn.Module,
    xp: torch.Tensor | None,
    q0t: torch.Tensor | None,
    t_k: torch.Tensor,
    t_v: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """``residual`` + Attention(q=image tokens, k=t_k, v=t_v) with tokens t_k, t_v (B, N, C)
    -> (B, M, C), evaluated on the token side. Either ``q0t`` (H, d, M) is the already projected
    query (transposed per head) or ``xp`` (B|1, M, C) is projected implicitly. Scores are laid out
    (B, H, N, M) so that the softmax over the few tokens runs along a long contiguous axis.

    The output bias is folded into the values: each head's softmax row sums to 1, so
    ``A (u + b/H) = A u + b`` (H heads); the residual (B|1, M, C) is the product's accumulator,
    which saves two passes over the (M, C) tensor."""
    nh = attn.num_heads
    b, n, _ = t_k.shape
    k = attn.k_proj(t_k)  # (B, N, D)
    v = attn.v_proj(t_v)
    d = k.shape[-1] // nh
    kh = k.reshape(b, n, nh, d).transpose(1, 2)  # (B, H, N, d)
    vh = v.reshape(b, n, nh, d).transpose(1, 2)
    scale = 1.0 / math.sqrt(d)
    if q0t is not None:
        scores = torch.matmul(kh, q0t)  # (B, H, N, M)
    else:
        g = torch.matmul(kh, _heads(attn.q_proj.weight, nh))  # (B, H, N, C): k_h W_q,h
        c = torch.matmul(kh, attn.q_proj.bias.reshape(nh, d, 1))  # (B, H, N, 1): k_h . b_q,h
        xt = xp.transpose(1, 2) if xp.shape[0] == b else xp.transpose(1, 2).expand(b, -1, -1)
        scores = torch.baddbmm(c.reshape(b, nh * n, 1), g.reshape(b, nh * n, -1), xt)
        scores = scores.reshape(b, nh, n, -1)
    a = torch.softmax(scores * scale, dim=2).reshape(b, nh * n, -1)  # (B, H*N, M)
    wo = attn.out_proj.weight.reshape(-1, nh, d).permute(1, 2, 0)  # (H, d, C)
    u = torch.matmul(vh, wo).reshape(b, nh * n, -1)  # (B, H*N, C): v_h W_o,h^T
    u = u + attn.out_proj.bias / nh
    return torch.baddbmm(residual.expand(b, -1, -1), a.transpose(1, 2), u)


def _conv_t_matrix(conv: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cin, 4*Cout) weight and (4*Cout,) bias of a stride-2 2x2 transposed convolution, output
    columns ordered (sub-row a, sub-column c, channel o)."""
    wt = conv.weight  # (Cin, Cout, 2, 2)
    cin, cout = wt.shape[:2]
    w = wt.permute(0, 2, 3, 1).reshape(cin, 4 * cout)
    bias = conv.bias if conv.bias is not None else wt.new_zeros(cout)
    return w, bias.repeat(4)


def _is_sam_upscaling(seq: nn.Module) -> bool:
    mods = list(seq)
    return (
        len(mods) == 5
        and all(
            isinstance(mods[i], nn.ConvTranspose2d)
            and mods[i].kernel_size == (2, 2)
            and mods[i].stride == (2, 2)
            and mods[i].padding == (0, 0)
            and mods[i].output_padding == (0, 0)
            and mods[i].groups == 1
            and mods[i].dilation == (1, 1)
            for i in (0, 3)
        )
        and type(mods[1]).__name__ == "LayerNorm2d"
        and all(isinstance(mods[i], nn.GELU) and mods[i].approximate == "none" for i in (2, 4))
    )


def _masks(
    decoder: nn.Module, keys: torch.Tensor, hw: tuple[int, int], hyper: torch.Tensor
) -> torch.Tensor:
    """Mask logits (B, K, 4h, 4w) = hyper (B, K, C') . output_upscaling(keys (B, M, C)).

    SAM's upscaling (ConvT 2x2/2 -> LayerNorm2d -> GELU -> ConvT 2x2/2 -> GELU) is per-pixel
    after each transposed convolution, so it runs on (B, h, w, sub-pixels, channels) without
    any pixel shuffle; only the K-channel result is rearranged to (4h, 4w) at the end."""
    seq = decoder.output_upscaling
    b = keys.shape[0]
    h, w = hw
    if not _is_sam_upscaling(seq):
        up = seq(keys.transpose(1, 2).reshape(b, -1, h, w))  # (B, C', 4h, 4w)
        return torch.matmul(hyper, up.flatten(2)).reshape(b, -1, 4 * h, 4 * w)
    c1, ln, act1, c2, act2 = list(seq)
    w1, b1 = _conv_t_matrix(c1)
    w2, b2 = _conv_t_matrix(c2)
    k = hyper.shape[1]
    ht = hyper.transpose(1, 2)  # (B, C', K)
    parts = []
    # in chunks of image rows so that the 16x larger intermediates stay in cache
    for kc in keys.split(_CHUNK_TOKENS, dim=1):
        mc = kc.shape[1]
        y = torch.addmm(b1, kc.reshape(b * mc, -1), w1).reshape(
            b, mc * 4, -1
        )  # rows (i, j, a1, c1)
        y = act1(F.layer_norm(y, ln.weight.shape, ln.weight, ln.bias, ln.eps))
        y = act2(torch.addmm(b2, y.reshape(b * mc * 4, -1), w2)).reshape(
            b, mc * 4, -1
        )  # (a2, c2, o)
        parts.append(torch.matmul(y.reshape(b, mc * 16, -1), ht))  # rows (i, j, a1, c1, a2, c2)
    out = torch.cat(parts, dim=1)  # (B, M*16, K)
    out = out.reshape(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return out.reshape(b, k, 4 * h, 4 * w)


def fast_mask_decoder(
    decoder: nn.Module,
    state: ImageState,
    sparse: torch.Tensor,
    multimask_output: bool,
    all_outputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder(image_embeddings, image_pe, sparse, dense, multimask_output)`` for one slice.

    Args:
        decoder: the SAM ``MaskDecoder`` the state was prepared with.
        state: from :func:`prepare_image_state` (same weights: checked).
        sparse: (B, N, C) sparse prompt embeddings (B prompts on the same slice).
        multimask_output: as in ``MaskDecoder.forward``.
        all_outputs: every output token instead (the single-mask output first, then each
            multimask output: ``MaskDecoder.predict_masks``), for one pass over all answers.

    Returns:
        (masks (B, K, 4h, 4w) logits, iou predictions (B, K)).
    """
    if state.fingerprint != decoder_fingerprint(decoder):
        raise ValueError(
            "the ImageState was prepared with different decoder weights; prepare it again"
        )
    tr = decoder.transformer
    b = sparse.shape[0]
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat(
        [out_tokens.unsqueeze(0).expand(b, -1, -1), sparse.to(out_tokens.dtype)], dim=1
    )
    queries, tpe = tokens, tokens
    keys, pe = state.x, state.pe
    for i, layer in enumerate(tr.layers):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tpe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        keys_pe = None if i == 0 else keys + pe
        if i == 0:
            attn = _token_to_image_cached(
                layer.cross_attn_token_to_image, queries + tpe, state.k0, state.v0
            )
        else:
            attn = _token_to_image(layer.cross_attn_token_to_image, queries + tpe, keys, keys_pe)
        queries = layer.norm2(queries + attn)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tpe
        i2t = layer.cross_attn_image_to_token
        if i == 0:
            keys = layer.norm4(_image_to_token(i2t, None, state.q0t, q, queries, keys))
        else:
            keys = layer.norm4(_image_to_token(i2t, keys_pe, None, q, queries, keys))
    n_out = decoder.num_mask_tokens
    if all_outputs:
        wanted = range(0, n_out)
    else:
        wanted = range(1, n_out) if multimask_output else range(0, 1)
    # The final attention acts on each query token on its own, and only the IoU token and the
    # wanted mask tokens are read after it: attend with those rows only.
    rows = [0, *(1 + k for k in wanted)]
    q_out = queries[:, rows]
    attn = _token_to_image(tr.final_attn_token_to_image, q_out + tpe[:, rows], keys, keys + pe)
    hs = tr.norm_final_attn(q_out + attn)  # (B, 1 + len(wanted), C)
    hyper = torch.stack(
        [decoder.output_hypernetworks_mlps[k](hs[:, 1 + i, :]) for i, k in enumerate(wanted)], dim=1
    )
    masks = _masks(decoder, keys, state.hw, hyper)
    iou = decoder.iou_prediction_head(hs[:, 0, :])[:, wanted.start : wanted.stop]
    return masks, iou
