"""Small builders shared by tests, benchmarks and notebooks: synthetic DomBatches and error metrics.

``batch_from_dom_sizes`` makes a DomBatch with exactly the DOM sizes asked for (edge cases such as all
one-pulse DOMs, one 455-pulse DOM, more than 65,535 DOMs); realistic batches come from
``iceaggr_lib.data.sample``.
"""

from __future__ import annotations

import numpy as np
import torch

from iceaggr_lib.collate import N_PULSE_FEATURES, DomBatch


def triton_kernel_device() -> str | None:
    """Where the Triton kernels (dom_fused, fused_projection) can be tested here: "cuda" on a GPU, "cpu" through
    Triton's interpreter (triton installed and ``TRITON_INTERPRET=1``), else None (the CI venv has no triton)."""
    import os

    from iceaggr_lib.backends.triton_launch import HAVE_TRITON
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if HAVE_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else None


def icecube_like_sizes(n_doms: int, seed: int, max_size: int = 455) -> np.ndarray:
    """DOM sizes (pulses per DOM) like IceCube's: ~78% one-pulse DOMs, a heavy (Pareto) tail clipped at
    ``max_size`` (the largest DOM of the Kaggle batch statistics, 455 pulses)."""
    rng = np.random.default_rng(seed)
    sizes = 2 + np.floor(rng.pareto(1.5, n_doms) * 3.0).astype(np.int64)
    sizes[rng.random(n_doms) < 0.78] = 1
    return np.minimum(sizes, max_size)


def batch_from_dom_sizes(dom_sizes, doms_per_event: int | None = None, seed: int = 0) -> DomBatch:
    """A DomBatch whose DOMs have the given pulse counts, in order, with random features.

    DOMs are grouped into events of ``doms_per_event`` (default: all in one event).
    """
    rng = np.random.default_rng(seed)
    counts = np.asarray(dom_sizes, dtype=np.int64)
    if counts.ndim != 1 or len(counts) == 0 or (counts < 1).any():
        raise ValueError("dom_sizes must be a non-empty 1-D list of counts >= 1")
    n_doms = len(counts)
    per_event = n_doms if doms_per_event is None else int(doms_per_event)
    event_dom_counts = np.full(n_doms // per_event, per_event, dtype=np.int64)
    if n_doms % per_event:
        event_dom_counts = np.append(event_dom_counts, n_doms % per_event)
    n_events = len(event_dom_counts)
    dom_to_event_idx = np.repeat(np.arange(n_events), event_dom_counts)
    event_pulse_counts = np.bincount(dom_to_event_idx, weights=counts, minlength=n_events).astype(np.int64)
    cu = np.concatenate([[0], np.cumsum(counts)])
    n = int(cu[-1])
    dom_ids = rng.integers(0, 5160, n_doms)
    return DomBatch(
        pulse_features=torch.from_numpy(rng.standard_normal((n, N_PULSE_FEATURES)).astype(np.float32)),
        pulse_to_dom_idx=torch.from_numpy(np.repeat(np.arange(n_doms), counts)),
        dom_pulse_counts=torch.from_numpy(counts),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        max_dom_pulses=int(counts.max()),
        dom_to_event_idx=torch.from_numpy(dom_to_event_idx),
        dom_ids=torch.from_numpy(dom_ids),
        dom_positions=torch.from_numpy(rng.uniform(-500, 500, (n_doms, 3)).astype(np.float32)),
        event_dom_counts=torch.from_numpy(event_dom_counts),
        event_pulse_counts=torch.from_numpy(event_pulse_counts),
        event_ids=torch.arange(n_events, dtype=torch.int64),
    )


# A backend that materialises every N x N score (flex_dense_eager on CPU) needs a bounded batch: one random
# 20-event sample in ten holds a bright event of up to ~48k pulses (the data's tail reaches 110k per event), whose
# fp32 scores for one head are ~9 GB before softmax's temporaries (a CI run here was OOM-killed at 24 GB).
DENSE_SCORE_MAX_PULSES = 6000


def realistic_batch(n_events: int, seed: int, max_pulses: int | None = None, tries: int = 100):
    """(batch, seed): the first ``n_events`` events of ``iceaggr_lib.data.sample.generate_table(n_events, seed)``;
    with ``max_pulses``, seeds ``seed``, ``seed + 1``, ... until the batch has at most that many pulses (a
    ValueError naming the bound after ``tries``)."""
    from iceaggr_lib.data.sample import generate_table

    for s in range(seed, seed + tries):
        batch = generate_table(n_events, s).batch(0, n_events)
        if max_pulses is None or batch.n_pulses <= max_pulses:
            return batch, s
    raise ValueError(f"realistic_batch: no {n_events}-event sample within {max_pulses} pulses in {tries} seeds "
                     f"from {seed}")


def random_qkv(n_pulses: int, n_heads: int, head_dim: int, dtype=torch.float32, device="cpu", seed: int = 0,
               requires_grad: bool = False):
    """Fresh random (N, H, Dh) q, k, v (never zeros: zeros hide unwritten outputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        t = torch.randn(n_pulses, n_heads, head_dim, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        out.append(t.requires_grad_(requires_grad))
    return tuple(out)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf, so it never passes a tolerance."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = torch.linalg.vector_norm(ref64)
    return float(torch.linalg.vector_norm(out64 - ref64) / (denom if denom > 0 else 1.0))


def reference_errors(attend, batch, q, k, v, grad_out, scale: float) -> list[float]:
    """Relative errors of ``attend(q, k, v)`` and of its q, k, v gradients (for the upstream gradient
    ``grad_out``) against the float64 ``reference`` backend on the same batch: [out, dq, dk, dv].
    ``q, k, v`` must require grad; the reference runs where they live."""
    from iceaggr_lib.backends import get_backend

    out = attend(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = get_backend("reference")
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out_ref = ref.attend(q64, k64, v64, batch, ref.prepare(batch, q.shape[1], q.shape[2], torch.float64), scale)
    grads_ref = torch.autograd.grad(out_ref, (q64, k64, v64), grad_out.double())
    return [rel_err(out, out_ref)] + [rel_err(g, r) for g, r in zip(grads, grads_ref)]


# Tolerances of the developers' guide: fp32 with tf32 off, and bf16 (fp16 treated like bf16).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}
