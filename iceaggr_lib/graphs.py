"""CUDA-graph replay of the whole DOM layer forward for small, launch-bound batches.

At 16 events (~1.2k pulses) the layer's forward is a handful of tiny kernels (embed, qkv projection,
the fused attention + pool) and costs mostly launch overhead and Python. ``GraphedDomForward``
captures that forward once per *pulse bucket* (``bucket_for``: by default the powers of two and three sizes
evenly between two of them, ``Nb >= N``) into a CUDA graph and then replays it: one graph launch per batch.
The two input projections run as one Triton launch where they can (``fused_projection``).

Shapes in a graph are fixed, so a batch is padded to its bucket on the host side, where it is built
anyway (``pad_to_bucket``): the ``Nb - N`` padding pulses become one-pulse DOMs ``D .. D+Nb-N-1``
(zero features), and DOM slots beyond those get zero pulses (no row maps to them, so nothing is
computed for them). The graph computes ``(Nb, d_model)`` rows; the first ``D`` are the batch's DOM
embeddings. Padding never changes a real DOM's result: attention stays inside each DOM.

Use: ``g = GraphedDomForward(model)``; ``staged = g.stage(batch)`` (copies the padded batch into the
bucket's static buffers, non-blocking); ``out = g.replay(staged)`` -> (D, d_model), a view into the
graph's static output (clone it to keep it past the next replay). ``g(batch)`` does both.
Forward only (inference / evaluation); training uses the model directly, where dom_fused replays its own
launches from graphs per pulse bucket (``backends/dom_graphs.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from iceaggr_lib.backends.dom_fused import dom_fused_attention
from iceaggr_lib.backends.dom_graphs import bucket_for  # (the layer's buckets are dom_graphs' bucket sizes)
from iceaggr_lib.collate import DomBatch
from iceaggr_lib.fused_projection import fused_qkv, supports


def pad_to_bucket(batch: DomBatch, n_bucket: int):
    """Host-side padded (features, cu_seqlens, pulse_to_dom_idx, dom_pulse_counts) for a bucket of n_bucket rows.

    Works on CPU tensors (vectorised numpy); ``n_bucket`` rows and ``n_bucket`` DOM slots.
    """
    n, d = batch.n_pulses, batch.n_doms
    if n > n_bucket:
        raise ValueError(f"batch of {n} pulses does not fit the {n_bucket}-row bucket")
    n_pad = n_bucket - n
    feats = np.zeros((n_bucket, batch.pulse_features.shape[1]), dtype=np.float32)
    feats[:n] = batch.pulse_features.cpu().numpy()
    counts = np.zeros(n_bucket, dtype=np.int64)
    counts[:d] = batch.dom_pulse_counts.cpu().numpy()
    counts[d:d + n_pad] = 1
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    dom = np.empty(n_bucket, dtype=np.int64)
    dom[:n] = batch.pulse_to_dom_idx.cpu().numpy()
    dom[n:] = d + np.arange(n_pad)
    return (torch.from_numpy(feats), torch.from_numpy(cu), torch.from_numpy(dom), torch.from_numpy(counts))


class GraphedDomForward:
    """Replays ``model`` (a ``DOMAggregator`` with backend 'dom_fused') forward from one CUDA graph per bucket.
    ``attention_config``: dom_fused config keys for the captured attention (``dom_fused._default_config``).
    ``steps_per_octave``: the bucket spacing (``bucket_for``; 4: a 1,030-pulse batch replays a 1,280-row graph
    instead of a 2,048-row one, fp32 33.5 -> 29.4 µs per replay, run 73). ``fused_projection``: the two input
    projections as one Triton launch (``fused_projection.fused_qkv``) instead of two cuBLAS GEMMs; "auto" =
    wherever it applies."""

    def __init__(self, model, min_bucket: int = 256, warmup: int = 3, attention_config: dict | None = None,
                 steps_per_octave: int = 4, fused_projection="auto"):
        self.model = model
        # (graphs=False: this layer graph holds the attention's launches; dom_graphs' own would be captured once
        # more, on the warm-up's side stream, for nothing)
        self.attention_config = {"graphs": False, **(attention_config or {})}
        self.min_bucket = min_bucket
        self.steps_per_octave = steps_per_octave
        if fused_projection not in ("auto", True, False):
            raise ValueError(f"GraphedDomForward: fused_projection must be True, False or 'auto', got {fused_projection!r}")
        can_fuse = model.qkv_proj.weight.is_cuda and supports(model.pulse_embed, model.qkv_proj)
        if fused_projection is True and not can_fuse:
            raise ValueError("GraphedDomForward: fused_projection=True needs triton and the model on CUDA in fp32 or "
                             "bf16 (iceaggr_lib.fused_projection.supports)")
        self.fused_projection = can_fuse if fused_projection == "auto" else fused_projection
        self.warmup = warmup
        self.graphs: dict[int, tuple] = {}  # bucket -> (graph, static inputs, static output)
        self.captures = 0  # how many graphs were captured (each a one-off cost, reported by benchmarks)

    def _layer(self, feats, cu, dom, counts):
        m = self.model
        if self.fused_projection:  # both projections in one launch (fused_projection.py)
            qkv = fused_qkv(feats, m.pulse_embed, m.qkv_proj)
        else:
            qkv = m.qkv_proj(m.pulse_embed(feats.to(m.qkv_proj.weight.dtype)))
        q, k, v = qkv.view(-1, 3, m.n_heads, m.head_dim).unbind(dim=1)
        out = dom_fused_attention(q, k, v, cu, dom, counts, **self.attention_config)
        return out.reshape(-1, m.d_model)

    def _capture(self, n_bucket: int, device):
        n_features = self.model.pulse_embed.in_features
        static = (torch.zeros(n_bucket, n_features, device=device),
                  torch.arange(n_bucket + 1, device=device, dtype=torch.int32),
                  torch.arange(n_bucket, device=device, dtype=torch.int64),
                  torch.ones(n_bucket, device=device, dtype=torch.int64))
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(self.warmup):  # compile/autotune and allocate outside the capture
                self._layer(*static)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            out = self._layer(*static)
        self.captures += 1
        self.graphs[n_bucket] = (graph, static, out)
        return self.graphs[n_bucket]

    def stage(self, batch: DomBatch):
        """Copy the padded batch into its bucket's static buffers (capturing the bucket on first use)."""
        device = self.model.qkv_proj.weight.device
        n_bucket = bucket_for(batch.n_pulses, self.min_bucket, self.steps_per_octave)
        entry = self.graphs.get(n_bucket) or self._capture(n_bucket, device)
        for dst, src in zip(entry[1], pad_to_bucket(batch, n_bucket)):
            dst.copy_(src.pin_memory() if src.device.type == "cpu" else src, non_blocking=True)
        return n_bucket, batch.n_doms

    def replay(self, staged) -> torch.Tensor:
        n_bucket, n_doms = staged
        graph, _, out = self.graphs[n_bucket]
        graph.replay()
        return out[:n_doms]

    def __call__(self, batch: DomBatch) -> torch.Tensor:
        return self.replay(self.stage(batch))
