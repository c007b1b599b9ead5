"""Softmax and fused scaled-dot-product attention."""
from __future__ import annotations


class SoftmaxKernel:
    """``softmax`` / ``log_softmax`` along ``dim`` (the output is saved as ``result``)."""

    def __init__(self, log: bool = False):
        self.log = log


class LogsumexpKernel:
    """``logsumexp(x, dim)`` (the output is saved as ``result``, the input as ``self``): the log-partition of a
    softmax, a smooth maximum. ``log = True`` marks it as no source of attention weights."""

    log = True


class AttentionKernel:
    """Fused ``scaled_dot_product_attention`` nodes (CPU flash, math-free CUDA flash/efficient/cuDNN).

    Inputs are ``(query, key, value[, attn_mask/bias])``; the node's own backward gives gradients that the
    AttnLRP and CP-LRP rules rescale.
    """

    output_field = "output"
