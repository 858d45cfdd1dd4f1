"""One-call GPU check of the attention backends (run on the H100 through the device tool).

    PYTHONPATH=$PWD python3 scripts/gpu_backend_check.py [--out DIR]

1. BlockMask build cost at 1,024 and 4,096 events of realistic batches (``iceaggr_lib.data.sample``):
   ours (``flex_block.prepare``: per-row DOM ids + tables from cu_seqlens + BlockMask) vs
   ``create_block_mask(mask_mod, ..., _compile=True)``; first call (compilation) reported apart, then
   ``triton.testing.do_bench`` medians (20th/80th percentiles as spread) rotating over several batches.
   Both masks are checked equal, tile for tile. The flex_block attention time (bf16, H=1, Dh=128, forward)
   is printed beside for scale.
2. varlen at 4,096 events (~200k DOMs > 65,535): forward + backward run, rel err vs the float64
   reference, forward time.
3. The compile counter of compiled FlexAttention over 12 batch shapes (flex_dense, bf16 forward), then a
   deliberate recompile-limit hit (limit lowered to 1) to show that the silent eager fallback is counted
   and warned about.

Writes a JSON of every number to --out (default $OUT or .), prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
from torch.nn.attention.flex_attention import create_block_mask

from iceaggr_lib.backends import dom_attention, get_backend
from iceaggr_lib.backends import flex_dense
from iceaggr_lib.backends.flex_block import build_document_block_mask, document_mask_mod
from iceaggr_lib.data.sample import generate_table
from iceaggr_lib.testing import random_qkv, reference_errors

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def bench(fn, warmup=25, rep=200):
    from triton.testing import do_bench
    q20, q50, q80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return {"median_ms": q50, "p20_ms": q20, "p80_ms": q80}


def first_call_ms(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def tile_map(bm, nb):
    """(nb, nb) int map: 1 = partial tile, 2 = full tile (key-major tables)."""
    out = torch.zeros(nb, nb, dtype=torch.int8, device=bm.kv_num_blocks.device)
    for num, idx, value in ((bm.kv_num_blocks, bm.kv_indices, 1), (bm.full_kv_num_blocks, bm.full_kv_indices, 2)):
        num, idx = num.reshape(nb).long(), idx.reshape(nb, -1).long()
        listed = torch.arange(idx.shape[1], device=idx.device)[None, :] < num[:, None]
        rows = torch.arange(nb, device=idx.device)[:, None].expand_as(idx)
        out[rows[listed], idx[listed]] = value
    return out


def blockmask_build(table, n_events, n_batches, results):
    batches = [table.batch(i * n_events, (i + 1) * n_events).to("cuda") for i in range(n_batches)]
    spec = get_backend("flex_block")
    preps = [flex_dense.prepare(b, 1, 128, torch.bfloat16) for b in batches]
    row = {"n_events": n_events, "n_batches_rotated": n_batches,
           "n_pulses": [b.n_pulses for b in batches], "n_doms": [b.n_doms for b in batches]}

    # Ours: the whole per-batch preparation of flex_block (DOM ids, tables, BlockMask).
    state = {"i": 0}

    def ours():
        b = batches[state["i"] % n_batches]
        state["i"] += 1
        return spec.prepare(b, 1, 128, torch.bfloat16)

    row["ours_first_call_ms"] = first_call_ms(ours)
    row["ours"] = bench(ours)

    # create_block_mask(_compile=True) on the same mask_mod and padded length.
    def theirs_for(i):
        p = preps[i]
        return create_block_mask(document_mask_mod(p["dom"]), 1, 1, p["n_pad"], p["n_pad"], device="cuda",
                                 _compile=True)

    row["create_block_mask_first_call_ms"] = first_call_ms(lambda: theirs_for(0))
    for i in range(n_batches):  # compile for every batch's shape before timing
        theirs_for(i)
    state["i"] = 0

    def theirs():
        i = state["i"] % n_batches
        state["i"] += 1
        return theirs_for(i)

    row["create_block_mask"] = bench(theirs, warmup=5, rep=100)

    # Same tiles?
    equal = []
    for b, p in zip(batches, preps):
        nb = p["n_pad"] // 128
        a = tile_map(build_document_block_mask(b.cu_seqlens, p["dom"], p["n_pad"]), nb)
        c = tile_map(create_block_mask(document_mask_mod(p["dom"]), 1, 1, p["n_pad"], p["n_pad"], device="cuda",
                                       _compile=True), nb)
        equal.append(bool(torch.equal(a, c)))
    row["tiles_equal"] = equal

    # The attention itself, for scale (bf16, H=1, Dh=128, forward, compiled flex with our BlockMask).
    b, p = batches[0], spec.prepare(batches[0], 1, 128, torch.bfloat16)
    q, k, v = random_qkv(b.n_pulses, 1, 128, dtype=torch.bfloat16, device="cuda", seed=1)
    with torch.no_grad():
        spec.attend(q, k, v, b, p, 128 ** -0.5)
        row["flex_block_attention_fwd"] = bench(lambda: spec.attend(q, k, v, b, p, 128 ** -0.5))
    results["blockmask"].append(row)
    print(f"[blockmask] {n_events} events: ours {row['ours']['median_ms']:.3f} ms, create_block_mask(_compile=True) "
          f"{row['create_block_mask']['median_ms']:.3f} ms, tiles equal {equal}", flush=True)


def varlen_4096(table, results):
    b = table.batch(0, 4096).to("cuda")
    q, k, v = random_qkv(b.n_pulses, 1, 128, dtype=torch.bfloat16, device="cuda", seed=7, requires_grad=True)
    prep = get_backend("varlen").prepare(b, 1, 128, torch.bfloat16)
    g = torch.randn((b.n_doms, 1, 128), device="cuda").to(torch.bfloat16)
    errs = reference_errors(lambda q, k, v: dom_attention(q, k, v, b, "varlen", mode="forward_backward", prep=prep),
                            b, q, k, v, g, 128 ** -0.5)
    row = {"n_pulses": b.n_pulses, "n_doms": b.n_doms, "n_chunks": len(prep),
           **{f"rel_err_{n}": e for n, e in zip(("out", "dq", "dk", "dv"), errs)}}
    with torch.no_grad():
        row["fwd"] = bench(lambda: get_backend("varlen").attend(q, k, v, b, prep, 128 ** -0.5))
    results["varlen_4096"] = row
    print(f"[varlen] 4096 events, {b.n_doms} DOMs in {len(prep)} calls: rel err out {row['rel_err_out']:.2e} "
          f"dq {row['rel_err_dq']:.2e} dk {row['rel_err_dk']:.2e} dv {row['rel_err_dv']:.2e}; "
          f"fwd {row['fwd']['median_ms']:.3f} ms", flush=True)


def recompiles(table, results):
    flex_dense.reset_flex_compile_stats()
    rows = []
    for n_events in range(8, 104, 8):  # 12 shapes
        b = table.batch(0, n_events).to("cuda")
        q, k, v = random_qkv(b.n_pulses, 1, 128, dtype=torch.bfloat16, device="cuda", seed=n_events)
        t = time.perf_counter()
        with torch.no_grad():
            dom_attention(q, k, v, b, "flex_dense")
        torch.cuda.synchronize()
        rows.append({"n_events": n_events, "n_pulses": b.n_pulses, "call_ms": (time.perf_counter() - t) * 1e3,
                     **flex_dense.flex_compile_stats()})
    results["recompiles_12_shapes"] = rows
    last = rows[-1]
    print(f"[recompiles] 12 shapes: compiles={last['compiles']} eager_calls={last['eager_calls']} "
          f"distinct_shapes={last['distinct_shapes']} (first call {rows[0]['call_ms']:.0f} ms, "
          f"last {rows[-1]['call_ms']:.1f} ms)", flush=True)

    # Deliberately hit the limit: 1 allowed graph, then a new dtype needs a second one -> eager, counted.
    torch._dynamo.reset()
    flex_dense.reset_flex_compile_stats()
    saved, flex_dense.RECOMPILE_LIMIT = flex_dense.RECOMPILE_LIMIT, 1
    b = table.batch(0, 16).to("cuda")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                q, k, v = random_qkv(b.n_pulses, 1, 128, dtype=dtype, device="cuda", seed=3)
                with torch.no_grad():
                    dom_attention(q, k, v, b, "flex_dense")
    finally:
        flex_dense.RECOMPILE_LIMIT = saved
    stats = flex_dense.flex_compile_stats()
    messages = [str(w.message) for w in caught if "EAGER" in str(w.message)]
    results["recompile_limit_demo"] = {"stats": stats, "warnings": messages}
    print(f"[recompile-limit demo] limit 1, 3 dtypes: {stats}; warnings: {messages}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    import triton
    results = {"torch": torch.__version__, "triton": triton.__version__, "device": torch.cuda.get_device_name(),
               "allow_tf32": False, "blockmask": []}
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)
    t = time.perf_counter()
    table = generate_table(8192, seed=0)
    print(f"generated 8192 events in {time.perf_counter() - t:.1f} s", flush=True)

    blockmask_build(table, 1024, 4, results)
    blockmask_build(table, 4096, 2, results)
    varlen_4096(table, results)
    recompiles(table, results)

    with open(os.path.join(args.out, "gpu_backend_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| events | pulses | ours build ms (p20-p80) | create_block_mask(_compile) ms (p20-p80) | first call ours / cbm ms | flex_block fwd ms |")
    print("|---|---|---|---|---|---|")
    for r in results["blockmask"]:
        o, c = r["ours"], r["create_block_mask"]
        print(f"| {r['n_events']} | {r['n_pulses'][0]} | {o['median_ms']:.3f} ({o['p20_ms']:.3f}-{o['p80_ms']:.3f}) | "
              f"{c['median_ms']:.2f} ({c['p20_ms']:.2f}-{c['p80_ms']:.2f}) | {r['ours_first_call_ms']:.1f} / "
              f"{r['create_block_mask_first_call_ms']:.0f} | {r['flex_block_attention_fwd']['median_ms']:.3f} |")


if __name__ == "__main__":
    main()
