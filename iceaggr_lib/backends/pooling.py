"""Mean pooling of per-pulse rows into one row per DOM, shared by every backend.

``mean_pool_packed`` takes packed (N, H, Dh) per-pulse rows (the layout of ``iceaggr_lib.collate``) and
averages each DOM's contiguous run of rows: one ``index_add_`` over ``pulse_to_dom_idx`` (a segment sum,
no loop over DOMs) divided by the DOM's pulse count. Sums are accumulated in float32 at least, so bf16 and
fp16 inputs do not lose precision to atomic additions in half precision; the result is cast back.

``mean_pool_padded`` does the same for (D, H, L, Dh) rows padded to L pulses per DOM (the padded backend),
where only the first ``dom_pulse_counts[d]`` rows of DOM d are real.

Both are differentiable (autograd goes through ``index_add_`` and the masked sum).
"""

from __future__ import annotations

import torch

from iceaggr_lib.collate import DomBatch


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def mean_pool_packed(x: torch.Tensor, batch: DomBatch) -> torch.Tensor:
    """(N, H, Dh) per-pulse rows -> (D, H, Dh) mean over each DOM's pulses."""
    acc = _accumulation_dtype(x.dtype)
    sums = torch.zeros((batch.n_doms,) + tuple(x.shape[1:]), dtype=acc, device=x.device)
    sums = sums.index_add(0, batch.pulse_to_dom_idx, x.to(acc))
    counts = batch.dom_pulse_counts.to(device=x.device, dtype=acc).view(-1, *([1] * (x.dim() - 1)))
    return (sums / counts).to(x.dtype)


def mean_pool_padded(x: torch.Tensor, valid: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(D, H, L, Dh) padded rows, ``valid`` (D, L) bool, ``counts`` (D,) -> (D, H, Dh) mean over real rows."""
    acc = _accumulation_dtype(x.dtype)
    summed = (x.to(acc) * valid[:, None, :, None].to(acc)).sum(dim=2)
    return (summed / counts.to(acc)[:, None, None]).to(x.dtype)
