"""dom_fused's training step and inference forward as CUDA-graph replays that serve every batch: one graph per
pulse bucket.

Why: at ~1,000 events a training step's kernels take ~0.3 ms of GPU time, but launching them eagerly (two forward
and three backward Triton launches, their argument lists, four allocations) costs the lent H100's host 0.3-0.6 ms
more than the harness's own step, so a stream of steps is bound by the host (docs/dom_fused_notes.md, runs 31-32
and 106-111). A graph replay is one launch of all of them, and lets the independent launches run side by side
(``run_concurrently``'s fork and join cost nothing at replay).

A captured graph replays fixed pointers and sizes, so here the kernels read their tensors and the pulse count N
from a small int64 device buffer (``INDIRECT``: ``_fwd_kernel``, ``_bwd_kernel``, ``_bwd_large_kernel``; slots
``ARG_SLOTS``). One graph then serves every batch whose pulse count falls in its bucket (``bucket_for``, quarter
octaves: at most 25 % more programs than the batch needs; the programs past its N find no work). A call allocates
its outputs as the eager path does (out; dq, dk, dv; the fp32 saved forward), so nothing a caller keeps is graph
memory and outputs of earlier calls stay valid (gradient accumulation works as in eager mode).

Handing a call's values to its replay costs no CUDA call: the host writes them into a pinned *mailbox* with a
sequence number, and the graph's first kernel (``_fetch_args``, one program) copies the mailbox into the device
buffer and writes the sequence number back to a pinned *ack* word. Before writing the next call's values the host
checks that the ack has caught up, i.e. that the previous replay has read its values (it waits only when the GPU
is a whole replay of this graph behind). A copy (``cudaMemcpyAsync``) cost ~25 µs of host time per call on the
lent machine, the mailbox ~5 µs with its ack check (run 112).

The first call of a bucket runs the same launches eagerly (compiling them) and then captures them: a capture
(milliseconds, a device synchronisation). Graphs are keyed by everything they bake in: device and current stream,
dtype, head shape, the q / k / v / grad_out strides, the scale, the config and the bucket.

An inference forward (``dom_fused_attention`` without autograd) replays graphs of its own, with the inference plan.

Used by ``DomFusedAttention`` and ``dom_fused_attention`` under ``graphs="auto"`` (the default) for CUDA calls
below ``dom_fused.TRAINING_GRAPHS_BELOW_PULSES`` (400k) / ``INFERENCE_GRAPHS_BELOW_PULSES`` (200k for one head, 64k for several), where a stream
of calls is bound by host dispatch (above them the graphed launches cost ~5 % more GPU time than the eager ones,
and the host no longer hides it), whose plan has no size classes (the training plan: one head at any size, several
heads below ``merge_below_pulses``; the inference plan also has size classes for one fp32 head from
``merge_below_pulses``), outside any caller's own capture, with 16-byte-aligned tensors. Elsewhere the eager
launches run. (``graphs.GraphedDomForward``, which captures the whole layer, turns them off.)
"""

from __future__ import annotations

import time

import torch

from iceaggr_lib.backends.triton_launch import HAVE_TRITON, FastLaunch, tl, triton

# int64 slots of the argument buffer: tensors by address, then N (what INDIRECT kernels read); the mailbox's last
# slot carries the call's sequence number
ARG_SLOTS = ("q", "k", "v", "out", "saved", "pulse_to_dom_idx", "cu_seqlens", "dom_pulse_counts", "n_pulses",
             "grad_out", "dq", "dk", "dv")
N_SLOTS = 16
SEQ_SLOT = N_SLOTS - 1
MIN_BUCKET = 4096  # smaller batches share the 4,096-row graph (its empty programs cost less than a capture)
STEPS_PER_OCTAVE = 4
ACK_TIMEOUT_S = 60.0  # a replay whose fetch never runs (a failed earlier launch) is an error, not a hang


def bucket_for(n: int, min_bucket: int = 256, steps_per_octave: int = 1) -> int:
    """The smallest bucket >= max(n, min_bucket): buckets are the powers of two and, with ``steps_per_octave`` s > 1,
    the s - 1 evenly spaced sizes between two of them (s = 4: 1024, 1280, 1536, 1792, 2048, ...), so a batch is
    padded by at most 1 / s of its size instead of up to 2x."""
    if steps_per_octave < 1 or steps_per_octave & (steps_per_octave - 1):
        raise ValueError(f"bucket_for: steps_per_octave must be a power of two >= 1, got {steps_per_octave}")
    n = max(int(n), min_bucket, 1)
    pow2 = 1 << (n - 1).bit_length()  # the smallest power of two >= n
    step = max(1, pow2 // (2 * steps_per_octave))  # the octave (pow2 / 2, pow2] in s steps
    return -(-n // step) * step


if HAVE_TRITON:
    @triton.jit
    def _fetch_args(MAILBOX, ARGS, ACK, NS: tl.constexpr, SEQ: tl.constexpr):
        """A replay's first kernel: the host's values from the pinned mailbox (volatile loads: never an old copy
        from a cache) into the device buffer the other kernels read, then the sequence number back to the pinned
        ack word once they are read (the store depends on the loaded values)."""
        i = tl.arange(0, NS)
        vals = tl.load(MAILBOX + i, volatile=True)
        tl.store(ARGS + i, vals)
        tl.debug_barrier()
        tl.store(ACK + i, vals, mask=i == SEQ)

    _FETCH = FastLaunch(_fetch_args, "dom_fused")


class _Entry:
    """One captured graph: the device argument buffer, the pinned mailbox and ack word, the fp32 scratch of a
    backward without a saved forward (the bucket's rows; its address goes into the ``saved`` slot), its config
    and what the first call's launches returned (the forward's t_fwd)."""

    def __init__(self, device, config, scratch_shape=None):
        self.args = torch.zeros(N_SLOTS, dtype=torch.int64, device=device)
        pinned = torch.device(device).type == "cuda"  # (a CPU entry: the interpreter test of the protocol)
        self.mailbox = torch.zeros(N_SLOTS, dtype=torch.int64, pin_memory=pinned)
        self.ack = torch.zeros(N_SLOTS, dtype=torch.int64, pin_memory=pinned)  # (slot SEQ_SLOT; a line of its own)
        self.mailbox_np, self.ack_np = self.mailbox.numpy(), self.ack.numpy()
        self.seq = 0
        self.config = config
        self.scratch = None if scratch_shape is None else torch.empty(scratch_shape, dtype=torch.float32,
                                                                      device=device)
        self.graph = None
        self.result = None

    def post(self, values) -> None:
        """This call's values into the mailbox (with the entry's scratch in the ``saved`` slot where it has one),
        once the previous replay has read the last ones."""
        if self.scratch is not None:
            values = values[:4] + (self.scratch.data_ptr(),) + values[5:]
        if self.ack_np[SEQ_SLOT] != self.seq:
            deadline = time.perf_counter() + ACK_TIMEOUT_S
            while self.ack_np[SEQ_SLOT] != self.seq:  # the GPU is a whole replay of this graph behind: wait
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"dom_fused (dom_graphs): replay {self.seq} never read its arguments in "
                                       f"{ACK_TIMEOUT_S:g} s; did an earlier launch fail?")
                time.sleep(0)
        self.seq += 1
        mailbox = self.mailbox_np
        mailbox[:len(values)] = values
        mailbox[SEQ_SLOT] = self.seq

    def fetch(self) -> None:
        _FETCH((1,), (self.mailbox, self.args, self.ack), dict(NS=N_SLOTS, SEQ=SEQ_SLOT), 1)


_ENTRIES: dict = {}  # key -> _Entry, or None where the key's calls launch eagerly
captures = 0  # graphs captured in this process (each a one-off cost; tests and benchmarks read it)


def _capture(fn) -> torch.cuda.CUDAGraph:
    global captures
    graph = torch.cuda.CUDAGraph()
    # thread_local: a backward is captured on autograd's device thread while the caller's thread waits
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    captures += 1
    return graph


def _applies(q) -> bool:
    """Graphs can serve this call: CUDA tensors, outside any caller's own graph capture."""
    return q.is_cuda and not torch.cuda.is_current_stream_capturing()


def _key(kind, q, k, v, scale, config, extra):
    """(The host time of a call matters here: one stride() per tensor, no sorting for the default config.)"""
    idx = q.device.index
    stream = torch._C._cuda_getCurrentRawStream(idx) if q.is_cuda else 0
    items = tuple(sorted((key, tuple(val) if isinstance(val, list) else val) for key, val in config.items())) \
        if config else ()
    return (kind, idx, stream, q.dtype, q.shape[1:], q.stride(), k.stride(), v.stride(), scale, items) + extra


def _replay(key, values, new_entry, launches):
    """A graph's call: this call's ``values`` into its entry's mailbox, then a replay; on the key's first call the
    entry is made (``new_entry()``, None where the key's calls launch eagerly: then None is returned), the launches
    run eagerly once (they compile; their result is kept in ``entry.result``) and are captured. ``launches(entry)``
    issues the fetch kernel and the kernels. Returns the entry."""
    entry = _ENTRIES.get(key, False)
    if entry is False:
        entry = new_entry()
        if entry is None:
            _ENTRIES[key] = None
            return None
        entry.post(values)
        entry.result = launches(entry)  # this call, eagerly, then the capture
        entry.graph = _capture(lambda: launches(entry))
        _ENTRIES[key] = entry
        return entry
    entry.post(values)
    entry.graph.replay()
    return entry


def forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, save, config, autograd=True):
    """``dom_fused._forward`` by graph replay: (out, saved, t_fwd), or None where no graph applies (then the caller
    launches eagerly). ``autograd``: a training step's forward (its plan, ``_training_defaults``); False: an
    inference forward (``save`` False), with the inference plan, in graphs of its own."""
    from iceaggr_lib.backends import dom_fused

    n, n_heads, dh = q.shape
    if n == 0 or not _applies(q):
        return None
    dom_fused._check_inputs(q, k, v, cu_seqlens, pulse_to_dom, dom_counts)  # (as the eager path: errors name them)
    bucket = bucket_for(n, MIN_BUCKET, STEPS_PER_OCTAVE)
    key = _key("fwd" if autograd else "inf", q, k, v, scale, config,
               (save, bucket, cu_seqlens.dtype, pulse_to_dom.dtype, dom_counts.dtype))
    if _ENTRIES.get(key, False) is None:  # (a config whose plan has size classes: eager)
        return None
    q_stride, k_stride, v_stride = key[5:8]
    values = (q.data_ptr(), k.data_ptr(), v.data_ptr(), 0, 0, pulse_to_dom.data_ptr(), cu_seqlens.data_ptr(),
              dom_counts.data_ptr(), n)
    if (values[0] | values[1] | values[2] | values[5] | values[6] | values[7]) & 15 or q_stride[-1] != 1 \
            or k_stride[-1] != 1 or v_stride[-1] != 1:  # (out and saved are fresh allocations: aligned)
        return None
    out = torch.empty((dom_counts.shape[0], n_heads, dh), device=q.device, dtype=q.dtype)
    saved = torch.empty((n, n_heads, dh + 2), device=q.device, dtype=torch.float32) if save else out
    values = values[:3] + (out.data_ptr(), saved.data_ptr()) + values[5:]

    def new_entry():
        graph_config = dom_fused._graph_config(q, config, bucket, autograd)
        return None if graph_config is None else _Entry(q.device, graph_config)

    def launches(entry):  # (the tensors given here only specialise the kernels; they read the buffer's)
        entry.fetch()
        return dom_fused._forward(q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, autograd, save, entry.config,
                                  out=out, saved=saved, indirect=(entry.args, bucket))[2]

    entry = _replay(key, values, new_entry, launches)
    return None if entry is None else (out, saved, entry.result)


def backward(grad_out, q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, saved, t_fwd, config):
    """``dom_fused.fused_backward`` by graph replay: (dq, dk, dv), or None where no graph applies. (The inputs are
    the forward's, checked there.)"""
    from iceaggr_lib.backends import dom_fused

    n, n_heads, dh = q.shape
    if not _applies(q):
        return None
    g = grad_out.contiguous()
    bucket = bucket_for(n, MIN_BUCKET, STEPS_PER_OCTAVE)
    key = _key("bwd", q, k, v, scale, config, (saved is None, t_fwd, g.stride(0), g.stride(1), g.dtype, bucket,
                                               cu_seqlens.dtype, pulse_to_dom.dtype, dom_counts.dtype))
    if _ENTRIES.get(key, False) is None:
        return None
    grads = torch.empty((3, n, n_heads, dh), device=q.device, dtype=q.dtype)  # one allocation (host time)
    dq, dk, dv = grads[0], grads[1], grads[2]
    step = dq.nbytes
    g_ptr, dq_ptr = g.data_ptr(), dq.data_ptr()
    values = (q.data_ptr(), k.data_ptr(), v.data_ptr(), 0, 0 if saved is None else saved.data_ptr(),
              pulse_to_dom.data_ptr(), cu_seqlens.data_ptr(), dom_counts.data_ptr(), n, g_ptr, dq_ptr, dq_ptr + step,
              dq_ptr + 2 * step)
    if (values[0] | values[1] | values[2] | values[4] | g_ptr | step) & 15:  # (the index tensors: as the forward's)
        return None

    def new_entry():
        graph_config = dom_fused._graph_config(q, config, bucket)
        return None if graph_config is None else _Entry(q.device, graph_config,
                                                        (bucket, n_heads, 2) if saved is None else None)

    def launches(entry):
        entry.fetch()
        dom_fused.fused_backward(g, q, k, v, cu_seqlens, pulse_to_dom, dom_counts, scale, saved, t_fwd,
                                 grads=(dq, dk, dv), scratch=entry.scratch, indirect=(entry.args, bucket),
                                 **entry.config)

    return None if _replay(key, values, new_entry, launches) is None else (dq, dk, dv)


def clear() -> None:
    """Drop every captured graph (and its buffers); the next calls capture again."""
    _ENTRIES.clear()
