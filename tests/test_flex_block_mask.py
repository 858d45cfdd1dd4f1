"""The document BlockMask built from cu_seqlens equals create_block_mask's, block for block.

``create_block_mask`` evaluates the mask over all N^2 pairs (fine at these small sizes); ours reads only
the DOM boundaries. Both are compared as dense (query block x key block) maps of partial and full tiles,
and their counts, in the key-major and the query-major (backward) tables.
"""

from __future__ import annotations

import secrets

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from iceaggr_lib.backends.flex_block import build_document_block_mask, document_block_tables, document_mask_mod
from iceaggr_lib.backends.flex_dense import ROW_BLOCK, prepare
from iceaggr_lib.testing import batch_from_dom_sizes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dense_map(num_blocks, indices, n_blocks):
    """(nb, nb) 0/1 map of the listed blocks, whatever the width of ``indices``."""
    num_blocks, indices = num_blocks.reshape(-1).long().cpu(), indices.reshape(num_blocks.numel(), -1).long().cpu()
    out = torch.zeros(n_blocks, n_blocks, dtype=torch.int64)
    listed = torch.arange(indices.shape[1])[None, :] < num_blocks[:, None]
    rows = torch.arange(n_blocks)[:, None].expand_as(indices)
    out[rows[listed], indices[listed]] = 1
    assert int(out.sum()) == int(num_blocks.sum()), "an index is listed twice"
    return out


def random_sizes(seed):
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.geometric(0.3, 300), 455)
    sizes[rng.integers(0, 300, 2)] = [455, 300]
    return sizes


CASES = {
    "random": None,
    "single_455": [455],
    "one_pulse": [1] * 300,
    "aligned_128": [128, 128, 128],
    "block_edges": [127, 129, 256, 1, 128],
    "exact_multiple": [64] * 4,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_create_block_mask(case, device):
    seed = secrets.randbits(31)
    sizes = random_sizes(seed) if CASES[case] is None else CASES[case]
    batch = batch_from_dom_sizes(sizes, seed=seed).to(device)
    prep = prepare(batch, 1, 16, torch.float32)
    n_pad, nb = prep["n_pad"], prep["n_pad"] // ROW_BLOCK
    ours = build_document_block_mask(batch.cu_seqlens, prep["dom"], n_pad)
    theirs = create_block_mask(document_mask_mod(prep["dom"]), 1, 1, n_pad, n_pad, device=device)
    for prefix in ("kv", "full_kv", "q", "full_q"):
        mine = dense_map(getattr(ours, f"{prefix}_num_blocks"), getattr(ours, f"{prefix}_indices"), nb)
        ref = dense_map(getattr(theirs, f"{prefix}_num_blocks"), getattr(theirs, f"{prefix}_indices"), nb)
        assert torch.equal(mine, ref), f"{prefix} tables differ (case={case}, seed={seed}, device={device})"
    assert ours.BLOCK_SIZE == theirs.BLOCK_SIZE and tuple(ours.seq_lengths) == (n_pad, n_pad)


def test_padding_rows_are_their_own_dom():
    batch = batch_from_dom_sizes([3, 2])  # 5 rows padded to 128
    prep = prepare(batch, 1, 16, torch.float32)
    assert prep["n_pad"] == ROW_BLOCK
    assert prep["dom"][:5].tolist() == [0, 0, 0, 1, 1] and bool((prep["dom"][5:] == 2).all())


def test_tables_are_narrow_for_a_large_batch():
    """Work proportional to the number of blocks: ~450k rows give tables of a few columns, not nb."""
    seed = secrets.randbits(31)
    rng = np.random.default_rng(seed)
    sizes = np.minimum(rng.geometric(0.5, 240_000), 455)
    batch = batch_from_dom_sizes(sizes, seed=seed)
    prep = prepare(batch, 1, 16, torch.float32)
    kv_num, kv_idx, full_num, full_idx = document_block_tables(batch.cu_seqlens, prep["dom"], prep["n_pad"])
    nb = prep["n_pad"] // ROW_BLOCK
    assert kv_idx.shape[0] == nb and kv_idx.shape[1] <= -(-455 // ROW_BLOCK) + 2
    # Every query block visits its own (diagonal) key block, as a partial or a full tile.
    own = torch.arange(nb)[:, None]
    cols = torch.arange(kv_idx.shape[1])[None, :]
    listed = ((kv_idx == own) & (cols < kv_num[:, None])).any(1) | ((full_idx == own) & (cols < full_num[:, None])).any(1)
    assert bool(listed.all())
