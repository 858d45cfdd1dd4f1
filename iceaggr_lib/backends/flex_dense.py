"""FlexAttention with a document-masking ``score_mod`` and no BlockMask: ``flex_dense`` and ``flex_dense_eager``.

How it works
------------
The packed (N, H, Dh) pulses become one (1, H, N_pad, Dh) sequence. The score of query row i and key row j
is kept when both belong to the same DOM and set to -inf otherwise (``score_mod`` reads the per-row DOM id
tensor). With no BlockMask every (query block, key block) pair is visited: the work is O(N^2) although
only sum over DOMs of n^2 scores survive. This is the seed's recommendation, implemented as it described.
After attention the per-pulse rows are mean-pooled per DOM (``pooling.mean_pool_packed``).

N is padded up to a multiple of ``ROW_BLOCK`` (128, the kernels' tile); padded rows get their own DOM id
(D), so they only see each other, never a real pulse, and their outputs are dropped.

Compilation, made visible
-------------------------
``flex_dense`` runs ``flex_attention`` through ``torch.compile(dynamic=True)``: one graph serves every N,
instead of a recompile per batch shape. Dynamo's recompile limit (``torch._dynamo.config.recompile_limit``,
8 by default) would otherwise silently make flex run *eager* from the 9th shape on. Dtype, head count,
grad mode and the two backends (score_mod vs BlockMask) still each need a graph of their own, so our calls
run under a raised limit (``RECOMPILE_LIMIT`` = 64, patched around our calls only). Two counters keep
compilation visible (``flex_compile_stats()``):

* ``compiles``: graphs compiled, counted by the wrapping compiler backend (inductor underneath);
* ``eager_calls``: calls that ran the Python function un-traced, i.e. dynamo gave up on the frame (the
  recompile limit was hit, or it was disabled). Any such call emits a ``RuntimeWarning`` once; a compile
  count reaching the limit warns too.

``flex_dense_eager`` calls ``flex_attention`` uncompiled: PyTorch then materialises the full N x N score
matrix (what the seed's first-call numbers looked like). FlexAttention has no backward on CPU, so
forward_backward on CPU is refused for both.

``compiled_flex_attention`` and ``flex_compile_stats`` are shared with ``flex_block``.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import flex_attention

from iceaggr_lib.backends import MODES, BackendSpec
from iceaggr_lib.backends.pooling import mean_pool_packed
from iceaggr_lib.collate import DomBatch

ROW_BLOCK = 128
# Recompile limit applied (via torch._dynamo.config.patch) around our compiled flex calls only. One frame
# serves flex_dense and flex_block with every dtype, head count and grad mode, each a graph of its own, so
# dynamo's default of 8 is too few; the count stays visible in flex_compile_stats() and warns at the limit.
RECOMPILE_LIMIT = 64
CPU_BACKWARD = (("cpu", "forward_backward"), "FlexAttention does not support backward on CPU")

_STATS = {"calls": 0, "compiles": 0, "eager_calls": 0, "shapes": set()}
_warned = set()


_LIMIT_NAME = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def _recompile_limit() -> int:
    return RECOMPILE_LIMIT


def flex_compile_stats() -> dict:
    """Counters of the compiled FlexAttention path (shared by flex_dense and flex_block)."""
    limit = _recompile_limit()
    return {"calls": _STATS["calls"], "compiles": _STATS["compiles"], "eager_calls": _STATS["eager_calls"],
            "distinct_shapes": len(_STATS["shapes"]), "recompile_limit": limit}


def reset_flex_compile_stats() -> None:
    _STATS.update(calls=0, compiles=0, eager_calls=0, shapes=set())
    _warned.clear()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _counting_inductor(gm, example_inputs):
    """torch.compile backend: inductor, counting every graph it is asked to compile."""
    from torch._inductor.compile_fx import compile_fx
    _STATS["compiles"] += 1
    if _STATS["compiles"] >= _recompile_limit():
        _warn_once("limit", f"compiled FlexAttention has compiled {_STATS['compiles']} graphs; dynamo's recompile "
                            f"limit is {_recompile_limit()}: beyond it calls run EAGER")
    return compile_fx(gm, example_inputs)


def _flex_call(q, k, v, score_mod, block_mask, scale):
    if not torch.compiler.is_compiling():  # only true when dynamo did not trace this call
        _STATS["eager_calls"] += 1
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


_compiled_flex_call = torch.compile(_flex_call, dynamic=True, backend=_counting_inductor)


def compiled_flex_attention(q, k, v, score_mod=None, block_mask=None, scale=None):
    """``flex_attention`` through torch.compile, counting compiles and silent eager fallbacks."""
    _STATS["calls"] += 1
    _STATS["shapes"].add((tuple(q.shape), q.dtype, q.device.type, q.requires_grad,
                          None if block_mask is None else tuple(block_mask.kv_indices.shape)))
    eager_before = _STATS["eager_calls"]
    with torch._dynamo.config.patch(**{_LIMIT_NAME: RECOMPILE_LIMIT}):
        out = _compiled_flex_call(q, k, v, score_mod, block_mask, scale)
    if _STATS["eager_calls"] > eager_before:
        _warn_once("eager", "compiled FlexAttention ran EAGER (dynamo gave up on the frame, e.g. the recompile "
                            f"limit {_recompile_limit()} was hit): see flex_compile_stats()")
    return out


def padded_rows(n_pulses: int) -> int:
    return max(ROW_BLOCK, -(-n_pulses // ROW_BLOCK) * ROW_BLOCK)


def pad_rows(x: torch.Tensor, n_pad: int) -> torch.Tensor:
    """(N, H, Dh) -> (1, H, n_pad, Dh) with zero rows appended."""
    n = x.shape[0]
    if n_pad > n:
        x = torch.cat([x, x.new_zeros((n_pad - n,) + tuple(x.shape[1:]))])
    return x.transpose(0, 1).unsqueeze(0)


def prepare(batch: DomBatch, n_heads: int, head_dim: int, dtype: torch.dtype):
    """Per-row DOM ids padded to a multiple of 128; padded rows form one extra DOM (id D)."""
    n_pad = padded_rows(batch.n_pulses)
    dom = torch.full((n_pad,), batch.n_doms, dtype=torch.int32, device=batch.device)
    dom[:batch.n_pulses] = batch.pulse_to_dom_idx
    return {"n_pad": n_pad, "dom": dom}


def _attend(q, k, v, batch: DomBatch, prep, scale: float, compiled: bool):
    dom = prep["dom"].to(q.device)

    def same_dom_score(score, b, h, q_idx, kv_idx):
        return torch.where(dom[q_idx] == dom[kv_idx], score, -float("inf"))

    qp, kp, vp = (pad_rows(t, prep["n_pad"]) for t in (q, k, v))
    if compiled:
        out = compiled_flex_attention(qp, kp, vp, score_mod=same_dom_score, scale=scale)
    else:
        out = flex_attention(qp, kp, vp, score_mod=same_dom_score, scale=scale)
    out = out[0, :, :batch.n_pulses].transpose(0, 1)  # (N, H, Dh)
    return mean_pool_packed(out, batch)


def attend(q, k, v, batch, prep, scale):
    return _attend(q, k, v, batch, prep, scale, compiled=True)


def attend_eager(q, k, v, batch, prep, scale):
    return _attend(q, k, v, batch, prep, scale, compiled=False)


_FLEX_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})

SPECS = [
    BackendSpec(
        name="flex_dense",
        description="compiled FlexAttention, document-masking score_mod, no BlockMask (O(N^2) work)",
        devices=frozenset({"cpu", "cuda"}), dtypes=_FLEX_DTYPES, modes=frozenset(MODES),
        attend=attend, prepare=prepare, refused=(CPU_BACKWARD,)),
    BackendSpec(
        name="flex_dense_eager",
        description="uncompiled FlexAttention, document-masking score_mod (materialises N x N scores)",
        devices=frozenset({"cpu", "cuda"}), dtypes=_FLEX_DTYPES, modes=frozenset(MODES),
        attend=attend_eager, prepare=prepare, refused=(CPU_BACKWARD,)),
]
