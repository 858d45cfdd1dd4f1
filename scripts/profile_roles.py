"""GPU time of each launch of a dom_fused forward, per configuration; a driver for Nsight Compute.

    PYTHONPATH=$PWD python3 scripts/profile_roles.py --points 4096:fp32:1,4096:bf16:8 \\
        [--configs '[{"split_flash": true}, ...]'] [--ncu]

For each point (events:dtype:heads, head_dim = 128 / heads, the sample generator's batch) and each
config (the default first), five forward calls under ``torch.no_grad`` on one stream (``concurrent=False``,
so launches do not overlap and each one's time is its own): the median GPU time of each launch, from the
profiler's kernel records (warm L2, one input set). The role of a launch is named from the plan
(``dom_fused.forward_roles``): small (tiles of DOMs <= T_small), big (tiles of T_small < n <= T_big and the
large DOMs' flash loops), merged (both), big_tiles / flash (``split_flash``); dom_classes' launches by their
kernels: classify and classes (``size_classes``), list_large and large_flash (``large_list``).

``--ncu``: no profiler; after two warm-up calls, one call between ``cudaProfilerStart`` / ``Stop`` per
point and config, for ``ncu --profile-from-start off`` to profile (one kernel record per launch).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

ROLE_NAMES = {0: "merged", 1: "big", 2: "small", 3: "flash", 4: "big_tiles"}
KERNEL_NAMES = {"_classify": "classify", "_class_attend": "classes", "_list_large": "list_large",
                "_large_attend": "large_flash"}  # dom_classes' launches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", default="4096:fp32:1,4096:bf16:8,4096:fp32:8")
    ap.add_argument("--configs", type=json.loads, default=[])
    ap.add_argument("--ncu", action="store_true")
    args = ap.parse_args()
    # scripts/ is on sys.path when this runs as a script
    from host_dispatch import DOM_FUSED_KERNELS, parse_points, per_launch_us

    from iceaggr_lib.backends import dom_fused
    from iceaggr_lib.data.sample import generate_table
    from iceaggr_lib.testing import random_qkv

    try:
        points = parse_points(args.points)
    except ValueError as e:
        ap.error(str(e))
    if not points:
        ap.error("--points: no point given")
    table = generate_table(max(events for events, _, _, _ in points), seed=0)
    for events, dname, dtype, h in points:
        b = table.batch(0, events).to("cuda")
        dh = 128 // h
        q, k, v = random_qkv(b.n_pulses, h, dh, dtype=dtype, device="cuda")
        for config in [{}] + args.configs:
            config = {key: tuple(val) if isinstance(val, list) else val for key, val in config.items()}
            label = f"{events} ev {dname} {h}x{dh} {json.dumps(config) if config else 'default'}"
            try:
                plan = dom_fused._resolve(dtype, dh, h, b.n_pulses, **config)
            except ValueError as e:  # a config that does not apply at this point
                print(f"{label}: not run: {e}", flush=True)
                continue
            fwd_roles = [ROLE_NAMES[r] for r, _ in dom_fused.forward_roles(plan, b.n_pulses, h)]

            def call():
                return dom_fused.dom_fused_attention(q, k, v, b.cu_seqlens, b.pulse_to_dom_idx, b.dom_pulse_counts,
                                                     concurrent=False, **config)
            with torch.no_grad():
                try:
                    call(); call()
                    torch.cuda.synchronize()
                except Exception as e:  # record, keep going
                    print(f"{label}: ERROR {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                if args.ncu:
                    torch.cuda.cudart().cudaProfilerStart()
                    call()
                    torch.cuda.synchronize()
                    torch.cuda.cudart().cudaProfilerStop()
                    print(f"{label}: profiled launches: dom_classes' (if any), then {fwd_roles}", flush=True)
                    continue
                names, times = per_launch_us(call, 5, DOM_FUSED_KERNELS)
            left = iter(fwd_roles)  # _fwd_kernel launches by plan role, dom_classes' by kernel name
            roles = [next(left) if name.startswith("_fwd_kernel") else KERNEL_NAMES.get(name.split("_kernel")[0], name)
                     for name in names]
            med = np.median(times, axis=0)
            print(f"{label}: " + ", ".join(f"{r} {t:.1f}" for r, t in zip(roles, med))
                  + f"  (µs, median of 5; sum {np.median(times.sum(axis=1)):.1f})", flush=True)


if __name__ == "__main__":
    main()
