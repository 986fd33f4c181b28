"""A per-token logit bias in the U-Net's cross-attention: how a neighbour gets a weight.

LDM cross-attention does not normalise its context, so scaling a neighbour's vector would change the attention's
temperature as well as its share. A bias of log(w) on that token's logits is exactly the same as repeating the
token w times (softmax(s + log w) puts w times the mass on the same value vector), so w = 2 counts a neighbour
twice, w = 0.5 half, and w = 0 (a bias of -inf) removes it. The query's own token keeps bias 0.

`context_bias(unet)` wraps every attention processor of a diffusers U-Net for the duration of a sampling call; the
wrapper adds `context_bias` (B, T), passed through `cross_attention_kwargs`, to the cross-attention mask and
leaves self-attention alone. Outside the block the U-Net's own processors are back, untouched.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class ContextBiasProcessor:
    """Wraps a diffusers attention processor: cross-attention gets `context_bias` (B, T) added to its logits."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 context_bias: torch.Tensor | None = None, **kwargs):
        if context_bias is not None and encoder_hidden_states is not None and attn.is_cross_attention:
            bias = context_bias[:, None, :].to(hidden_states.dtype)  # (B, 1, T): the same for every query position
            attention_mask = bias if attention_mask is None else attention_mask + bias
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


@contextmanager
def context_bias(unet):
    """The U-Net with ContextBiasProcessor around each processor, restored on exit."""
    original = unet.attn_processors
    unet.set_attn_processor({name: ContextBiasProcessor(p) for name, p in original.items()})
    try:
        yield unet
    finally:
        unet.set_attn_processor(original)


def weight_bias(weights: torch.Tensor) -> torch.Tensor:
    """log(w) per token (B, T): 0 for w = 1, -inf for w = 0."""
    if (weights < 0).any() or not torch.isfinite(weights).all():
        raise ValueError("neighbour weights must be finite and >= 0")
    return torch.log(weights)
