"""PyTorch's own transformer layers: ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``,
``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and ``nn.Transformer``.

Their forwards cannot be traced by fx: they choose a fused fast path by branching on tensor
properties (``src.dim()``, ``is_nested``, mask values). Each gets a traceable stand-in that computes
what the module's own slow path computes, through the same children (``nn.MultiheadAttention``,
``nn.Linear``, ``nn.LayerNorm``), so the rules of those children couple the channels: the
feed-forward width of each layer prunes on its own; attention heads go together with the model width
(``nn.MultiheadAttention`` ties its head dims to its input width). Masks are handed to the
attention modules, which canonicalise them exactly as the layers would.

The stand-ins only shape the captured graph. The pruned model runs the modules' own forwards, so
in eval mode the fused fast path is still taken wherever PyTorch would take it: the updaters keep
what its conditions read (``self_attn.num_heads``, ``embed_dim``) in step with the weights.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .registry import register_op


def encoder_layer_forward(layer: nn.TransformerEncoderLayer, src: Tensor, src_mask: Optional[Tensor] = None,
                          src_key_padding_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """``nn.TransformerEncoderLayer.forward`` without the fast-path checks (its slow path)."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def encoder_forward(encoder: nn.TransformerEncoder, src: Tensor, mask: Optional[Tensor] = None,
                    src_key_padding_mask: Optional[Tensor] = None, is_causal: Optional[bool] = None) -> Tensor:
    """``nn.TransformerEncoder.forward`` without the nested-tensor conversion: each layer in turn,
    then the optional final norm. ``is_causal=None`` with a mask only hints at the mask's form; the
    mask itself is what the attention applies."""
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return output if encoder.norm is None else encoder.norm(output)


def decoder_forward(decoder: nn.TransformerDecoder, tgt: Tensor, memory: Tensor, tgt_mask: Optional[Tensor] = None,
                    memory_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                    memory_key_padding_mask: Optional[Tensor] = None, tgt_is_causal: Optional[bool] = None,
                    memory_is_causal: bool = False) -> Tensor:
    """``nn.TransformerDecoder.forward`` without reading the sequence length off the input."""
    output = tgt
    for layer in decoder.layers:
        output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                       tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                       tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return output if decoder.norm is None else decoder.norm(output)


def transformer_forward(model: nn.Transformer, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None,
                        tgt_mask: Optional[Tensor] = None, memory_mask: Optional[Tensor] = None,
                        src_key_padding_mask: Optional[Tensor] = None, tgt_key_padding_mask: Optional[Tensor] = None,
                        memory_key_padding_mask: Optional[Tensor] = None, src_is_causal: Optional[bool] = None,
                        tgt_is_causal: Optional[bool] = None, memory_is_causal: bool = False) -> Tensor:
    """``nn.Transformer.forward`` without its input checks (batch sizes and widths that disagree
    fail inside the layers instead)."""
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return model.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


def update_transformer(module: nn.Transformer, old: dict) -> None:
    """``d_model`` follows the width of the layers it was built with."""
    module.d_model = module.encoder.layers[0].self_attn.embed_dim


register_op(nn.TransformerEncoderLayer, traced_forward=encoder_layer_forward)
register_op(nn.TransformerEncoder, traced_forward=encoder_forward)
register_op(nn.TransformerDecoder, traced_forward=decoder_forward)
register_op(nn.Transformer, traced_forward=transformer_forward, update=update_transformer)
# its own forward has no fast path and traces as it is: it only needs to be traced into, not kept a leaf
register_op(nn.TransformerDecoderLayer, traced_forward=nn.TransformerDecoderLayer.forward)
