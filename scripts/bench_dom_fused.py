"""Check and time the dom_fused backend on a GPU at the points of issue 5, beside the libraries and the floor.

    PYTHONPATH=$PWD python3 scripts/bench_dom_fused.py --out $OUT [--libs] [--sweep] [--graphs]

For each point (events, dtype, heads): rel error of forward and gradients vs the float64 reference
(on the GPU), forward and forward+backward medians (triton.testing.do_bench, warm-up first, three
rotating input sets), the memory floor (``iceaggr_lib.bench.memory_floor_bytes``, at 3 TB/s and at the
measured copy bandwidth), peak memory. ``--libs`` adds varlen and flex_block (their
prepare, e.g. the BlockMask build, left out of their time, as the issue's targets say). ``--sweep``
times tile/warps/precision variants, ``--configs '[{...}, ...]'`` any dom_fused configs (JSON) at every
point (``--fwd-only``: forward times only); a config may also set ``large_programs_per_sm``, the persistent
programs per SM of the listed large-DOM launch (``dom_classes.LARGE_PROGRAMS_PER_SM``), or where that launch
writes v20's split halves ``presplit_programs_per_sm`` (``dom_classes.PRESPLIT_PROGRAMS_PER_SM``: one scratch
slot per program; the other setting does nothing there). ``--graphs`` times the whole layer forward at 16 events, eager
and replayed from a CUDA graph. Prints a table last; writes results.json (after every row) and log lines under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from iceaggr_lib.backends import dom_classes, dom_fused, get_backend
from iceaggr_lib.bench import memory_floor_bytes
from iceaggr_lib.envinfo import measure_copy_bandwidth
from iceaggr_lib.testing import random_qkv, reference_errors, rel_err

RESULTS: list[dict] = []
LARGE_PROGRAMS_PER_SM = dom_classes.LARGE_PROGRAMS_PER_SM  # the defaults, restored after each config
PRESPLIT_PROGRAMS_PER_SM = dom_classes.PRESPLIT_PROGRAMS_PER_SM


def log(*a):
    print(*a, flush=True)


def make_batches(n_events_list, seed=0, index=0):
    """Batch ``index`` of each size (events index * e .. (index + 1) * e - 1), as the grid's rotated batches."""
    from iceaggr_lib.data.sample import generate_table
    table = generate_table(max(n_events_list) * (index + 1), seed=seed)
    return {e: table.batch(index * e, (index + 1) * e) for e in n_events_list}


def qkv_sets(n, h, dh, dtype, n_sets=3, seed=0):
    """``n_sets`` rotating (q, k, v) triples on the GPU (iceaggr_lib.testing.random_qkv, seeds seed, seed+1, ...)."""
    return [random_qkv(n, h, dh, dtype=dtype, device="cuda", seed=seed + i) for i in range(n_sets)]


def bench(fn, n_sets):
    import triton.testing
    state = {"i": 0}

    def step():
        fn(state["i"] % n_sets)
        state["i"] += 1
    ms = triton.testing.do_bench(step, warmup=50, rep=300, return_mode="all")
    ms = np.asarray(ms)
    return float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90))


def floor_ms(batch, h, dh, dtype, bw):
    """(forward, forward+backward) memory floor in ms at ``bw`` bytes/s: iceaggr_lib.bench.memory_floor_bytes,
    the same definition as the workbook grid's ``x_floor``."""
    return tuple(memory_floor_bytes(batch.n_pulses, batch.n_doms, h, dh, dtype, mode) / bw * 1e3
                 for mode in ("forward", "forward_backward"))


def fused_fn(batch, scale, **cfg):
    cu, dom, cnt = batch.cu_seqlens, batch.pulse_to_dom_idx, batch.dom_pulse_counts
    return lambda q, k, v: dom_fused.dom_fused_attention(q, k, v, cu, dom, cnt, scale, **cfg)


def lib_fn(name, batch, h, dh, dtype, scale):
    spec = get_backend(name)
    spec.check("cuda", dtype, "forward")
    t0 = time.perf_counter()
    prep = spec.prepare(batch, h, dh, dtype)
    torch.cuda.synchronize()
    prep_ms = (time.perf_counter() - t0) * 1e3
    return (lambda q, k, v: spec.attend(q, k, v, batch, prep, scale)), prep_ms


def check(fn, batch, h, dh, dtype, scale, seed=11):
    q, k, v = random_qkv(batch.n_pulses, h, dh, dtype=dtype, device="cuda", seed=seed, requires_grad=True)
    n_doms = batch.n_doms
    g = torch.randn((n_doms, h, dh), device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
    errs = reference_errors(fn, batch, q, k, v, g.to(dtype), scale)
    return dict(zip(("err_out", "err_dq", "err_dk", "err_dv"), errs))


def time_point(name, fn, batch, h, dh, dtype, modes=("forward", "forward_backward")):
    sets = qkv_sets(batch.n_pulses, h, dh, dtype, 3)
    row = {}
    if "forward" in modes:
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(*sets[0]); torch.cuda.synchronize()
            row["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            row["fwd_ms"], row["fwd_p10"], row["fwd_p90"] = bench(lambda i: fn(*sets[i]), 3)
    if "forward_backward" in modes:
        gsets = [tuple(t.detach().requires_grad_(True) for t in s) for s in sets]
        out0 = fn(*gsets[0])
        gout = torch.randn_like(out0)

        def fb(i):
            out = fn(*gsets[i])
            torch.autograd.grad(out, gsets[i], gout)
        fb(0); torch.cuda.synchronize()
        row["fb_ms"], row["fb_p10"], row["fb_p90"] = bench(fb, 3)
    return row


def peak_memory(fn, batch, h, dh, dtype):
    q, k, v = qkv_sets(batch.n_pulses, h, dh, dtype, 1, 3)[0]
    torch.cuda.synchronize()
    es = q.element_size()
    io = memory_floor_bytes(batch.n_pulses, batch.n_doms, h, dh, dtype, "forward")  # q, k, v in + DOM rows out
    fb_io = memory_floor_bytes(batch.n_pulses, batch.n_doms, h, dh, dtype, "forward_backward")
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = fn(q, k, v)
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base + 3 * q.numel() * es
    del out
    qg, kg, vg = (t.requires_grad_(True) for t in (q, k, v))
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(qg, kg, vg)
    grads = torch.autograd.grad(out, (qg, kg, vg), torch.ones_like(out))  # noqa: F841 - alive for the peak
    torch.cuda.synchronize()
    fb_peak = torch.cuda.max_memory_allocated() - base + 3 * q.numel() * es
    return {"io_bytes": io, "fwd_peak_bytes": fwd_peak, "fwd_peak_over_io": fwd_peak / io,
            "fb_peak_bytes": fb_peak, "fb_io_bytes": fb_io, "fb_peak_over_io": fb_peak / fb_io}


def graphs_bench(batch16, configs=()):
    """The 16-event layer forward, eager and from a CUDA graph, per dtype; ``configs``: attention configs
    captured as further graphs (``GraphedDomForward(attention_config=...)``)."""
    import triton.testing
    from profile_graph import replay_times  # scripts/ is on sys.path when this runs as a script

    from iceaggr_lib.graphs import GraphedDomForward
    from iceaggr_lib.model import DOMAggregator
    res = {}
    for dtype, config in [(d, c) for d in (torch.float32, torch.bfloat16) for c in [{}] + list(configs)]:
        model = DOMAggregator(backend="dom_fused").to("cuda", dtype)
        b = batch16.to("cuda")
        with torch.no_grad():
            eager = triton.testing.do_bench(lambda: model(b), warmup=50, rep=300, return_mode="median")
            gf = GraphedDomForward(model, attention_config=config)
            staged = gf.stage(batch16)
            out_g = gf.replay(staged).clone()
            out_e = model(b)
            replay_ms, wall = replay_times(gf, staged)
            replay = float(np.median(replay_ms))
            stage_and_replay = triton.testing.do_bench(lambda: gf(batch16), warmup=20, rep=200, return_mode="median")
        key = str(dtype) + (json.dumps(config) if config else "")
        res[key] = {"eager_ms": eager, "graph_replay_ms": replay, "graph_replay_wall_ms": wall,
                           "stage_plus_replay_ms": stage_and_replay, "graph_vs_eager_rel_err": rel_err(out_g, out_e),
                           "n_pulses": batch16.n_pulses, "n_doms": batch16.n_doms}
        log("graphs", key, res[key])
    return res


def save(out_dir, env, graphs):
    """(Re)write results.json with every row so far."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"env": env, "results": RESULTS, "graphs": graphs}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--libs", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--configs", type=json.loads, default=[],
                    help='extra dom_fused configs for every point, e.g. \'[{"levels": [8, 32]}]\'')
    ap.add_argument("--graph-configs", type=json.loads, default=[],
                    help='--graphs: attention configs to capture besides the default, e.g. \'[{"precision": "ieee"}]\'')
    ap.add_argument("--batch-index", type=int, default=0,
                    help="time batch i of each size (events i*e ..): the grid rotates batches 0-3, whose flash work "
                         "differs up to 1.9x at 4,096 events")
    ap.add_argument("--fwd-only", action="store_true", help="time the forward only (sweeps; errors still checked)")
    ap.add_argument("--sweep-events", default="1024", type=lambda x: [int(e) for e in x.split(",")])
    ap.add_argument("--points", default="1024:bf16:1,4096:bf16:1,4096:fp32:1,4096:bf16:8,4096:fp32:8,1024:fp32:1,1024:bf16:8")
    args = ap.parse_args()
    from host_dispatch import parse_points  # scripts/ is on sys.path when this runs as a script
    try:
        points = parse_points(args.points)
    except ValueError as e:
        ap.error(str(e))
    import triton
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    env["copy_bw_Bps"] = measure_copy_bandwidth("cuda")
    log("env", env)
    t0 = time.perf_counter()
    batches = make_batches(sorted({16} | {ev for ev, _, _, _ in points}), index=args.batch_index)
    log(f"batches built in {time.perf_counter() - t0:.1f} s:", {e: repr(b) for e, b in batches.items()})
    gpu = {e: b.to("cuda") for e, b in batches.items()}
    graphs = graphs_bench(batches[16], args.graph_configs) if args.graphs else None
    for ev, dname, dtype, h in points:  # (--points "" with --graphs: the graphs only)
        b = gpu[ev]
        dh = 128 // h
        scale = dh ** -0.5
        f3, fb3 = floor_ms(b, h, dh, dtype, 3e12)
        fbw, _ = floor_ms(b, h, dh, dtype, env["copy_bw_Bps"])
        base = {"events": ev, "dtype": dname, "heads": h, "head_dim": dh, "n_pulses": b.n_pulses, "n_doms": b.n_doms,
                "max_dom": b.max_dom_pulses, "floor_fwd_ms_3TBs": f3, "floor_fwd_ms_measured_bw": fbw,
                "floor_fb_ms_3TBs": fb3}
        variants = [("dom_fused", {})]
        if args.sweep and ev in args.sweep_events:  # run 11: launches side by side on two streams, or not
            variants.append(("dom_fused{concurrent=False}", dict(concurrent=False)))
            if h > 1 and dtype != torch.float32:
                variants.append(("dom_fused{num_stages=None}", dict(num_stages=None)))
            if h > 1:  # the heads as the batch axis of 3-D dots in the small-DOM tiles, or a loop over them
                variants.append(("dom_fused{head_batch=False}", dict(head_batch=False)))
        variants += [("dom_fused" + json.dumps(c, separators=(",", "=")), {k: tuple(v) if isinstance(v, list) else v
                                                                         for k, v in c.items()}) for c in args.configs]
        for name, cfg in variants:
            row = dict(base, backend=name, config=cfg)
            if name != "dom_fused" and time.perf_counter() - t0 > args.budget_s:
                continue  # keep the call inside its time limit: defaults and libraries first
            cfg = dict(cfg)  # "large_programs_per_sm": dom_classes' module setting (run 67), not a config key
            dom_classes.LARGE_PROGRAMS_PER_SM = cfg.pop("large_programs_per_sm", LARGE_PROGRAMS_PER_SM)
            dom_classes.PRESPLIT_PROGRAMS_PER_SM = cfg.pop("presplit_programs_per_sm", PRESPLIT_PROGRAMS_PER_SM)
            try:
                fn = fused_fn(b, scale, **cfg)
                row.update(check(fn, b, h, dh, dtype, scale))
                row.update(time_point(name, fn, b, h, dh, dtype, ("forward",) if args.fwd_only else
                                      ("forward", "forward_backward")))
                if ev == 1024 and name == "dom_fused":
                    row.update(peak_memory(fn, b, h, dh, dtype))
            except Exception as e:  # record, keep going
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["elapsed_s"] = time.perf_counter() - t0
            RESULTS.append(row)
            log(json.dumps(row))
            save(args.out, env, graphs)  # as produced: a call cut short by its time limit keeps its rows
        if args.libs and ev == 1024 and dtype == torch.bfloat16 and h == 1:
            for lib in ("varlen", "flex_block"):
                row = dict(base, backend=lib)
                try:
                    fn, prep_ms = lib_fn(lib, b, h, dh, dtype, scale)
                    row["prep_ms_first"] = prep_ms
                    fn, prep_ms = lib_fn(lib, b, h, dh, dtype, scale)
                    row["prep_ms"] = prep_ms
                    row.update(time_point(lib, fn, b, h, dh, dtype))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                RESULTS.append(row)
                log(json.dumps(row))
                save(args.out, env, graphs)
        torch.cuda.empty_cache()
    save(args.out, env, graphs)
    log("\n== summary (ms, medians; floor at 3 TB/s) ==")
    log(f"{'point':<18}{'backend':<26}{'fwd':>8}{'fb':>8}{'floor':>8}{'x floor':>8}  errs out/dq/dk/dv")
    for r in RESULTS:
        pt = f"{r['events']} {r['dtype']} {r['heads']}x{r['head_dim']}"
        if "error" in r:
            log(f"{pt:<18}{r['backend']:<26} ERROR {r['error'][:80]}")
            continue
        errs = "/".join(f"{r[k]:.1e}" for k in ("err_out", "err_dq", "err_dk", "err_dv") if k in r)
        log(f"{pt:<18}{r['backend']:<26}{r.get('fwd_ms', float('nan')):8.3f}{r.get('fb_ms', float('nan')):8.3f}"
            f"{r['floor_fwd_ms_3TBs']:8.3f}{r.get('fwd_ms', float('nan')) / r['floor_fwd_ms_3TBs']:8.2f}  {errs}"
            + (f"  mem fwd {r['fwd_peak_over_io']:.2f}x io, fb {r['fb_peak_over_io']:.2f}x" if "fwd_peak_over_io" in r else ""))
    if graphs:
        for k, g in graphs.items():
            log(f"graphs 16 events {k}: eager {g['eager_ms']*1e3:.1f} us, replay {g['graph_replay_ms']*1e3:.1f} us "
                f"(wall {g['graph_replay_wall_ms']*1e3:.1f} us), stage+replay {g['stage_plus_replay_ms']*1e3:.1f} us")


if __name__ == "__main__":
    sys.exit(main())
