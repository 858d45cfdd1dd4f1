"""FlexAttention with a document ``mask_mod`` BlockMask built directly from ``cu_seqlens``: ``flex_block``.

Why not ``create_block_mask``
-----------------------------
``create_block_mask`` evaluates the mask_mod over all N^2 (query, key) pairs to find which 128 x 128 tiles
are empty, partial or full. For the seed's batches that meant a 72.75 GiB allocation at 1,024 events
(default arguments) or, with ``_compile=True``, ~28 ms per batch at 1,024 events and ~431 ms at 4,096 on
an H100, paid anew for every batch because the DOM layout changes every batch.

How the BlockMask is built here
-------------------------------
Rows are padded to N_pad, a multiple of B = 128; padded rows form one extra DOM (id D). Cut the rows into
nb = N_pad / B blocks. Because each DOM is a contiguous run of rows, the key blocks that query block i must
visit are one contiguous range: from the block holding the first row of the first DOM touching block i,
to the block holding the last row of the last DOM touching block i::

    first_dom[i] = dom[i*B],  last_dom[i] = dom[i*B + B - 1]
    lo[i] = cu[first_dom[i]] // B,  hi[i] = (cu[last_dom[i] + 1] - 1) // B

A (query block i, key block j) tile is FULL (no masking needed) when both blocks lie inside one DOM
(first_dom == last_dom for each, and the same DOM); every other tile in [lo, hi] is PARTIAL (mask_mod is
applied). All of this is a handful of vectorised ops on nb x W tensors, W = max(hi - lo + 1) (a few
blocks: DOMs have at most a few hundred pulses), so the cost is proportional to the number of blocks,
with one device-to-host sync (for W). The document mask is symmetric and the query and key block sizes
are equal, so the query-major tables (used by the backward pass) equal the key-major ones and no
transpose is computed.

On CUDA the index tables are W wide; the compiled CPU kernel asserts that they span all nb key blocks,
so on CPU they are zero-filled to nb columns (CPU batches are small).

``build_document_block_mask(cu_seqlens, dom, n_pad)`` is the builder (tested against
``create_block_mask`` in tests/test_flex_block_mask.py); ``attend`` runs the compiled FlexAttention of
``flex_dense`` (same compile counters) with the mask, then mean-pools per DOM.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from iceaggr_lib.backends import MODES, BackendSpec
from iceaggr_lib.backends.flex_dense import (CPU_BACKWARD, ROW_BLOCK, compiled_flex_attention, pad_rows,
                                             prepare as dense_prepare)
from iceaggr_lib.backends.pooling import mean_pool_packed
from iceaggr_lib.collate import DomBatch


def document_mask_mod(dom: torch.Tensor):
    """mask_mod: query row and key row belong to the same DOM (``dom`` = per-row DOM id, padded)."""
    def same_dom(b, h, q_idx, kv_idx):
        return dom[q_idx] == dom[kv_idx]
    return same_dom


def document_block_tables(cu_seqlens: torch.Tensor, dom: torch.Tensor, n_pad: int, block: int = ROW_BLOCK,
                          width: int | None = None):
    """(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), each (nb,) / (nb, W), int32.

    ``cu_seqlens`` (D + 1,) of the real DOMs, ``dom`` (n_pad,) per-row DOM id with padded rows = D.
    ``width``: columns of the index tables (default: the widest row's block count).
    """
    device = dom.device
    # Boundaries of the real DOMs plus the padding DOM (id D, rows N..n_pad-1), so every dom id indexes cu.
    cu = torch.cat([cu_seqlens.to(device=device, dtype=torch.long),
                    torch.tensor([n_pad], device=device, dtype=torch.long)])
    nb = n_pad // block
    first_dom = dom[::block].long()  # (nb,)
    last_dom = dom[block - 1::block].long()
    lo = cu[first_dom] // block
    hi = (cu[last_dom + 1] - 1) // block
    n_visit = hi - lo + 1  # key blocks per query block
    widest = int(n_visit.max())  # the one host sync
    w = widest if width is None else max(width, widest)

    t = torch.arange(widest, device=device)
    j = lo[:, None] + t[None, :]  # (nb, widest) candidate key blocks
    visit = t[None, :] < n_visit[:, None]
    j_safe = torch.where(visit, j, 0)
    single = first_dom == last_dom  # block inside one DOM
    full = visit & single[:, None] & single[j_safe] & (first_dom[j_safe] == first_dom[:, None])
    partial = visit & ~full

    def compact(selected):
        # Stable sort puts the selected columns first, in increasing block order.
        order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)
        indices = torch.gather(j_safe, 1, order).to(torch.int32)
        indices = torch.where(torch.gather(selected, 1, order), indices, 0)
        table = torch.zeros((nb, w), dtype=torch.int32, device=device)
        table[:, :widest] = indices
        return selected.sum(dim=1, dtype=torch.int32), table

    kv_num, kv_idx = compact(partial)
    full_num, full_idx = compact(full)
    return kv_num, kv_idx, full_num, full_idx


def build_document_block_mask(cu_seqlens: torch.Tensor, dom: torch.Tensor, n_pad: int,
                              block: int = ROW_BLOCK) -> BlockMask:
    """The document-masking BlockMask for rows padded to ``n_pad``, from the DOM boundaries alone."""
    width = n_pad // block if dom.device.type == "cpu" else None
    kv_num, kv_idx, full_num, full_idx = document_block_tables(cu_seqlens, dom, n_pad, block, width)
    b = lambda x: x[None, None]  # (batch=1, heads=1, ...) broadcast over heads
    # Symmetric mask, equal block sizes: the query-major tables equal the key-major ones.
    return BlockMask(
        seq_lengths=(n_pad, n_pad),
        kv_num_blocks=b(kv_num), kv_indices=b(kv_idx),
        full_kv_num_blocks=b(full_num), full_kv_indices=b(full_idx),
        q_num_blocks=b(kv_num), q_indices=b(kv_idx),
        full_q_num_blocks=b(full_num), full_q_indices=b(full_idx),
        BLOCK_SIZE=(block, block),
        mask_mod=document_mask_mod(dom),
    )


def prepare(batch: DomBatch, n_heads: int, head_dim: int, dtype: torch.dtype):
    prep = dense_prepare(batch, n_heads, head_dim, dtype)
    prep["block_mask"] = build_document_block_mask(batch.cu_seqlens.to(batch.device), prep["dom"], prep["n_pad"])
    return prep


def attend(q, k, v, batch: DomBatch, prep, scale: float):
    qp, kp, vp = (pad_rows(t, prep["n_pad"]) for t in (q, k, v))
    out = compiled_flex_attention(qp, kp, vp, block_mask=prep["block_mask"], scale=scale)
    out = out[0, :, :batch.n_pulses].transpose(0, 1)
    return mean_pool_packed(out, batch)


SPEC = BackendSpec(
    name="flex_block",
    description="compiled FlexAttention with a document BlockMask built from cu_seqlens in O(#blocks)",
    devices=frozenset({"cpu", "cuda"}),
    dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    modes=frozenset(MODES),
    attend=attend,
    prepare=prepare,
    refused=(CPU_BACKWARD,),
)
