"""The ``loop`` backend: one attention call per DOM in Python — the seed's slow baseline, kept on purpose.

For each DOM d, ``F.scaled_dot_product_attention`` (``sdpa.sdpa``: the math kernel for fp32 on the CPU)
runs on its rows ``cu_seqlens[d]:cu_seqlens[d+1]`` as a (1, H, n, Dh) problem and the n output rows are
averaged. ``prepare`` copies the DOM boundaries to
the host once (a Python list), so the loop itself does no device-to-host syncs. The cost is dominated by
~D kernel launches and Python overhead: this is what the seed's "baseline" measured.
"""

from __future__ import annotations

import torch

from iceaggr_lib.backends import MODES, BackendSpec
from iceaggr_lib.backends.sdpa import sdpa
from iceaggr_lib.collate import DomBatch


def prepare(batch: DomBatch, n_heads: int, head_dim: int, dtype: torch.dtype):
    return batch.cu_seqlens.tolist()


def attend(q, k, v, batch: DomBatch, prep, scale: float):
    cu = prep
    outs = []
    for d in range(len(cu) - 1):  # deliberately one call per DOM
        s, e = cu[d], cu[d + 1]
        qd, kd, vd = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, n, Dh)
        out = sdpa(qd, kd, vd, scale=scale)
        outs.append(out[0].mean(dim=1))  # (H, Dh)
    return torch.stack(outs)


SPEC = BackendSpec(
    name="loop",
    description="one SDPA call per DOM in a Python loop (the seed's baseline)",
    devices=frozenset({"cpu", "cuda"}),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
    modes=frozenset(MODES),
    attend=attend,
    prepare=prepare,
)
