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
    """Fused ``scaled_dot_product_attention`` nodes (CPU flash; CUDA flash, memory-efficient and cuDNN).

    Inputs are ``(query, key, value[, attn_mask/bias])``; the node's own backward gives gradients that the
    AttnLRP and CP-LRP rules rescale. Every backend saves ``query``, ``key``, ``value`` and ``output``; the mask
    and the log-sum-exp are saved under backend-specific names (``mask_field``, ``lse_field``; ``None``: the
    backend takes no mask).
    """

    output_field = "output"

    def __init__(self, mask_field: str | None = "attn_mask", lse_field: str = "logsumexp"):
        self.mask_field = mask_field
        self.lse_field = lse_field

    @property
    def fields(self) -> tuple[str, ...]:
        """The saved fields of the backend (checked against torch's generated node classes by the tests)."""
        return ("query", "key", "value", "output", self.lse_field) + ((self.mask_field,) if self.mask_field else ())
