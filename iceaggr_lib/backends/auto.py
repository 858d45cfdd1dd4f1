"""auto: pick the fastest backend for the regime (device, dtype) — dom_fused where it runs, else padded.

How it picks
------------
On CUDA with Triton installed and a power-of-two head_dim >= 16, ``dom_fused`` was the fastest in
every measured regime (16 to 4,096 events, bf16 and fp32, 1x128 and 8x16 heads; numbers in
docs/dom_fused_notes.md), so it is chosen there. Everywhere else (CPU, float64, odd head sizes)
``padded`` — the one library path that runs on CPU in forward and backward and in every dtype.
The choice is made per call from the inputs; ``prepare`` returns the chosen backend's prep.
"""

from __future__ import annotations

import torch

from iceaggr_lib.backends import MODES, BackendSpec, get_backend


def choose(device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str:
    """The backend name auto uses for this device type, dtype and head size."""
    from iceaggr_lib.backends import dom_fused
    fused_ok = (torch.device(device).type == "cuda" and dom_fused.HAVE_TRITON
                and dtype in get_backend("dom_fused").dtypes and head_dim >= 16 and not head_dim & (head_dim - 1))
    return "dom_fused" if fused_ok else "padded"


def prepare(batch, n_heads: int, head_dim: int, dtype: torch.dtype):
    name = choose(batch.device, dtype, head_dim)
    return name, get_backend(name).prepare(batch, n_heads, head_dim, dtype)


def attend(q, k, v, batch, prep, scale: float):
    name, inner = prep
    if name != choose(q.device, q.dtype, q.shape[-1]):  # prep made for another regime: redo it
        name = choose(q.device, q.dtype, q.shape[-1])
        inner = get_backend(name).prepare(batch, q.shape[1], q.shape[2], q.dtype)
    return get_backend(name).attend(q, k, v, batch, inner, scale)


SPEC = BackendSpec(
    name="auto",
    description="dom_fused on CUDA (Triton), padded elsewhere",
    devices=frozenset({"cpu", "cuda"}),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16, torch.float64}),
    modes=frozenset(MODES),
    attend=attend,
    prepare=prepare,
)
