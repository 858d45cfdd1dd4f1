"""``F.scaled_dot_product_attention`` as the ``loop`` and ``padded`` backends call it.

Why not plain SDPA: on the CPU torch picks its flash-attention kernel for fp32, and that kernel's backward
loses accuracy where a DOM's gradient cancels: on a one-event batch whose only multi-pulse DOM has two
pulses (``tests/test_backends.py::test_cpu_one_event``, seed 1567921317, torch 2.13 CPU) its dq is off by
3.8e-5 relative to the float64 reference, the math kernel's by 9.4e-7 (the textbook computation in fp32:
9.3e-7), and the fp32 tolerance is 1e-5. So on the CPU, fp32 and fp64 calls go through the math kernel;
bf16 / fp16 (tolerance 1e-2) and every CUDA call keep torch's own choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa(q, k, v, attn_mask=None, scale=None):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)``, through the math kernel
    for fp32 / fp64 on the CPU (see the module docstring)."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
