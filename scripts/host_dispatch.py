"""How much of a dom_fused call is host dispatch? Host time per call, layer by layer, on a GPU.

    PYTHONPATH=$PWD python3 scripts/host_dispatch.py

For a 4-event and a 1,024-event batch of the sample generator (bf16, 1x128 and 8x16) it times, with a
host clock over 300 back-to-back calls and one synchronisation at the end, (1) the registry call the
benchmark grid makes (``dom_attention``), (2) ``dom_fused_attention`` (autograd.Function), (3)
``fused_forward`` (plain launches), each under ``torch.no_grad``, and the GPU time of the same call
(``triton.testing.do_bench``). When the host time per call exceeds the GPU time, a stream of such calls
is host-bound, whatever the kernel does.
"""

from __future__ import annotations

import time

import torch


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return host


def main():
    import triton.testing

    from iceaggr_lib.backends import dom_attention
    from iceaggr_lib.backends.dom_fused import dom_fused_attention, fused_forward
    from iceaggr_lib.data.sample import generate_table

    table = generate_table(1024, seed=0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    print(f"{'batch':>6} {'heads':>6} {'registry':>10} {'autograd.Fn':>12} {'launches':>10} {'GPU (do_bench)':>15}  [µs per call]")
    for events in (4, 1024):
        b = table.batch(0, events).to("cuda")
        for h in (1, 8):
            dh = 128 // h
            q, k, v = (torch.randn(b.n_pulses, h, dh, device="cuda").to(torch.bfloat16) for _ in range(3))
            cu, dom, cnt = b.cu_seqlens, b.pulse_to_dom_idx, b.dom_pulse_counts
            calls = {
                "registry": lambda: dom_attention(q, k, v, b, backend="dom_fused"),
                "autograd": lambda: dom_fused_attention(q, k, v, cu, dom, cnt, dh ** -0.5),
                "launches": lambda: fused_forward(q, k, v, cu, dom, cnt, dh ** -0.5),
            }
            with torch.no_grad():
                res = {name: host_us(fn) for name, fn in calls.items()}
                gpu = triton.testing.do_bench(calls["launches"], warmup=25, rep=100, return_mode="median") * 1e3
            print(f"{events:>6} {h:>6} {res['registry']:>10.1f} {res['autograd']:>12.1f} {res['launches']:>10.1f} "
                  f"{gpu:>15.1f}")


if __name__ == "__main__":
    main()
