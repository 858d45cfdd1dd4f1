"""DOMAggregator: one embedding per DOM from its pulses (the seed's DOMTransformer, backend as an argument).

    pulse_features (N, 6) --Linear--> (N, d_model) --Linear--> q, k, v (N, H, Dh), Dh = d_model / H
        --dom_attention(backend)--> attention within each DOM, mean-pooled: (D, H, Dh) --> (D, d_model)

The attention backend is any name of ``iceaggr_lib.backends`` (``available_backends()``); all compute the
same function, so swapping them changes speed and memory, not results (up to the dtype's rounding).
``project_qkv`` is exposed so that benchmarks can time the attention alone on the model's own q, k, v.
The ``reference`` backend returns float64; its output is cast back to the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from iceaggr_lib.backends import dom_attention, get_backend
from iceaggr_lib.collate import N_PULSE_FEATURES, DomBatch


class DOMAggregator(nn.Module):
    def __init__(self, n_features: int = N_PULSE_FEATURES, d_model: int = 128, n_heads: int = 1,
                 backend: str = "padded"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        get_backend(backend)  # unknown names fail here, with the list of known ones
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.backend = backend
        self.pulse_embed = nn.Linear(n_features, d_model)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)

    def project_qkv(self, batch: DomBatch):
        """q, k, v (N, H, Dh) of the batch's pulses."""
        x = batch.pulse_features.to(device=self.qkv_proj.weight.device, dtype=self.qkv_proj.weight.dtype)
        qkv = self.qkv_proj(self.pulse_embed(x))
        q, k, v = qkv.view(-1, 3, self.n_heads, self.head_dim).unbind(dim=1)
        return q, k, v

    def prepare(self, batch: DomBatch) -> Any:
        """The backend's per-batch set-up (pass it to ``forward`` to reuse it)."""
        return get_backend(self.backend).prepare(batch, self.n_heads, self.head_dim, self.qkv_proj.weight.dtype)

    def forward(self, batch: DomBatch, prep: Any = None) -> torch.Tensor:
        """(D, d_model) mean-pooled DOM embeddings."""
        q, k, v = self.project_qkv(batch)
        mode = "forward_backward" if torch.is_grad_enabled() and q.requires_grad else "forward"
        out = dom_attention(q, k, v, batch, backend=self.backend, mode=mode, prep=prep)
        return out.reshape(batch.n_doms, self.d_model).to(q.dtype)
