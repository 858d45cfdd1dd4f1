"""One launch or two? dom_fused's bf16 forward, timed as the benchmark grid times it, both ways.

    PYTHONPATH=$PWD python3 scripts/merge_threshold.py

The bf16 forward runs the small-DOM and the big-window roles as two launches (less GPU time: each role
gets its own register budget) or merged into one (``merged=True``: one launch less of host dispatch).
For batches of the sample generator (16 ... 4,096 events, 1x128 and 8x16) it times both with
``iceaggr_lib.bench.time_calls`` (CUDA events, L2 flush before each call, calls back to back, the grid's
method) over 3 rotated q, k, v sets, and prints the medians: where a stream of calls is host-bound the
merged launch wins, where it is GPU-bound the two launches do.
"""

from __future__ import annotations

import numpy as np
import torch


def main():
    import triton

    from iceaggr_lib.backends.dom_fused import dom_fused_attention
    from iceaggr_lib.bench import time_calls
    from iceaggr_lib.data.sample import generate_table
    from iceaggr_lib.testing import random_qkv

    device = torch.device("cuda")
    table = generate_table(4096, seed=0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print(f"{'events':>7} {'pulses':>8} {'heads':>6} {'two launches':>13} {'merged':>8}  [ms, median (p20-p80)]")
    for events in (16, 256, 1024, 2048, 4096):
        b = table.batch(0, events).to(device)
        for h in (1, 8):
            dh = 128 // h
            sets = [random_qkv(b.n_pulses, h, dh, dtype=torch.bfloat16, device=device, seed=i) for i in range(3)]
            row = []
            for merged in (False, True):
                state = {"i": 0}

                def step():
                    q, k, v = sets[state["i"] % 3]
                    state["i"] += 1
                    return dom_fused_attention(q, k, v, b.cu_seqlens, b.pulse_to_dom_idx, b.dom_pulse_counts,
                                               merged=merged)

                with torch.no_grad():
                    for _ in range(5):
                        step()
                    t = time_calls(step, device, 60, 1.0, 5.0)
                row.append(f"{np.median(t):.3f} ({np.quantile(t, 0.2):.3f}-{np.quantile(t, 0.8):.3f})")
            print(f"{events:>7} {b.n_pulses:>8} {h:>6} {row[0]:>22} {row[1]:>22}", flush=True)


if __name__ == "__main__":
    main()
